"""`adaspec profile --quick` on the real pair, as the operator's profiling Job runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from adaspec.contract import load_profile, parse_profile
from adaspec.models import DRAFT, TARGET, resolve_model

pytestmark = pytest.mark.integration


def test_quick_profile_of_the_real_pair(tmp_path: Path) -> None:
    resolve_model("default-target")  # obtain the pair first so the timeout covers profiling only
    resolve_model("default-draft")
    out = tmp_path / "profile.json"
    term = tmp_path / "termination-log"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "adaspec.cli",
            "profile",
            "--quick",
            # One thread: on a shared CI machine two OpenMP threads stall each other whenever
            # another process takes a core (measured 6× slower here); the profile is still real.
            "--threads",
            "1",
            "--print-json",
            "--out",
            str(out),
            "--termination-log",
            str(term),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert len(last.encode()) <= 4096
    profile = parse_profile(last)
    assert term.read_text() == last
    assert load_profile(out) == profile

    assert profile.target.sha256 == TARGET.gguf_sha256
    assert profile.draft.sha256 == DRAFT.gguf_sha256
    assert profile.hardware.device == "cpu" and profile.hardware.threads == 1
    for step in (profile.time_model.draft, profile.time_model.verify):
        assert step.fit is not None and step.fit.n_test >= 1 and step.fit.n_train >= 4
        assert step.intercept_ms >= 0 and step.per_token_ms >= 0
        assert step.per_row_ms >= 0 and step.per_ctx_ktoken_ms >= 0
        assert step.intercept_ms + step.per_row_ms + step.per_token_ms > 1.0  # a real forward
    # A 1.5B verification of one token costs more than a 0.5B draft step of one token.
    t = profile.time_model
    one = lambda m: m.intercept_ms + m.per_row_ms + m.per_token_ms  # noqa: E731
    assert one(t.verify) > one(t.draft)
    cal = profile.calibration
    assert cal.counts is not None and sum(cal.counts) >= 10
    assert cal.auc is None or 0.0 <= cal.auc <= 1.0
    # Real drafts are right most of the time (MODELS.md: ~80 % greedy acceptance).
    mean = sum(p * n for p, n in zip(cal.accept_prob, cal.counts, strict=True)) / sum(cal.counts)
    assert mean > 0.5
    assert "time verification steps" in proc.stderr  # progress went to stderr
