"""AdaSpec's decision for vLLM's adaptive verification (MRV2), without vLLM: the pure planner
(verify_plan), the per-worker verifier state (verifier), the settings and the engine switch."""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from adaspec.backends.vllm.config import WORKER_CLS, VllmSettings, engine_kwargs
from adaspec.backends.vllm.settings import (
    SchedulerSettings,
    VerifierSettings,
    parse_settings,
    request_cap,
)
from adaspec.backends.vllm.verifier import AdaSpecVerifier
from adaspec.backends.vllm.verify_plan import (
    VerifierUnsupportedError,
    calibrate,
    check_verifier_platform,
    plan_for_policy,
    plan_verification,
    profile_draft_s,
    profile_step_times,
    rank_slots,
    table_step_times,
)
from adaspec.contract import (
    AcceptanceCalibration,
    Hardware,
    ModelIdentity,
    Policy,
    Profile,
    SpecMode,
    StepTimeModel,
    TimeModel,
)
from adaspec.policy.time_model import StepTimePredictor

TIMES = StepTimePredictor(
    TimeModel(
        draft=StepTimeModel(intercept_ms=2.0, per_row_ms=0.5),
        verify=StepTimeModel(intercept_ms=30.0, per_token_ms=4.0, per_ctx_ktoken_ms=2.0),
    )
)


def _rng_case(seed: int, n_req: int = 5, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.2, 0.98, size=(n_req, k)), rng.integers(0, k + 1, size=n_req)


def _linear_steps(n_max: int, t0: float = 0.04, per: float = 0.004) -> np.ndarray:
    return t0 + per * np.arange(n_max + 1, dtype=np.float64)


# ----------------------------------------------------------------------------- ranking


def test_slots_are_ranked_by_survival_and_stay_within_each_request() -> None:
    accept = np.array([[0.9, 0.9, 0.9], [0.5, 0.99, 0.99], [0.95, 0.2, 0.9]])
    drafts = np.array([3, 2, 1])
    r = rank_slots(accept, drafts)
    surv = np.cumprod(accept, axis=1)
    assert len(r.req) == int(drafts.sum())
    assert np.all(np.diff(r.survival) <= 0)
    np.testing.assert_allclose(r.survival, surv[r.req, r.pos])
    assert all(p < drafts[q] for q, p in zip(r.req, r.pos, strict=True))
    # A global top-n is a prefix of each request's drafts (survival falls along a request).
    for n in range(len(r.req) + 1):
        for q in range(3):
            got = sorted(r.pos[:n][r.req[:n] == q])
            assert got == list(range(len(got)))
    with pytest.raises(ValueError, match="one row per request"):
        rank_slots(accept, np.array([1, 2]))


# ----------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("seed", range(6))
def test_unconstrained_budget_maximises_expected_tokens_per_second(seed: int) -> None:
    accept, drafts = _rng_case(seed)
    emits = np.ones(len(drafts), dtype=bool)
    ranked = rank_slots(accept, drafts)
    n_max = int(drafts.sum())
    steps = _linear_steps(n_max, per=0.002 + 0.002 * seed)
    plan = plan_verification(ranked, emits, steps, None)
    # Brute force over every budget with the per-slot survival computed here.
    surv = np.sort(np.cumprod(accept, axis=1)[np.arange(4)[None, :] < drafts[:, None]])[::-1]
    goodput = [(len(drafts) + surv[:n].sum()) / steps[n] for n in range(n_max + 1)]
    assert plan.draft_budget == int(np.argmax(goodput)) == plan.free_budget
    assert plan.goodput == pytest.approx(max(goodput))
    assert int(plan.per_request.sum()) == plan.draft_budget
    assert np.all(plan.per_request <= drafts)
    assert not plan.infeasible


def test_guard_lowers_the_budget_to_protect_a_request_without_drafts() -> None:
    """Request 1 has no drafts (E = 1): every verified draft of request 0 lengthens its step.
    A budget between T(0) and the free plan's worst TPOT cuts verification, but not to zero."""
    accept = np.array([[0.95, 0.95, 0.95, 0.95], [0.9, 0.9, 0.9, 0.9]])
    drafts = np.array([4, 0])
    emits = np.array([True, True])
    ranked = rank_slots(accept, drafts)
    steps = _linear_steps(4)
    free = plan_verification(ranked, emits, steps, None)
    assert free.draft_budget == 4
    assert free.worst_tpot_s == pytest.approx(steps[4])  # request 1: the whole step per token
    budget = (steps[1] + steps[2]) / 2
    g = plan_verification(ranked, emits, steps, budget)
    assert 0 < g.draft_budget < free.draft_budget and g.draft_budget == 1
    assert g.worst_tpot_s <= budget and not g.infeasible
    assert g.free_budget == free.draft_budget
    assert list(g.per_request) == [1, 0]
    # The same budget with the second request mid-prefill (emits nothing): nobody to protect.
    prefill = plan_verification(ranked, np.array([True, False]), steps, budget)
    assert prefill.draft_budget == 4


