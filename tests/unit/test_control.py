"""The pure SLO controller, driven with a fake clock (plain floats passed as `now`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from adaspec.contract import Policy, SpecMode
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
