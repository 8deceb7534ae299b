"""bench/gpu_check.py end to end in its CPU tiny mode, as the GPU machine runs it (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaspec.contract import load_profile
from adaspec.sim import load_builtin_profile

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _run(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(180)
def test_tiny_cpu_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    started = time.monotonic()
    proc = _run("--device", "cpu", "--tiny", "--out", str(out))
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 90, f"tiny mode took {elapsed:.0f} s (budget 60 s on an idle machine)"

    # Progress lines carry timestamps; the comparison table is printed.
    assert "[gpu_check " in proc.stdout
    assert "tok/fwd" in proc.stdout and "TPOT p90" in proc.stdout

    # The Profile is a valid contract document the simulator can load.
    prof = load_profile(out / "profile.json")
    assert load_builtin_profile(str(out / "profile.json")) == prof
    for m in (prof.time_model.draft, prof.time_model.verify):
        assert m.fit is not None and m.fit.n_test >= 1
        assert m.intercept_ms >= 0.0
    cal = prof.calibration
    # The calibration reflects the synthetic model of the real pair (~85 % greedy acceptance).
    assert cal.counts is not None and sum(cal.counts) == 200 * 64
    mean_acc = sum(p * c for p, c in zip(cal.accept_prob, cal.counts, strict=True)) / sum(
        cal.counts
    )
    assert 0.78 < mean_acc < 0.93

    res = json.loads((out / "results.json").read_text())
    rows = {(r["policy"], r["batch"]): r for r in res["rows"]}
    assert set(rows) == {(p, b) for p in ("off", "fixed-2", "adaptive") for b in (1, 2)}
    for b in (1, 2):
        off, fixed = rows[("off", b)], rows[("fixed-2", b)]
        assert off["skipped"] is None and fixed["skipped"] is None
        # Plain decoding: one token per target forward, nothing verified.
        assert off["tokensPerTargetForward"] == 1.0 and off["meanVerifiedK"] == 0.0
        # Fixed K=2 verifies 2 drafts per request-step; synthetic acceptance makes it emit more.
        assert fixed["meanVerifiedK"] == 2.0
        assert 1.0 < fixed["tokensPerTargetForward"] <= 3.0
        assert 0.5 < fixed["acceptRate"] <= 1.0
        assert rows[("adaptive", b)]["requests"] == b  # one wave of B requests, all finished
    assert res["profiling"]["verify"]["points"] == 12  # 2 batches × 2 q × 3 contexts


def test_rejects_bad_flags_with_a_clear_message() -> None:
    proc = _run("--device", "cpu", "--tiny", "--ks", "9", "--max-draft", "4", timeout=60)
    assert proc.returncode == 2
    assert "--ks: 9 exceeds --max-draft 4" in proc.stderr
    proc = _run("--device", "cpu", "--tiny", "--batch-sizes", "1,x", timeout=60)
    assert proc.returncode == 2
    assert "expected positive integers" in proc.stderr and "'x'" in proc.stderr