def test_guarded_budget_is_the_best_feasible_one() -> None:
    """Two requests with drafts, one with low survival. Under a budget the free plan breaks,
    the guard takes the highest-goodput budget whose worst time per token fits; here that is
    a *longer* verification: the low-survival request needs its own drafts verified to emit
    more than one token per step (brute force over every budget)."""
    accept = np.array([[0.97] * 4, [0.3] * 4])
    drafts = np.array([4, 4])
    emits = np.ones(2, dtype=bool)
    ranked = rank_slots(accept, drafts)
    steps = _linear_steps(8, t0=0.04, per=0.001)
    free = plan_verification(ranked, emits, steps, None)
    budget = free.worst_tpot_s * 0.97
    g = plan_verification(ranked, emits, steps, budget)
    assert g.draft_budget != free.draft_budget and g.worst_tpot_s <= budget
    e = [
        1.0 + np.bincount(ranked.req[:n], weights=ranked.survival[:n], minlength=2)
        for n in range(9)
    ]
    ok = [n for n in range(9) if steps[n] / e[n].min() <= budget]
    best = max(ok, key=lambda n: e[n].sum() / steps[n])
    assert g.draft_budget == best


def test_infeasible_step_takes_the_lowest_worst_time_per_token() -> None:
    accept = np.array([[0.9] * 3, [0.9] * 3])
    ranked = rank_slots(accept, np.array([3, 3]))
    steps = _linear_steps(6, t0=0.05, per=0.001)
    g = plan_verification(ranked, np.ones(2, dtype=bool), steps, 0.01)  # < T(0)
    assert g.infeasible
    e = [
        1.0 + np.bincount(ranked.req[:n], weights=ranked.survival[:n], minlength=2).min()
        for n in range(7)
    ]
    assert g.draft_budget == int(np.argmin(steps / np.array(e)))


def test_policy_modes() -> None:
    accept, drafts = _rng_case(3)
    ranked = rank_slots(accept, drafts)
    emits = np.ones(len(drafts), dtype=bool)
    steps = _linear_steps(int(drafts.sum()))
    kw: dict[str, Any] = {"generation": 1, "tpot_slo_ms": 1000.0, "tpot_budget_ms": 900.0}
    off = plan_for_policy(Policy(mode=SpecMode.off, **kw), ranked, emits, steps)
    fixed = plan_for_policy(Policy(mode=SpecMode.fixed, **kw), ranked, emits, steps)
    assert off.draft_budget == 0 and fixed.draft_budget == int(drafts.sum())
    ada = plan_for_policy(Policy(**kw), ranked, emits, steps)
    assert ada.draft_budget == plan_verification(ranked, emits, steps, 0.9).draft_budget
    tight = Policy(generation=1, tpot_slo_ms=1.0, tpot_budget_ms=1.0)
    assert plan_for_policy(tight, ranked, emits, steps).infeasible


# ----------------------------------------------------------------------------- step times


def test_profile_step_times_count_tokens_and_their_context() -> None:
    """Decoding rows and draft slots go through the verify model; a prompt chunk in the same
    forward costs the prefill model without its intercept."""
    times = StepTimePredictor(
        TIMES.model.model_copy(
            update={"prefill": StepTimeModel(intercept_ms=50.0, per_token_ms=0.5)}
        )
    )
    accept = np.array([[0.9, 0.8], [0.7, 0.6], [0.99, 0.99]])
    drafts = np.array([2, 1, 0])
    context = np.array([100.0, 40.0, 7.0])
    base = np.array([1, 1, 3])  # request 2: a 3-token prompt chunk
    ranked = rank_slots(accept, drafts)
    draft_s = profile_draft_s(times, context, 2)
    assert draft_s == pytest.approx(times.draft_pass(3, 147.0) + times.draft_pass(3, 150.0))
    got = profile_step_times(times, ranked, context, base, draft_s, 3)
    chunk_s = 3 * 0.5e-3  # no intercept, no context term in this prefill model
    for n in range(4):
        work = 100.0 + 40.0
        for q, p in zip(ranked.req[:n], ranked.pos[:n], strict=True):
            work += context[q] + base[q] + p
        assert got[n] == pytest.approx(draft_s + chunk_s + times.verify(2, 2 + n, work))


