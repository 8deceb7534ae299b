"""`specserve.controlplane` without its binaries: every user of the launcher (demo, local stack,
e2e fixtures) gets one clear error naming what is missing and the command that builds it, before
any process starts. The real start/stop runs in tests/e2e (it needs the envtest binaries)."""

from __future__ import annotations

import argparse
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from specserve import controlplane, demo
from specserve.controlplane import BINARIES, ControlPlane, EnvtestMissingError
from specserve.localnode.stack import LocalStack


@pytest.fixture
def empty_assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    assets = tmp_path / "assets"
    assets.mkdir()
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets))
    return assets


def test_assets_dir_follows_kubebuilder_assets_then_the_envtest_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path / "x"))
    assert controlplane.default_assets_dir() == tmp_path / "x"
    monkeypatch.delenv("KUBEBUILDER_ASSETS")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert controlplane.default_assets_dir() == (
        tmp_path / "cache" / "specserve" / "envtest" / controlplane.K8S_VERSION / "bin"
    )


def test_missing_binaries_are_named_with_the_command_that_builds_them(empty_assets: Path) -> None:
    for name in ("etcd", "kubectl"):  # present but only one of them executable
        (empty_assets / name).write_text("#!/bin/sh\n")
    (empty_assets / "etcd").chmod(stat.S_IRWXU)
    with pytest.raises(EnvtestMissingError) as err:
        controlplane.require_assets(empty_assets)
    msg = str(err.value)
    assert "`make envtest`" in msg and "KUBEBUILDER_ASSETS" in msg and str(empty_assets) in msg
    missing = [b for b in BINARIES if b != "etcd"]
    assert all(b in msg for b in missing) and "etcd," not in msg
    assert controlplane.missing_assets(empty_assets) == missing


def test_start_fails_before_spawning_anything(empty_assets: Path, tmp_path: Path) -> None:
    cp = ControlPlane(empty_assets, tmp_path / "work")
    with pytest.raises(EnvtestMissingError, match="make envtest"):
        cp.start()
    assert cp.procs == {} and not (tmp_path / "work").exists()


def test_local_stack_reports_the_same_error(empty_assets: Path, tmp_path: Path) -> None:
    stack = LocalStack(tmp_path / "stack")
    with pytest.raises(EnvtestMissingError, match="make envtest"):
        stack.start()
    assert stack.pids() == {}


@pytest.fixture
def keep_sigterm() -> Iterator[None]:
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def test_demo_prints_the_error_and_exits_2(
    empty_assets: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    keep_sigterm: None,
) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.0,10,5\n")
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    args = p.parse_args(["--scripted", "--trace", str(trace), "--work-dir", str(tmp_path / "w")])
    assert demo.run(args) == 2
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "demo:" in out and "make envtest" in out and "kube-apiserver" in out
