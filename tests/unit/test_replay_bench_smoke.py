"""Tiny sim-mode runs of each benchmark script, as a user runs them (`python bench/x.py`)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
TAG = "-unit-smoke"


@pytest.fixture
def cleanup() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for p in made:
        p.unlink(missing_ok=True)


def _run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_compare_policies_sim(cleanup: list[Path]) -> None:
    name = f"compare_policies-sim-adaspec-conv-{TAG}"  # the script puts "-" before a tag
    cleanup += [RESULTS / f"{name}.json", RESULTS / f"{name}.png"]
    out = _run("compare_policies.py", "--engine", "sim", "--max-requests", "6", f"--tag={TAG}")
    assert "adaptive" in out and "best static K" in out
    data = json.loads((RESULTS / f"{name}.json").read_text())
    assert set(data["policies"]) == {
        "off", "fixed-1", "fixed-3", "fixed-5", "smartspec", "threshold", "adaptive"
    }  # fmt: skip
    for p in data["policies"].values():
        assert p["summary"]["completed"] == 6
    assert (data["prefill_chunk_tokens"], data["prefill_min_chunk"]) == (512, 32)
    assert data["ratios"]["off"]["goodput_vs_off"] == pytest.approx(1.0)
    assert (RESULTS / f"{name}.png").stat().st_size > 0


def test_compare_policies_rejects_unknown_policy() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare_policies.py"), "--policies", "off,bogus"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown policy 'bogus'" in proc.stderr


def test_prefill_flags_are_checked() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare_policies.py"), "--prefill-chunk-tokens",
         "16", "--max-requests", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--prefill-min-chunk (32) must not exceed --prefill-chunk-tokens (16)" in proc.stderr


def test_load_sweep_sim(cleanup: list[Path]) -> None:
    name = f"load_sweep-sim{TAG}"
    cleanup += [RESULTS / f"{name}.json", RESULTS / f"{name}.png"]
    _run(
        "load_sweep.py",
        "--rates", "5,40", "--requests", "20", "--policies", "off,fixed-3,adaptive",
        "--oracle-max-k", "2", f"--tag={TAG}", "--prefill-chunk-tokens", "256",
    )  # fmt: skip
    data = json.loads((RESULTS / f"{name}.json").read_text())
    assert list(data["rates"]) == ["5", "40"]
    assert (data["prefill_chunk_tokens"], data["prefill_min_chunk"]) == (256, 32)
    assert data["rates"]["5"]["best_static"] in {"off", "fixed-1", "fixed-2", "fixed-3"}


def test_sim_validate_production_and_validate(cleanup: list[Path], tmp_path: Path) -> None:
    name = f"sim_production{TAG}"
    cleanup += [RESULTS / f"{name}.json", RESULTS / f"{name}.png"]
    _run(
        "sim_validate.py", "production", "--traces", "adaspec-code", "--loads", "1,4",
        "--max-requests", "30", "--policies", "off,fixed-1,adaptive", "--oracle-max-k", "2",
        f"--tag={TAG}", "--window-s", "4",
    )  # fmt: skip
    data = json.loads((RESULTS / f"{name}.json").read_text())
    res = data["traces"]["adaspec-code"]["x4"]
    assert res["oracle_static"] in {"off", "fixed-1", "fixed-2"}
    assert 0.0 < res["adaptive_vs_oracle"] <= 1.5
    # every request is replayed in exactly one slice, each slice against its own best static K
    sl = res["slices"]
    assert len(sl["slices"]) > 1
    assert sum(r["requests"] for r in sl["slices"]) == 30
    assert all(r["best_static"] in {"off", "fixed-1", "fixed-2"} for r in sl["slices"])
    ratios = [r["adaptive_vs_best"] for r in sl["slices"]]
    assert (
        sl["adaptive_vs_best_min"] == min(ratios)
        and 0.0 < min(ratios) <= sl["adaptive_vs_best_mean"]
    )
    assert (data["prefill_chunk_tokens"], data["prefill_min_chunk"]) == (512, 32)

    # validate against a "measured" file: a sim run of the same scaled trace must match itself.
    # The run is unchunked and, like runs from before chunked prefill, does not say so:
    # validate must then simulate whole-prompt admission (chunked would differ).
    cmp_name = f"compare_policies-sim-adaspec-conv-{TAG}v"
    cleanup += [RESULTS / f"{cmp_name}.json", RESULTS / f"{cmp_name}.png"]
    _run(
        "compare_policies.py", "--engine", "sim", "--max-requests", "6", "--noise", "0",
        "--policies", "off,adaptive", f"--tag={TAG}v", "--rounds", "1",
        "--prefill-chunk-tokens", "0",
    )  # fmt: skip
    measured = RESULTS / f"{cmp_name}.json"
    doc = json.loads(measured.read_text())
    assert doc.pop("prefill_chunk_tokens") == 0 and doc.pop("prefill_min_chunk") == 32
    measured.write_text(json.dumps(doc))
    val = RESULTS / "sim_validate-adaspec-conv.json"
    backup = val.read_bytes() if val.exists() else None
    try:
        out = _run(
            "sim_validate.py", "--noise", "0", "validate", "--measured", str(measured)
        )  # fmt: skip
        assert "worst |error|: P90 TPOT 0.0%, throughput 0.0%" in out
        assert json.loads(val.read_text())["prefill_chunk_tokens"] == 0
    finally:
        if backup is not None:
            val.write_bytes(backup)
        else:
            val.unlink(missing_ok=True)


def test_replay_cli_dry_run_and_bad_trace() -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bench.replay", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = cli("--dry-run", "--trace", "adaspec-code", "--max-requests", "5")
    assert ok.returncode == 0, ok.stderr
    assert "adaspec-code-scaled: 5 requests" in ok.stdout
    rows = [ln for ln in ok.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert len(rows) == 5
    bad = cli("--dry-run", "--trace", "nope")
    assert bad.returncode == 2 and "unknown trace 'nope'" in bad.stderr
