"""Baselines and the policy selector share the SpecPolicy protocol with AdaSpec."""

from __future__ import annotations

import numpy as np
import pytest

from adaspec.contract import Policy, SpecMode
from adaspec.policy import (
    AdaSpecPolicy,
    FixedKPolicy,
    OffPolicy,
    SmartSpecPolicy,
    StepContext,
    StepOutcome,
    ThresholdPolicy,
)
from adaspec.policy.base import SpecPolicy
from adaspec.policy.factory import PolicySelector, build_policy, limits_for


def drive(policy: SpecPolicy, ctx: StepContext, conf_src: np.ndarray) -> np.ndarray:
    b = ctx.batch
    conf = np.zeros((b, ctx.max_draft))
    lens = np.zeros(b, dtype=np.int64)
    drafting = policy.start(ctx)
    for j in range(ctx.max_draft):
        if not drafting.any():
            break
        conf[drafting, j] = conf_src[drafting, j]
        lens[drafting] += 1
        drafting = drafting & policy.keep_drafting(ctx, conf, lens, drafting)
    return policy.verify_lengths(ctx, conf, lens).lens


CTX = StepContext(context_lens=np.array([10, 200, 30], dtype=np.int64), max_draft=6)


def test_off_never_drafts() -> None:
    assert np.all(drive(OffPolicy(), CTX, np.full((3, 6), 0.99)) == 0)


@pytest.mark.parametrize("k", [0, 1, 3, 5, 9])
def test_fixed_k_drafts_exactly_min_k_max(k: int) -> None:
    lens = drive(FixedKPolicy(k), CTX, np.full((3, 6), 0.1))
    assert np.all(lens == min(k, CTX.max_draft))


def test_threshold_stops_the_whole_batch_on_low_mean_confidence() -> None:
    conf = np.array([[0.9, 0.9, 0.2, 0.9, 0.9, 0.9]] * 3)
    assert np.all(drive(ThresholdPolicy(0.6), CTX, conf) == 3)
    assert np.all(drive(ThresholdPolicy(0.6), CTX, np.full((3, 6), 0.95)) == 6)


def test_smartspec_k_follows_observed_acceptance() -> None:
    high, low = SmartSpecPolicy(), SmartSpecPolicy()
    b, k = 4, 8
    for pol, acc in ((high, k), (low, 0)):
        for _ in range(10):
            pol.observe(
                StepOutcome(
                    conf=np.zeros((b, k)),
                    verified_lens=np.full(b, k),
                    accepted=np.full(b, acc),
                    context_lens=np.full(b, 100),
                )
            )
    ctx = StepContext(np.full(b, 100, dtype=np.int64), max_draft=k)
    assert high.choose_k(ctx) > low.choose_k(ctx)
    assert low.choose_k(ctx) == 0
    lens = drive(high, ctx, np.full((b, k), 0.5))
    assert np.all(lens == lens[0])  # one K for the whole batch


def test_selector_keeps_learned_state_across_generations() -> None:
    sel = PolicySelector()
    p1 = Policy(generation=1, mode=SpecMode.adaptive, tpot_slo_ms=300, tpot_budget_ms=280)
    p2 = p1.model_copy(update={"generation": 2, "tpot_budget_ms": 200.0, "max_draft_tokens": 4})
    a, lim1 = sel.select(p1)
    b, lim2 = sel.select(p2)
    assert a is b and isinstance(a, AdaSpecPolicy)
    assert lim1.budget_s == pytest.approx(0.28) and lim2.budget_s == pytest.approx(0.2)
    assert lim2.max_draft == 4
    off, lim = sel.select(p2.model_copy(update={"mode": SpecMode.off}))
    assert isinstance(off, OffPolicy) and lim.max_draft == 0


def test_override_and_limits() -> None:
    p = Policy(generation=0, tpot_slo_ms=100, tpot_budget_ms=90, fixed_draft_tokens=2)
    assert isinstance(build_policy(p, None, "smartspec"), SmartSpecPolicy)
    assert isinstance(build_policy(p, None, "fixed"), FixedKPolicy)
    assert limits_for(p, "fixed").max_draft == 2
    assert limits_for(p, "smartspec").budget_s is None  # baselines have no SLO guard
    with pytest.raises(ValueError, match="unknown --spec-policy 'bogus'"):
        PolicySelector(override="bogus")


def test_smartspec_probes_again_after_a_hard_patch() -> None:
    pol = SmartSpecPolicy()
    b, k = 4, 8
    ctx = StepContext(np.full(b, 100, dtype=np.int64), max_draft=k)
    hard = StepOutcome(
        conf=np.zeros((b, k)),
        verified_lens=np.full(b, k),
        accepted=np.zeros(b, dtype=np.int64),
        context_lens=np.full(b, 100),
    )
    plain = StepOutcome(
        conf=np.zeros((b, 0)),
        verified_lens=np.zeros(b, dtype=np.int64),
        accepted=np.zeros(b, dtype=np.int64),
        context_lens=np.full(b, 100),
    )
    pol.observe(hard)
    assert pol.choose_k(ctx) == 0
    steps = 0
    while pol.choose_k(ctx) == 0 and steps < 1000:
        pol.observe(plain)
        steps += 1
    assert 0 < steps < 1000