def test_table_step_times() -> None:
    draft_ms = np.array([0.0, 3.0, 4.0, 5.0])
    verify_ms = np.arange(20, dtype=np.float64) + 10.0
    np.testing.assert_allclose(
        table_step_times(draft_ms, verify_ms, 2, 2, 3), (4.0 + np.array([12, 13, 14, 15])) / 1e3
    )
    with pytest.raises(ValueError, match="cost tables"):
        table_step_times(draft_ms, verify_ms, 2, 18, 3)


def test_calibration_bins_match_the_profile() -> None:
    cal = AcceptanceCalibration(bin_edges=[0.0, 0.5, 0.8, 1.0], accept_prob=[0.2, 0.6, 0.9])
    got = calibrate(np.array([[0.0, 0.49, 0.5], [0.79, 0.8, 1.0]]), cal)
    np.testing.assert_allclose(got, [[0.2, 0.2, 0.6], [0.6, 0.9, 0.9]])


# ----------------------------------------------------------------------------- platform


def test_platform_check_refuses_everything_but_cuda_model_runner_v2() -> None:
    with pytest.raises(VerifierUnsupportedError, match="platform is 'cpu'"):
        check_verifier_platform("cpu", None)
    with pytest.raises(VerifierUnsupportedError, match="VLLM_USE_V2_MODEL_RUNNER='0'"):
        check_verifier_platform("cuda", "0")
    check_verifier_platform("cuda", None)
    check_verifier_platform("cuda", "1")


# ----------------------------------------------------------------------------- settings


def _profile() -> Profile:
    return Profile(
        created_at="2026-01-01T00:00:00Z",
        hardware=Hardware(device="cuda", threads=1, backend="vllm"),
        target=ModelIdentity(name="t"),
        draft=ModelIdentity(name="d"),
        time_model=TIMES.model,
        calibration=AcceptanceCalibration(bin_edges=[0.0, 0.5, 1.0], accept_prob=[0.3, 0.8]),
    )


def test_settings_refuse_unknown_fields_and_bad_caps() -> None:
    with pytest.raises(ValidationError, match="polcy_file"):
        SchedulerSettings.model_validate({"k_max": 4, "polcy_file": "x"})
    with pytest.raises(ValidationError, match="acceptance"):
        VerifierSettings.model_validate({"acceptance": "magic"})
    with pytest.raises(ValueError, match=r"additional_config\['adaspec'\]"):
        parse_settings({})
    assert parse_settings({"adaspec": {"k_max": 3}}).k_max == 3
    assert request_cap(None) is None and request_cap({"other": 1}) is None
    assert request_cap({"adaspec_max_draft": 0}) == 0
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(ValueError, match="adaspec_max_draft"):
            request_cap({"adaspec_max_draft": bad})


def test_engine_switch_adds_adaptive_verification_only_when_asked(tmp_path: Path) -> None:
    ada = Policy(generation=1, tpot_slo_ms=100, tpot_budget_ms=90, max_draft_tokens=4)
    base: dict[str, Any] = {"target": tmp_path / "t", "draft": tmp_path / "d", "policy": ada}
    plain = engine_kwargs(VllmSettings(**base))
    assert plain["async_scheduling"] is False
    assert "worker_cls" not in plain
    assert "enable_adaptive_verification" not in plain["speculative_config"]
    assert "verifier" not in plain["additional_config"]["adaspec"]
    v = VerifierSettings(acceptance="profile", step_cost="vllm")
    kw = engine_kwargs(
        VllmSettings(**base, profile=_profile(), enforce_eager=False, adaptive_verification=v)
    )
    assert kw["worker_cls"] == WORKER_CLS
    assert kw["speculative_config"]["enable_adaptive_verification"] is True
    assert kw["additional_config"]["adaspec"]["verifier"] == {
        "acceptance": "profile",
        "step_cost": "vllm",
    }
    assert kw["enforce_eager"] is False
    with pytest.raises(ValueError, match="enforce_eager=False"):
        engine_kwargs(VllmSettings(**base, profile=_profile(), adaptive_verification=v))
    with pytest.raises(ValueError, match=r"adaptive_verification.acceptance='profile'"):
        engine_kwargs(VllmSettings(**base, enforce_eager=False, adaptive_verification=v))
    with pytest.raises(ValueError, match="use_plugin=True"):
        engine_kwargs(
            VllmSettings(**base, use_plugin=False, enforce_eager=False, adaptive_verification=v)
        )
    with pytest.raises(ValueError, match="async_scheduling"):
        engine_kwargs(VllmSettings(**base, extra={"async_scheduling": True}))


