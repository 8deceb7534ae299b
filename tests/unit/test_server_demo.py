"""`adaspec run-demo --exit-after-demo` end to end as a real process (scripted backend: no
weights needed; the real pair is exercised by `make run` and the integration tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from adaspec.server.launch import free_port


def test_run_demo_streams_and_reports_speculation() -> None:
    port = free_port()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "adaspec.cli",
            "run-demo",
            "--backend",
            "scripted",
            "--exit-after-demo",
            "--port",
            str(port),
            "--demo-max-tokens",
            "24",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in out  # how to query it
    assert "from openai import OpenAI" in out
    assert "Hello from the scripted" in out  # the streamed demo text
    assert "24 tokens in" in out
    assert "tokens per target forward:" in out and "draft acceptance:" in out


def test_run_demo_rejects_bad_flags_with_a_message() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "adaspec.cli",
            "run-demo",
            "--backend",
            "scripted",
            "--max-batch",
            "0",
            "--exit-after-demo",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--max-batch must be >= 1" in proc.stderr


def test_run_demo_rejects_an_unwritable_step_log_before_loading(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "steps.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "adaspec.cli",
            "run-demo",
            "--backend",
            "scripted",
            "--step-log",
            str(missing),
            "--exit-after-demo",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"--step-log: cannot write {missing}" in proc.stderr
    assert "loading models" not in proc.stdout  # refused before the engine started
