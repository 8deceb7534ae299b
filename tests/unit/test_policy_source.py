"""Policy file hot reload: valid files apply, invalid ones keep the last good policy."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from adaspec.contract import SpecMode
from adaspec.policy_source import PolicySource, default_policy


def policy_doc(generation: int, **kw: object) -> str:
    doc: dict[str, object] = {
        "generation": generation,
        "mode": "adaptive",
        "tpotSloMs": 300.0,
        "tpotBudgetMs": 250.0,
        "maxDraftTokens": 6,
        "reason": f"gen {generation}",
    }
    doc.update(kw)
    return json.dumps(doc)


class Recorder:
    def __init__(self) -> None:
        self.errors = 0
        self.invalid: list[bool] = []

    def on_error(self) -> None:
        self.errors += 1

    def on_invalid(self, flag: bool) -> None:
        self.invalid.append(flag)


def test_no_file_serves_the_flag_defaults() -> None:
    src = PolicySource(default_policy(tpot_slo_ms=400.0))
    policy, version = src.current()
    assert version == 0
    assert policy.generation == 0
    assert policy.mode is SpecMode.adaptive
    assert policy.tpot_budget_ms == 400.0  # budget defaults to the SLO
    assert src.poll() is False


def test_valid_file_applies_once_per_content_change(tmp_path: Path) -> None:
    f = tmp_path / "policy.json"
    f.write_text(policy_doc(3))
    src = PolicySource(default_policy(), f)
    policy, v1 = src.current()
    assert policy.generation == 3 and policy.max_draft_tokens == 6
    assert src.poll() is False  # same content: nothing re-applied
    assert src.current()[1] == v1
    f.write_text(policy_doc(4, maxDraftTokens=2))
    assert src.poll() is True
    policy, v2 = src.current()
    assert (policy.generation, policy.max_draft_tokens, v2) == (4, 2, v1 + 1)


def test_invalid_file_keeps_last_good_and_reports(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = tmp_path / "policy.json"
    f.write_text(policy_doc(1))
    src = PolicySource(default_policy(), f)
    rec = Recorder()
    src.attach(rec.on_error, rec.on_invalid)
    assert rec.invalid == [False]
    good, version = src.current()

    f.write_text(policy_doc(2, maxDraftTokens=99))
    with caplog.at_level(logging.ERROR, logger="adaspec.policy_source"):
        assert src.poll() is False
    assert src.current() == (good, version)
    assert src.invalid and rec.errors == 1 and rec.invalid == [False, True]
    assert "maxDraftTokens" in caplog.text  # the log line names the field
    assert len(caplog.records) == 1

    assert src.poll() is False  # the same bad file is not counted twice
    assert rec.errors == 1

    f.write_text("{not json")
    assert src.poll() is False
    assert rec.errors == 2 and rec.invalid == [False, True]

    f.write_text(policy_doc(5))
    assert src.poll() is True
    assert src.current()[0].generation == 5
    assert not src.invalid and rec.invalid == [False, True, False]


def test_rejections_before_attach_are_replayed(tmp_path: Path) -> None:
    f = tmp_path / "policy.json"
    f.write_text('{"generation": -1, "tpotSloMs": 1, "tpotBudgetMs": 1}')
    src = PolicySource(default_policy(tpot_slo_ms=123.0), f)
    assert src.current()[0].tpot_slo_ms == 123.0  # fell back to the flags
    rec = Recorder()
    src.attach(rec.on_error, rec.on_invalid)
    assert rec.errors == 1 and rec.invalid == [True]


def test_missing_file_keeps_current_policy_without_error(tmp_path: Path) -> None:
    f = tmp_path / "absent.json"
    src = PolicySource(default_policy(), f)
    rec = Recorder()
    src.attach(rec.on_error, rec.on_invalid)
    assert src.poll() is False
    assert rec.errors == 0 and not src.invalid
    f.write_text(policy_doc(7))
    assert src.poll() is True and src.current()[0].generation == 7


def test_generation_going_backwards_is_applied_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = tmp_path / "policy.json"
    f.write_text(policy_doc(10))
    src = PolicySource(default_policy(), f)
    f.write_text(policy_doc(2))
    with caplog.at_level(logging.WARNING, logger="adaspec.policy_source"):
        assert src.poll() is True
    assert src.current()[0].generation == 2
    assert "backwards" in caplog.text


def _configmap_dir(root: Path, name: str, content: str) -> None:
    """Kubernetes layout: <root>/..<ts>/policy.json, ..data -> ..<ts>, policy.json -> ..data/…"""
    ts = root / f"..{name}"
    ts.mkdir()
    (ts / "policy.json").write_text(content)
    tmp = root / "..data_tmp"
    tmp.symlink_to(ts.name)
    os.replace(tmp, root / "..data")  # the atomic swap the kubelet does


def test_configmap_symlink_swap_is_detected(tmp_path: Path) -> None:
    _configmap_dir(tmp_path, "2026_01", policy_doc(1))
    (tmp_path / "policy.json").symlink_to("..data/policy.json")
    src = PolicySource(default_policy(), tmp_path / "policy.json")
    assert src.current()[0].generation == 1
    _configmap_dir(tmp_path, "2026_02", policy_doc(2))
    assert src.poll() is True
    assert src.current()[0].generation == 2


def test_background_watcher_picks_up_changes(tmp_path: Path) -> None:
    f = tmp_path / "policy.json"
    f.write_text(policy_doc(1))
    src = PolicySource(default_policy(), f, poll_interval_s=0.05)
    src.start()
    try:
        f.write_text(policy_doc(2))
        deadline = time.monotonic() + 5.0
        while src.current()[0].generation != 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert src.current()[0].generation == 2
    finally:
        src.stop()
