"""`adaspec serve` as a real process with the scripted backend (no weights): policy file hot
reload through /metrics, graceful SIGTERM, a clean exit when models cannot load, and the
chunked-prefill flags."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from adaspec import metric_names as mn
from adaspec.server import cli as serve_cli
from adaspec.server.launch import ServerProcess, free_port


def gauge(base: str, name: str) -> float:
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for s in fam.samples:
            if s.name == name and not s.labels:
                return float(s.value)
    raise AssertionError(f"{name} not exported")


def eventually(base: str, name: str, want: float, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gauge(base, name) == want:
            return True
        time.sleep(0.1)
    return False


def doc(generation: int, max_draft: int = 4) -> str:
    return json.dumps(
        {
            "generation": generation,
            "mode": "adaptive",
            "tpotSloMs": 100.0,
            "tpotBudgetMs": 80.0,
            "maxDraftTokens": max_draft,
        }
    )


def test_policy_file_reload_and_graceful_stop(tmp_path: Path) -> None:
    pf = tmp_path / "policy.json"
    pf.write_text(doc(1))
    srv = ServerProcess(
        ["--backend", "scripted", "--policy-file", str(pf)], tmp_path / "log", ready_timeout_s=60
    )
    with srv:
        base = srv.base
        assert gauge(base, mn.POLICY_GENERATION) == 1
        assert gauge(base, mn.POLICY_BUDGET) == 0.08
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 5})
        assert r.status_code == 200

        pf.write_text(doc(2, max_draft=2))
        assert eventually(base, mn.POLICY_GENERATION, 2)
        assert gauge(base, mn.POLICY_MAX_DRAFT) == 2

        pf.write_text('{"generation": 3, "mode": "sometimes"}')
        assert eventually(base, mn.POLICY_INVALID, 1)
        assert gauge(base, mn.POLICY_RELOAD_ERRORS) == 1
        assert gauge(base, mn.POLICY_GENERATION) == 2
    # SIGTERM → graceful shutdown (uvicorn re-raises the signal after its shutdown completes)
    assert srv.proc is not None and srv.proc.returncode in (0, -signal.SIGTERM)
    log = srv.log_tail(20_000)
    assert "Application shutdown complete" in log
    assert "rejected, keeping last good policy" in log and "mode" in log


def test_serve_exits_when_models_cannot_load(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "adaspec.cli",
            "serve",
            "--target",
            str(tmp_path / "missing"),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "loading the models failed" in proc.stderr and "missing" in proc.stderr


def parse_serve(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="adaspec serve")
    serve_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_prefill_chunk_flags_defaults_and_errors() -> None:
    ns = parse_serve([])
    assert ns.prefill_chunk_tokens == 512 and serve_cli.prefill_min_chunk(ns) == 32
    assert serve_cli.check_args(ns) is None  # chunked prefill is on by default
    ns = parse_serve(["--prefill-chunk-tokens", "16"])
    assert serve_cli.check_args(ns) is None and serve_cli.prefill_min_chunk(ns) == 16
    ns = parse_serve(["--prefill-chunk-tokens", "0"])  # whole-prompt prefill
    assert serve_cli.check_args(ns) is None
    for argv, names in (
        (["--prefill-chunk-tokens", "-1"], ["--prefill-chunk-tokens"]),
        (["--prefill-min-chunk", "0"], ["--prefill-min-chunk"]),
        (
            ["--prefill-chunk-tokens", "8", "--prefill-min-chunk", "16"],
            ["--prefill-min-chunk", "--prefill-chunk-tokens"],
        ),
    ):
        problem = serve_cli.check_args(parse_serve(argv))
        assert problem is not None and all(n in problem for n in names), (argv, problem)


def test_serve_refuses_a_bad_chunk_limit_before_loading() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "adaspec.cli", "serve", "--prefill-chunk-tokens", "-5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--prefill-chunk-tokens must be >= 0" in proc.stderr
    assert "Traceback" not in proc.stderr