# ----------------------------------------------------------------------------- the verifier


def test_verifier_follows_the_live_policy_and_records_its_decisions(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.json"
    loose = Policy(generation=1, tpot_slo_ms=1000.0, tpot_budget_ms=900.0, max_draft_tokens=4)
    policy_file.write_text(loose.model_dump_json(by_alias=True))
    settings = SchedulerSettings(
        k_max=4,
        policy_file=str(policy_file),
        profile_json=_profile().to_json(),
        poll_s=0.01,
        trace_file=str(tmp_path / "trace.jsonl"),
        verifier=VerifierSettings(),
    )
    ver = AdaSpecVerifier(settings)
    accept = np.array([[0.95] * 4, [0.9] * 4])
    args: dict[str, Any] = {
        "accept": accept,
        "drafts": np.array([4, 0]),
        "emits": np.ones(2, dtype=bool),
        "context": np.array([50.0, 60.0]),
        "base_tokens": np.array([1, 1]),
        "max_budget": 100,
        "cost_tables": None,
        "vllm_budget": 4,
    }
    free = ver.decide(**args)
    assert free.draft_budget == free.free_budget > 1
    steps = profile_step_times(
        TIMES,
        rank_slots(accept, np.array([4, 0])),
        np.array([50.0, 60.0]),
        np.array([1, 1]),
        profile_draft_s(TIMES, np.array([50.0, 60.0]), 4),
        4,
    )
    tight = Policy(
        generation=2,
        tpot_slo_ms=1000.0,
        tpot_budget_ms=float(steps[1] + steps[2]) / 2 * 1000.0,
        max_draft_tokens=4,
    )
    policy_file.write_text(tight.model_dump_json(by_alias=True))
    os.utime(policy_file, (time.time() + 5, time.time() + 5))  # a new mtime, whatever the fs
    time.sleep(0.02)
    guarded = ver.decide(**args)
    assert guarded.draft_budget == 1 < guarded.free_budget
    assert ver.stats.steps == 2 and ver.stats.guard_lowered == 1
    assert ver.stats.drafts_verified == free.draft_budget + 1
    assert ver.stats.vllm_would_verify == 8
    recs = [json.loads(x) for x in (tmp_path / "trace.jsonl.verify.jsonl").read_text().splitlines()]
    assert [(r["generation"], r["budget"]) for r in recs] == [(1, free.draft_budget), (2, 1)]
    # vLLM's cost tables instead of the Profile: needs the tables.
    ver_tables = AdaSpecVerifier(
        settings.model_copy(update={"verifier": VerifierSettings(step_cost="vllm")})
    )
    with pytest.raises(RuntimeError, match="cost tables"):
        ver_tables.decide(**args)
    tables = (np.full(8, 1.0), np.arange(200, dtype=np.float64) * 0.5 + 20.0)
    assert ver_tables.decide(**{**args, "cost_tables": tables}).draft_budget >= 0


def test_verifier_needs_a_profile_for_profile_sources() -> None:
    for field in ("acceptance", "step_cost"):
        s = SchedulerSettings(k_max=4, verifier=VerifierSettings(**{field: "profile"}))
        with pytest.raises(ValueError, match=f"adaptive_verification.{field}='profile'"):
            AdaSpecVerifier(s)
    with pytest.raises(ValueError, match="verifier"):
        AdaSpecVerifier(SchedulerSettings(k_max=4))


def test_every_budget_is_reachable_by_some_policy() -> None:
    """Sanity of the search space: each n in 0..n_max is chosen for some budget or step curve
    (the plan is not stuck at the ends)."""
    accept = np.array([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]])
    ranked = rank_slots(accept, np.array([3, 3]))
    emits = np.ones(2, dtype=bool)
    seen = set()
    for t0, per in itertools.product([0.01, 0.05, 0.2], [0.0005, 0.003, 0.01, 0.05]):
        seen.add(plan_verification(ranked, emits, _linear_steps(6, t0, per), None).draft_budget)
    assert len(seen) >= 4
