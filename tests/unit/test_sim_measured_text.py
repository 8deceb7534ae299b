"""Measured-text acceptance (adaspec.sim.measured_text): a measure_acceptance report laid out by
output position, the fallback filling the gaps, windows drawing by global trace index
(SimConfig.request_offset), the statistical model left bit-identical, and
`sim_validate.py validate --measured-text` end to end on a synthetic "real" run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adaspec.contract import Policy
from adaspec.policy.base import StepOutcome
from adaspec.policy.baselines import FixedKPolicy
from adaspec.policy.factory import StepLimits
from adaspec.sim import (
    AcceptanceModel,
    AcceptanceSampler,
    MeasuredAcceptance,
    PositionDraws,
    SimConfig,
    Trace,
    load_builtin_profile,
    load_measured_acceptance,
    run_policy,
    simulate,
)
from adaspec.sim.acceptance import BoolArray, FloatArray
from adaspec.sim.fit import ObservedStep, fit_acceptance_steps, sampled_steps

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from replay.runs import sim_runs  # noqa: E402

CPU = load_builtin_profile("cpu-qwen-coder-estimate")
DOC = Policy(generation=1, tpot_slo_ms=500.0, tpot_budget_ms=450.0, max_draft_tokens=8)
FALLBACK = AcceptanceModel(
    bin_edges=[0.0, 0.5, 1.0], conf_mass=[3.0, 1.0], accept_prob=[0.2, 0.4], source="low"
)
EASY_TEXT = AcceptanceModel(
    bin_edges=[0.0, 0.5, 1.0], conf_mass=[1.0, 4.0], accept_prob=[0.6, 0.97], source="easy"
)


def _step(on: list[float], acc: list[bool], off: list[float]) -> dict[str, Any]:
    return {"on_conf": on, "on_acc": acc, "off_conf": off}


T, F = True, False
HAND_REPORT: dict[str, Any] = {
    "measured_on": "hand-built",
    "draft_len": 4,
    "steps": [
        [  # request 0, K = 4
            _step([0.9, 0.8, 0.3], [T, T, F], [0.6]),  # starts at 0: on 0-2, off 3
            _step([0.7, 0.6, 0.5, 0.4], [T, T, T, T], []),  # at 3: on 3-6, bonus 7 unseen
            _step([0.2], [F], [0.1, 0.15, 0.05]),  # at 8: on 8, off 9-11
            _step([0.95, 0.35], [T, F], [0.45, 0.55]),  # at 9: on 9-10, off 11 (nearer) - 12
        ],
        [_step([0.5], [F], [0.25, 0.35, 0.45])],  # request 1: on 0, off 1-3
    ],
}
N = None


def test_positions_map_exactly_and_the_fallback_fills_the_gaps() -> None:
    m = MeasuredAcceptance.from_report(HAND_REPORT, FALLBACK)
    r0, r1 = m.requests
    assert r0.on_conf == [0.9, 0.8, 0.3, 0.7, 0.6, 0.5, 0.4, N, 0.2, 0.95, 0.35, N, N]
    assert r0.on_acc == [T, T, F, T, T, T, T, N, F, T, F, N, N]
    assert r0.off_conf == [N, N, N, 0.6, N, N, N, N, N, 0.1, 0.15, 0.45, 0.55]
    assert (r1.on_conf, r1.on_acc, r1.off_conf) == (
        [0.5, N, N, N],
        [F, N, N, N],
        [N, 0.25, 0.35, 0.45],
    )
    assert r0.off_after == [
        [],
        [],
        [0.6],
        [],
        [],
        [],
        [],
        [],
        [0.1, 0.15, 0.05],
        [],
        [0.45, 0.55],
        [],
        [],
    ]
    assert r1.off_after == [[0.25, 0.35, 0.45], [], [], []]
    assert m.draft_len == 4 and m.fallback == FALLBACK

    n = 16
    got = m.sampler(3)
    ref = AcceptanceSampler(FALLBACK, 3)
    for r, text in enumerate(m.requests):
        on, acc, off = got.draw(r, n)
        f_on, f_acc, f_off = ref.draw(r, n)
        for p in range(n):
            seen = p < len(text.on_conf) and text.on_conf[p] is not None
            assert on[p] == (text.on_conf[p] if seen else f_on[p]), (r, p)
            assert acc[p] == (text.on_acc[p] if seen else f_acc[p]), (r, p)
            off_seen = p < len(text.off_conf) and text.off_conf[p] is not None
            assert off[p] == (text.off_conf[p] if off_seen else f_off[p]), (r, p)
    # a request the measurement never saw: the fallback's own draws for that index
    for a, b in zip(got.draw(2, n), ref.draw(2, n), strict=True):
        np.testing.assert_array_equal(a, b)
    # off path keyed by the rejection: row q, column depth − 1; NaN where not measured
    after = got.offpath_after(0, n, 3)
    want = np.full((n, 3), np.nan)
    want[2, :1], want[8], want[10, :2] = [0.6], [0.1, 0.15, 0.05], [0.45, 0.55]
    np.testing.assert_array_equal(after, want)
    assert np.isnan(got.offpath_after(2, n, 3)).all()  # an unmeasured request
    # fewer positions than measured: the prefix
    np.testing.assert_array_equal(got.draw(0, 5)[0], got.draw(0, n)[0][:5])

    # seeded: same seed, same arrays; another seed changes only the unmeasured positions
    again, other = m.sampler(3).draw(0, n), m.sampler(4).draw(0, n)
    for a, b in zip(got.draw(0, n), again, strict=True):
        np.testing.assert_array_equal(a, b)
    on3, on4 = got.draw(0, n)[0], other[0]
    measured = np.array([c is not None for c in r0.on_conf] + [False] * (n - 13))
    np.testing.assert_array_equal(on3[measured], on4[measured])
    assert np.all(on3[~measured] != on4[~measured])


def test_coverage_counts_the_decoded_positions() -> None:
    cov = MeasuredAcceptance.from_report(HAND_REPORT, FALLBACK).coverage([13, 4, 5])
    # decoded positions 1…len−1: 12 + 3 + 4; on path measured 1-6 and 8-10 of request 0,
    # off path 3 and 9-12 of request 0 and 1-3 of request 1
    assert cov == {
        "requests": 3.0,
        "requests_measured": 2.0,
        "on_path_share": 9 / 19,
        "off_path_share": 8 / 19,
    }


def test_json_round_trip() -> None:
    m = MeasuredAcceptance.from_report(HAND_REPORT, FALLBACK)
    assert MeasuredAcceptance.model_validate_json(m.model_dump_json()) == m


@pytest.mark.parametrize(
    ("steps", "match"),
    [
        ([[_step([0.5, 0.6], [F, T], [])]], r"steps\[0\]\[0\]: on_acc must be the accepted"),
        ([[_step([0.5], [T], [0.3])]], r"steps\[0\]\[0\]: off_conf after a step that rejected"),
        ([[], [_step([1.5], [F], [])]], r"steps\[1\]\[0\]: confidences must lie within"),
        ([[_step([0.5], [F, F], [])]], r"steps\[0\]\[0\]: on_conf and on_acc need the same"),
    ],
)
def test_malformed_steps_are_named(steps: list[list[dict[str, Any]]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MeasuredAcceptance.from_report({"steps": steps}, FALLBACK)


def test_report_file_errors_name_the_file_and_field(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match=r"nope\.json"):
        load_measured_acceptance(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not JSON"):
        load_measured_acceptance(bad)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"model": FALLBACK.model_dump()}))
    with pytest.raises(ValueError, match=r"old\.json: steps: Field required"):
        load_measured_acceptance(old)
    typed = tmp_path / "typed.json"
    typed.write_text(json.dumps({"steps": [[{"on_conf": ["x"], "on_acc": [True]}]]}))
    with pytest.raises(ValueError, match=r"typed\.json: steps\.0\.0\.on_conf\.0"):
        load_measured_acceptance(typed)


def _report(model: AcceptanceModel, out_lens: list[int], k: int, seed: int) -> dict[str, Any]:
    """What measure_acceptance would record on the texts `model` draws (one replica)."""
    steps = sampled_steps(model, out_lens, k, replicas=1, seed=seed)
    return {
        "measured_on": "synthetic texts on the replayed prompts of measured.json",
        "draft_len": k,
        "steps": [
            [_step(list(s.on_confidence), list(s.on_accepted), list(s.off_confidence)) for s in req]
            for req in steps
        ],
    }


def test_fallback_comes_from_the_flag_the_report_or_a_fit(tmp_path: Path) -> None:
    rep = _report(EASY_TEXT, [40] * 10, 8, seed=1)
    path = tmp_path / "rep.json"
    path.write_text(json.dumps({**rep, "model": EASY_TEXT.model_dump()}))
    assert load_measured_acceptance(path).fallback == EASY_TEXT
    assert load_measured_acceptance(path, FALLBACK).fallback == FALLBACK
    path.write_text(json.dumps(rep))
    loaded = load_measured_acceptance(path)
    assert loaded.source.endswith(rep["measured_on"])
    obs = [
        [ObservedStep(s["on_conf"], s["on_acc"], s["off_conf"]) for s in req]
        for req in rep["steps"]
    ]
    assert loaded.fallback == fit_acceptance_steps(obs, source=rep["measured_on"])


# ----------------------------------------------------------------------------- simulator


def _trace(out_lens: list[int]) -> Trace:
    n = len(out_lens)
    return Trace(
        "t",
        np.linspace(0.0, 3.0, n),
        np.full(n, 24, dtype=np.int64),
        np.asarray(out_lens, dtype=np.int64),
    )


class _Recording:
    """An AcceptanceSource that records which request indices the simulator draws."""

    def __init__(self, model: AcceptanceModel) -> None:
        self.model = model
        self.calls: list[tuple[int, int]] = []

    def sampler(self, seed: int) -> PositionDraws:
        return _RecordingSampler(self.model.sampler(seed), self.calls)


class _RecordingSampler:
    def __init__(self, inner: AcceptanceSampler, calls: list[tuple[int, int]]) -> None:
        self.inner, self.calls = inner, calls

    def draw(self, request_index: int, n: int) -> tuple[FloatArray, BoolArray, FloatArray]:
        self.calls.append((request_index, n))
        return self.inner.draw(request_index, n)


@pytest.mark.parametrize(("rounds", "offset"), [(3, 0), (1, 10), (2, 5)])
def test_windows_draw_by_global_trace_index(rounds: int, offset: int) -> None:
    lens = [29, 5, 17, 9, 25, 13, 21]  # distinct: the span drawn identifies the request
    tr = _trace(lens)
    src = _Recording(FALLBACK)
    cfg = SimConfig(max_batch=2, request_offset=offset)
    sim_runs(tr, CPU, ["fixed-3"], 500.0, 450.0, cfg, acceptance=src, rounds=rounds)
    got = sorted(src.calls)
    assert [i for i, _ in got] == [offset + g for g in range(len(lens))]
    extra = {n - lens[i - offset] for i, n in got}  # span = output length + K + 2
    assert extra == {3 + 2}


def test_measured_text_decides_acceptance_and_offset_selects_the_request() -> None:
    """The fallback accepts every draft; request 0's measured text rejects every one. Request
    0 simulated alone accepts nothing; the same request simulated as global index 1 (not
    measured) accepts all it verifies."""
    accept_all = AcceptanceModel(
        bin_edges=[0.0, 0.5, 1.0], conf_mass=[1.0, 1.0], accept_prob=[1.0, 1.0]
    )
    out = 20
    rejecting = [_step([0.9], [F], [0.8] * 7) for _ in range(out)]
    m = MeasuredAcceptance.from_report({"steps": [rejecting]}, accept_all)
    tr = _trace([out])
    for kind in ("fixed-3", "threshold"):
        res = run_policy(kind, tr, CPU, DOC, m, SimConfig())
        assert res.verified > 0 and res.accepted == 0, kind
        other = run_policy(kind, tr, CPU, DOC, m, SimConfig(request_offset=1))
        assert other.verified > 0 and other.accepted == other.verified, kind


class _SeenConf(FixedKPolicy):
    """fixed-K that keeps the confidences each step showed it."""

    def __init__(self, k: int) -> None:
        super().__init__(k)
        self.confs: list[FloatArray] = []

    def observe(self, outcome: StepOutcome) -> None:
        self.confs.append(outcome.conf.copy())
        super().observe(outcome)


def test_off_path_confidence_follows_the_steps_rejection() -> None:
    """Measured with K = 6: rejected at 2 (then 0.71, 0.72 at positions 3, 4), rejected at 3
    (then 0.21… from position 4). A simulated fixed-4 step from position 1 is rejected at 2:
    at position 4 (depth 2) it must see 0.72, the draft after *its* rejection, not 0.21, the
    latest value measured at position 4 (what draw() alone gives)."""
    rep = {
        "steps": [
            [
                _step([0.9, 0.95, 0.4], [T, T, F], [0.71, 0.72, 0.73]),  # at 0
                _step([0.5], [F], [0.21, 0.22, 0.23, 0.24, 0.25]),  # at 3
                _step([0.6] * 6, [T] * 6, []),  # at 4
            ]
        ]
    }
    m = MeasuredAcceptance.from_report(rep, FALLBACK)
    assert m.sampler(0).draw(0, 12)[2][4] == 0.21
    pol = _SeenConf(4)
    tr = _trace([6])
    res = simulate(tr, pol, StepLimits(4, None), CPU.time_model, m, SimConfig())
    assert res.accepted == 1 + 0 + 4
    np.testing.assert_array_equal(pol.confs[0][0], [0.95, 0.4, 0.71, 0.72])  # from 1
    np.testing.assert_array_equal(pol.confs[1][0], [0.5, 0.21, 0.22, 0.23])  # from 3
    np.testing.assert_array_equal(pol.confs[2][0], [0.6] * 4)  # from 4


def _same(a: Any, b: Any) -> None:
    assert [(r.first_token_s, r.finish_s) for r in a.requests] == [
        (r.first_token_s, r.finish_s) for r in b.requests
    ]
    assert a.steps == b.steps
    assert (a.proposed, a.verified, a.accepted) == (b.proposed, b.verified, b.accepted)


@pytest.mark.parametrize("kind", ["fixed-3", "threshold", "adaptive"])
def test_statistical_model_is_unchanged(kind: str) -> None:
    """The model through the new interface, an empty measurement over it, and sim_runs with
    one round all give the same run as the model simulated directly with the same seed."""
    tr = _trace([29, 5, 17, 9, 25, 13, 21])
    cfg = SimConfig(max_batch=3, noise_sigma=0.1, seed=7, record_spec_lens=True)
    direct = run_policy(kind, tr, CPU, DOC, EASY_TEXT, cfg)
    empty = MeasuredAcceptance(requests=[], fallback=EASY_TEXT)
    _same(direct, run_policy(kind, tr, CPU, DOC, empty, cfg))
    via = sim_runs(tr, CPU, [kind], 500.0, 450.0, cfg, acceptance=EASY_TEXT, rounds=1)[kind]
    assert via.sim is not None
    _same(direct, via.sim)
    assert via.summary == direct.summary(0.5)


# ----------------------------------------------------------------------------- sim_validate


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "bench/sim_validate.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sim_validate_measured_text_end_to_end(tmp_path: Path) -> None:
    """A "real" run made by simulating measured texts (easy) over a hard fallback: validating
    with --measured-text reproduces it exactly; with the fallback model alone it does not."""
    lens = [12, 20, 9, 16, 24, 14]
    csv = tmp_path / "trace.csv"
    csv.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        + "".join(f"2023-11-16 18:17:00.{i}000000,{30 + 7 * i},{n}\n" for i, n in enumerate(lens))
    )
    rep = _report(EASY_TEXT, lens, 8, seed=2)
    rep_path = tmp_path / "report.json"
    rep_path.write_text(json.dumps(rep))
    fb_path = tmp_path / "fallback.json"
    fb_path.write_text(FALLBACK.model_dump_json())
    kinds = ["off", "fixed-3", "threshold"]
    cfg = SimConfig(max_batch=4, seed=0, prefill_chunk_tokens=512, prefill_min_chunk=32)
    truth = sim_runs(
        _trace_from(csv), CPU, kinds, 500.0, 450.0, cfg,
        acceptance=MeasuredAcceptance.from_report(rep, FALLBACK), max_draft=8, rounds=2,
    )  # fmt: skip
    measured = tmp_path / "measured.json"
    measured.write_text(
        json.dumps(
            {"engine": "real", "trace": str(csv), "seed": 0, "max_batch": 4, "max_draft": 8,
             "rounds": 2, "tpot_slo_ms": 500.0, "tpot_budget_ms": 450.0,
             "prefill_chunk_tokens": 512, "prefill_min_chunk": 32,
             "policies": {k: {"summary": r.summary.model_dump()} for k, r in truth.items()}}
        )
    )  # fmt: skip
    out = tmp_path / "val-text.json"
    proc = _run("--noise", "0", "--acceptance", str(fb_path), "validate", "--measured",
                str(measured), "--measured-text", str(rep_path), "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "worst |error|: P90 TPOT 0.0%, throughput 0.0%" in proc.stdout
    assert "measured text: 6 of 6 requests" in proc.stdout
    doc = json.loads(out.read_text())
    src = doc["acceptance_source"]
    assert src["kind"] == "measured_text" and src["report"] == str(rep_path)
    assert src["fallback_source"] == "low" and src["coverage"]["requests_measured"] == 6

    out_model = tmp_path / "val-model.json"
    proc = _run("--noise", "0", "--acceptance", str(fb_path), "validate", "--measured",
                str(measured), "--out", str(out_model))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out_model.read_text())
    assert doc["acceptance_source"]["kind"] == "model"
    assert doc["policies"]["off"]["throughput_error"] == 0.0  # no drafts: the text is moot
    # the hard fallback alone: far fewer accepted drafts than on the measured (easy) texts
    assert doc["policies"]["fixed-3"]["throughput_error"] < -0.05

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"steps": [[_step([0.5], [T], [0.2])]]}))
    proc = _run("validate", "--measured", str(measured), "--measured-text", str(bad))
    assert proc.returncode == 2
    assert "--measured-text: measured-text report" in proc.stderr
    assert "steps[0][0]: off_conf after a step that rejected nothing" in proc.stderr


def _trace_from(csv: Path) -> Trace:
    from adaspec.sim import load_trace

    return load_trace(str(csv))
