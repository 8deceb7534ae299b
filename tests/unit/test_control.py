"""The pure SLO controller, driven with a fake clock (plain floats passed as `now`)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest

from adaspec.contract import Policy, SpecMode, StepTimeModel, TimeModel
from specserve import control
from specserve.api import ConditionType, SpecServiceSpec
from specserve.control import ControllerConfig, Memory, Observation

SLO = 50.0
CFG = ControllerConfig()


def make_spec(**over: Any) -> SpecServiceSpec:
    raw: dict[str, Any] = {
        "targetModel": {"name": "t"},
        "draftModel": {"name": "d"},
        "slo": {"tpotMs": SLO},
        "speculation": {"maxDraftTokens": 6},
        "replicas": 2,
        "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4},
    }
    raw.update(over)
    return SpecServiceSpec.model_validate(raw)


def policy(budget: float = SLO, k: int = 6, mode: SpecMode = SpecMode.adaptive) -> Policy:
    return Policy(
        generation=3,
        mode=mode,
        tpot_slo_ms=SLO,
        tpot_budget_ms=budget,
        max_draft_tokens=k,
        fixed_draft_tokens=min(3, k),
    )


def obs(tpot: float | None, **over: Any) -> Observation:
    base = Observation(
        tpot_ms=tpot,
        tpot_p90_ms=tpot,
        request_rate=2.0,
        acceptance_rate=0.7,
        mean_draft_length=2.5,
        infeasible=False,
        sample_age_s=5.0,
        engine_policy_generation=3,
    )
    return replace(base, **over)


def run(
    o: Observation,
    *,
    p: Policy | None = None,
    mem: Memory | None = None,
    now: float = 1000.0,
    replicas: int = 2,
    spec: SpecServiceSpec | None = None,
) -> control.Decision:
    return control.step(
        spec=spec or make_spec(),
        policy=p or policy(),
        replicas=replicas,
        obs=o,
        memory=mem or Memory(),
        now=now,
        cfg=CFG,
    )


def cond(d: control.Decision, t: ConditionType) -> tuple[str, str]:
    return d.conditions[t].status, d.conditions[t].reason


def test_breach_tightens_budget_by_correction_factor() -> None:
    d = run(obs(60.0))
    expected = SLO * (CFG.target_ratio / (60.0 / SLO))  # gain 1: budget·(target/r)
    assert d.policy_changed
    assert d.policy.tpot_budget_ms == pytest.approx(expected, abs=1e-3)
    assert d.policy.generation == 4
    assert d.policy.max_draft_tokens == 6  # factor 0.75 is not below k_cut_factor
    assert cond(d, ConditionType.slo_met) == ("False", control.SLO_BREACHED)
    assert d.history is not None and "60.0 ms > SLO 50 ms" in d.history.reason
    assert d.memory.last_policy_change == 1000.0
    assert d.memory.breach_since == 1000.0


def test_severe_breach_also_cuts_max_draft_tokens_and_step_is_bounded() -> None:
    d = run(obs(200.0))
    assert d.policy.tpot_budget_ms == pytest.approx(SLO * CFG.max_step_down)
    assert d.policy.max_draft_tokens == 5
    assert "maxDraftTokens 6→5" in d.policy.reason


def test_dwell_time_holds_the_policy_between_changes() -> None:
    mem = Memory(last_policy_change=990.0)
    held = run(obs(60.0), mem=mem, now=1000.0)
    assert not held.policy_changed and held.history is None
    acted = run(obs(60.0), mem=mem, now=990.0 + CFG.tighten_dwell_s)
    assert acted.policy_changed


def test_hysteresis_band_holds() -> None:
    for tpot in (0.81 * SLO, 0.9 * SLO, SLO):
        d = run(obs(tpot))
        assert not d.policy_changed, tpot
        assert cond(d, ConditionType.slo_met) == ("True", control.WITHIN_SLO)


def test_far_under_relaxes_slowly_and_respects_spec_max() -> None:
    p = policy(budget=30.0, k=5)
    early = run(obs(20.0), p=p, mem=Memory(last_policy_change=1000.0 - 60.0))
    assert not early.policy_changed  # relax dwell (120 s) not over
    d = run(obs(20.0), p=p, mem=Memory(last_policy_change=1000.0 - CFG.relax_dwell_s))
    assert d.policy.tpot_budget_ms == pytest.approx(30.0 * CFG.max_step_up)
    assert d.policy.max_draft_tokens == 6
    at_max = run(obs(20.0), p=policy(budget=30.0, k=6))
    assert at_max.policy.max_draft_tokens == 6  # never above spec.speculation.maxDraftTokens


def test_no_relaxing_while_the_budget_does_not_bind() -> None:
    p = policy(budget=30.0, k=5)
    d = run(obs(20.0, guard_refusal_rate=0.0), p=p)
    assert not d.policy_changed
    d = run(obs(20.0, guard_refusal_rate=1.5), p=p)
    assert d.policy_changed


def test_budget_bounds() -> None:
    floor = CFG.budget_min_ratio * SLO
    d = run(obs(200.0), p=policy(budget=floor * 1.1, k=6))
    assert d.policy.tpot_budget_ms == pytest.approx(floor)
    ceil = CFG.budget_max_ratio * SLO
    d = run(obs(5.0), p=policy(budget=ceil, k=6))
    assert not d.policy_changed


@pytest.mark.parametrize(
    ("o", "reason"),
    [
        (Observation(error="cannot reach http://p:9090"), control.PROMETHEUS_ERROR),
        (Observation(), control.METRICS_MISSING),
        (obs(60.0, sample_age_s=600.0), control.METRICS_STALE),
        (obs(None, request_rate=0.0), control.METRICS_MISSING),
        (obs(60.0, request_rate=0.001), control.METRICS_MISSING),
    ],
)
def test_missing_stale_or_failing_metrics_hold_everything(o: Observation, reason: str) -> None:
    p = policy()
    d = run(o, p=p, mem=Memory(far_under_since=1.0, breach_since=2.0))
    assert d.policy is p and d.replicas == 2 and d.history is None
    assert cond(d, ConditionType.metrics_available) == ("False", reason)
    assert d.conditions[ConditionType.slo_met].status == "Unknown"
    assert d.conditions[ConditionType.slo_feasible].status == "Unknown"
    assert d.memory.far_under_since is None and d.memory.breach_since == 2.0
    assert not d.metrics_ok


def test_engine_reports_infeasible_then_scale_up_after_dwell() -> None:
    first = run(obs(80.0, infeasible=True), now=1000.0)
    assert cond(first, ConditionType.slo_feasible) == ("False", control.PLAIN_DECODING_TOO_SLOW)
    assert first.replicas == 2  # not yet: must persist scale_up_after_s
    later = run(obs(80.0, infeasible=True), mem=first.memory, now=1000.0 + CFG.scale_up_after_s)
    assert later.replicas == 3
    assert later.history is not None and "scale 2→3" in later.history.reason
    # cooldown: no second step right away
    again = run(obs(80.0, infeasible=True), mem=later.memory, now=1000.0 + 2 * CFG.scale_up_after_s)
    assert again.replicas == 2  # the input replicas (spec) is passed in unchanged
    assert again.history is None or "scale" not in again.history.reason


def test_gauge_alone_is_not_infeasible_and_does_not_block_relaxing() -> None:
    d = run(obs(45.0, infeasible=True), mem=Memory(infeasible_since=0.0))
    assert cond(d, ConditionType.slo_feasible) == ("True", control.FEASIBLE)
    assert d.replicas == 2 and d.memory.infeasible_since is None


def test_no_tightening_below_the_plain_decoding_floor() -> None:
    d = run(obs(70.0, infeasible=True))
    assert not d.policy_changed  # a tighter budget cannot beat plain decoding
    assert cond(d, ConditionType.slo_feasible) == ("False", control.PLAIN_DECODING_TOO_SLOW)


def test_scale_up_stops_at_max_and_needs_autoscaling() -> None:
    mem = Memory(infeasible_since=0.0)
    at_max = run(obs(80.0, infeasible=True), mem=mem, replicas=4)
    assert at_max.replicas == 4
    off = make_spec(autoscaling={"enabled": False}, replicas=2)
    d = run(obs(80.0, infeasible=True), mem=mem, spec=off)
    assert d.replicas == 2
    assert cond(d, ConditionType.slo_feasible)[0] == "False"


def test_policy_at_limit_counts_as_infeasible() -> None:
    floor = CFG.budget_min_ratio * SLO
    d = run(obs(70.0), p=policy(budget=floor, k=1))
    assert not d.policy_changed
    assert cond(d, ConditionType.slo_feasible) == ("False", control.POLICY_AT_LIMIT)
    assert d.memory.infeasible_since == 1000.0


def test_scale_down_after_long_quiet_period_and_not_below_min() -> None:
    quiet = obs(10.0)
    t0 = 1000.0
    p = policy(budget=CFG.budget_max_ratio * SLO)  # budget at max: nothing to relax
    d = run(quiet, p=p, now=t0)
    assert d.memory.far_under_since == t0 and d.replicas == 2
    d = run(quiet, p=p, mem=d.memory, now=t0 + CFG.scale_down_after_s)
    assert d.replicas == 1
    assert d.history is not None and "scale 2→1" in d.history.reason
    d = run(quiet, p=p, mem=Memory(far_under_since=0.0), now=t0, replicas=1)
    assert d.replicas == 1  # minReplicas


def test_fixed_and_off_modes_are_never_adjusted() -> None:
    for mode in (SpecMode.fixed, SpecMode.off):
        p = policy(mode=mode)
        d = run(obs(90.0), p=p)
        assert d.policy is p and not d.policy_changed
        assert cond(d, ConditionType.slo_feasible) == ("False", control.POLICY_AT_LIMIT)


def test_controller_config_rejects_inconsistent_bands() -> None:
    with pytest.raises(ValueError, match="band_low"):
        ControllerConfig(band_low=0.95, target_ratio=0.9)
    with pytest.raises(ValueError, match="max_step_down"):
        ControllerConfig(max_step_down=1.2)


def test_closed_loop_converges_on_a_simple_plant() -> None:
    """A plant whose P90 is 1.4× the budget (the time model underestimates by 40%)."""
    p, mem, now = policy(budget=SLO), Memory(), 0.0
    ticks = 0
    while True:
        observed = 1.4 * p.tpot_budget_ms
        if observed <= SLO:
            break
        d = run(obs(observed), p=p, mem=mem, now=now)
        p, mem = d.policy, d.memory
        now += 15.0
        ticks += 1
        assert ticks < 20
    assert ticks <= 6
    assert 0.8 * SLO <= 1.4 * p.tpot_budget_ms <= SLO


# ---------------------------------------------------------------- plain-step floor (profile)


def time_model(intercept_ms: float, per_request_ms: float = 2.0) -> TimeModel:
    """A profile whose plain step is intercept + per_request·B ms (per row + per token)."""
    return TimeModel(
        draft=StepTimeModel(intercept_ms=5.0, per_row_ms=0.5),
        verify=StepTimeModel(
            intercept_ms=intercept_ms,
            per_row_ms=per_request_ms / 2,
            per_token_ms=per_request_ms / 2,
            per_ctx_ktoken_ms=3.0,  # no context metric: counted as 0 (a lower bound)
        ),
    )


def run_tm(o: Observation, tm: TimeModel | None, **kw: Any) -> control.Decision:
    return control.step(
        spec=kw.pop("spec", None) or make_spec(),
        policy=kw.pop("p", None) or policy(),
        replicas=kw.pop("replicas", 2),
        obs=o,
        memory=kw.pop("mem", None) or Memory(),
        now=kw.pop("now", 1000.0),
        cfg=CFG,
        time_model=tm,
    )


def test_plain_step_is_predicted_at_the_observed_load() -> None:
    tm = time_model(30.0, per_request_ms=2.0)
    assert control.plain_step(None, obs(60.0)) is None
    one = control.plain_step(tm, obs(60.0))  # no running-requests metric: batch 1
    assert one is not None and one.ms == pytest.approx(32.0) and one.batch == 1.0
    four = control.plain_step(tm, obs(60.0, mean_running=4.0))
    assert four is not None and four.ms == pytest.approx(38.0)
    idle = control.plain_step(tm, obs(60.0, mean_running=0.2))  # time average while mostly idle
    assert idle is not None and idle.batch == 1.0


def test_floor_stops_a_severe_breach_from_cutting_below_plain_decoding() -> None:
    tm = time_model(34.0)  # plain step 40 ms at 3 running requests
    o = obs(200.0, mean_running=3.0)
    without = run_tm(o, None)
    assert without.policy.tpot_budget_ms == pytest.approx(SLO * CFG.max_step_down)  # 25 ms
    d = run_tm(o, tm)
    assert d.plain_step_ms == pytest.approx(40.0)
    assert d.policy.tpot_budget_ms == pytest.approx(40.0)
    assert d.policy.max_draft_tokens == 5  # a severe breach still cuts K
    assert "floor: predicted plain decoding step 40.0 ms at 3.0 running requests" in (
        d.policy.reason
    )
    assert cond(d, ConditionType.slo_feasible) == ("True", control.FEASIBLE)


def test_floor_holds_over_many_ticks_then_the_policy_is_at_its_limit() -> None:
    tm = time_model(34.0)
    p, mem, now = policy(), Memory(), 1000.0
    budgets, ks = [], []
    for _ in range(12):  # a breach that tightening never fixes (the plant ignores the budget)
        d = run_tm(obs(70.0, mean_running=3.0), tm, p=p, mem=mem, now=now)
        p, mem, now = d.policy, d.memory, now + CFG.tighten_dwell_s
        budgets.append(p.tpot_budget_ms)
        ks.append(p.max_draft_tokens)
    assert min(budgets) == pytest.approx(40.0)  # never below the floor, however long
    assert ks[-1] == CFG.min_draft_tokens  # pinned at the floor: K was the lever left
    assert all(a >= b for a, b in itertools.pairwise(ks))
    assert cond(d, ConditionType.slo_feasible) == ("False", control.POLICY_AT_LIMIT)
    assert (
        "predicted plain decoding step 40.0 ms" in d.conditions[ConditionType.slo_feasible].message
    )
    assert d.memory.infeasible_since is not None


def test_a_floor_that_rose_with_the_load_does_not_raise_the_budget() -> None:
    tm = time_model(34.0)  # 40 ms at 3 running, 46 ms at 6
    d = run_tm(obs(60.0, mean_running=6.0), tm, p=policy(budget=42.0, k=4))
    assert d.policy.tpot_budget_ms == pytest.approx(42.0)  # held, not lowered, not raised
    assert d.policy.max_draft_tokens == 3


def test_slo_below_the_plain_step_holds_the_policy_and_says_why() -> None:
    tm = time_model(55.0)  # plain step 57 ms at 1 running request > SLO 50 ms
    p = policy()
    first = run_tm(obs(80.0), tm, p=p, now=1000.0)
    assert first.policy is p and not first.policy_changed  # no walk down the budget
    status, reason = cond(first, ConditionType.slo_feasible)
    assert (status, reason) == ("False", control.SLO_BELOW_PLAIN_STEP)
    msg = first.conditions[ConditionType.slo_feasible].message
    assert "SLO 50 ms" in msg and "57.0 ms" in msg and "replicas" in msg
    later = run_tm(obs(80.0), tm, p=p, mem=first.memory, now=1000.0 + CFG.scale_up_after_s)
    assert later.policy is p and later.replicas == 3  # only more replicas can help
    # TPOT within the SLO contradicts the prediction: no infeasibility claim
    ok = run_tm(obs(45.0), tm, p=p)
    assert cond(ok, ConditionType.slo_feasible) == ("True", control.FEASIBLE)


def test_feasible_slo_converges_exactly_as_without_a_profile() -> None:
    """The simple plant of test_closed_loop_converges_on_a_simple_plant, with a profile whose
    plain step (12 ms at 2 running requests) stays under every budget the loop visits."""
    trajectories = []
    for tm in (None, time_model(8.0)):
        p, mem, now, seen = policy(budget=SLO), Memory(), 0.0, []
        for _ in range(20):
            observed = 1.4 * p.tpot_budget_ms
            if observed <= SLO:
                break
            d = run_tm(obs(observed, mean_running=2.0), tm, p=p, mem=mem, now=now)
            p, mem, now = d.policy, d.memory, now + 15.0
            seen.append((p.tpot_budget_ms, p.max_draft_tokens, p.generation))
        assert 0.8 * SLO <= 1.4 * p.tpot_budget_ms <= SLO
        trajectories.append(seen)
    assert trajectories[0] == trajectories[1] and len(trajectories[0]) <= 6
