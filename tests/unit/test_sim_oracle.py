"""The clairvoyant drafter (adaspec.sim.oracle): its plan is the step's goodput optimum, it
never verifies a rejected token, it beats every real policy on a small trace, it keeps the SLO
guard's rule, and it does not draft when drafting cannot pay."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from adaspec.contract import Policy, Profile, StepTimeModel
from adaspec.policy.base import FloatArray, IntArray, StepContext, VerifyDecision
from adaspec.policy.time_model import StepTimePredictor
from adaspec.sim import POLICY_KINDS, SimConfig, SimResult, Trace, load_builtin_profile, run_policy
from adaspec.sim.oracle import ClairvoyantDrafter, run_clairvoyant

CPU = load_builtin_profile("cpu-qwen-coder-estimate")
GPU = load_builtin_profile("h200-7b-0.5b-synthetic")


def _doc(profile: Profile, budget_ms: float) -> Policy:
    slo = 400.0 if profile is CPU else 40.0
    return Policy(generation=1, tpot_slo_ms=slo, tpot_budget_ms=budget_ms, max_draft_tokens=8)


def _trace(profile: Profile, n: int = 30) -> Trace:
    """Arrivals dense enough that batches of 1–4 mix decoding with prompt chunks."""
    rng = np.random.default_rng(7)
    span = 20.0 if profile is CPU else 0.5
    arrivals = np.sort(rng.uniform(0, span, n))
    return Trace("t", arrivals, rng.integers(5, 60, n), rng.integers(2, 40, n))


def _expensive_draft(profile: Profile) -> Profile:
    """The draft model costs 5× a verification forward per pass: drafting can never pay."""
    v = profile.time_model.verify
    draft = StepTimeModel(intercept_ms=5 * v.intercept_ms, per_row_ms=5 * v.per_row_ms)
    tm = profile.time_model.model_copy(update={"draft": draft})
    return profile.model_copy(update={"time_model": tm})


@pytest.mark.parametrize("profile", [CPU, GPU, _expensive_draft(GPU)], ids=["cpu", "gpu", "dear"])
@pytest.mark.parametrize("seed", range(4))
def test_plan_is_the_goodput_best_plan_of_accepted_drafts(profile: Profile, seed: int) -> None:
    """Brute force over every s_i ≤ n_i: no plan has a higher predicted goodput."""
    rng = np.random.default_rng(seed)
    b, k = 3, 4
    ctx = StepContext(context_lens=rng.integers(1, 30_000, b), max_draft=k)
    run = rng.integers(0, k + 1, b)
    pol = ClairvoyantDrafter(StepTimePredictor(profile.time_model))

    def goodput(s: IntArray) -> float:
        return float(b + s.sum()) / sum(pol.predict(ctx, s))

    best = max(
        goodput(np.asarray(s, dtype=np.int64))
        for s in itertools.product(*(range(int(n) + 1) for n in run))
    )
    plan = pol.plan(ctx, run)
    assert (plan <= run).all() and (plan >= 0).all()
    assert goodput(plan) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("profile", [CPU, GPU], ids=["cpu", "gpu"])
@pytest.mark.parametrize("seed", range(4))
def test_under_the_guard_the_plan_is_the_best_admitted_plan(profile: Profile, seed: int) -> None:
    """With a request whose run is 0 (its time per token is the step time) the guard caps the
    step time: brute force over every s_i ≤ n_i under the rule worst ≤ max(budget, plain)."""
    rng = np.random.default_rng(100 + seed)
    b, k = 4, 3
    ctx_lens = rng.integers(1, 30_000, b)
    run = np.concatenate(([0], rng.integers(0, k + 1, b - 1)))
    pol = ClairvoyantDrafter(StepTimePredictor(profile.time_model))
    free = StepContext(context_lens=ctx_lens, max_draft=k, prefill_extra_s=0.002)
    plans = [np.asarray(s, dtype=np.int64) for s in itertools.product(*(range(n + 1) for n in run))]

    def step_s(s: IntArray) -> float:
        return sum(pol.predict(free, s))

    plain = step_s(plans[0])
    # a budget between plain decoding and the unguarded best plan, so that it binds
    budget = (plain + step_s(pol.plan(free, run))) / 2
    ctx = StepContext(context_lens=ctx_lens, max_draft=k, budget_s=budget, prefill_extra_s=0.002)
    extra = ctx.prefill_extra_s  # the bias scale is 1: no observe() yet

    def goodput(s: IntArray) -> float:  # decoding time only (see the module docstring)
        return float(b + s.sum()) / (step_s(s) - extra)

    admitted = [s for s in plans if step_s(s) / (1 + s.min()) <= max(budget, plain)]
    plan = pol.plan(ctx, run)
    assert step_s(plan) / (1 + plan.min()) <= max(budget, plain)
    assert goodput(plan) == pytest.approx(max(goodput(s) for s in admitted), rel=1e-12)


@pytest.mark.parametrize("profile", [CPU, GPU], ids=["cpu", "gpu"])
def test_beats_every_real_policy_on_a_small_trace(profile: Profile) -> None:
    """A budget too loose to bind (the baselines ignore it): the reference must be at least as
    fast as every real kind in throughput and in mean TPOT."""
    doc = _doc(profile, budget_ms=10_000.0)
    tr, cfg = _trace(profile), SimConfig(max_batch=4)
    ref = run_clairvoyant(tr, profile, doc, config=cfg).summary(doc.tpot_slo_ms / 1000)
    for kind in POLICY_KINDS:
        s = run_policy(kind, tr, profile, doc, config=cfg).summary(doc.tpot_slo_ms / 1000)
        assert ref.throughput_tok_s >= s.throughput_tok_s, kind
        assert ref.tpot_mean_ms <= s.tpot_mean_ms, kind


@pytest.mark.parametrize("profile", [CPU, GPU], ids=["cpu", "gpu"])
def test_never_verifies_a_rejected_token(profile: Profile) -> None:
    doc = _doc(profile, budget_ms=10_000.0)
    res = run_clairvoyant(_trace(profile), profile, doc, config=SimConfig(max_batch=4))
    assert res.verified > 0
    assert res.accepted == res.verified == res.proposed
    assert res.summary(doc.tpot_slo_ms / 1000).acceptance == 1.0


class _Recording(ClairvoyantDrafter):
    def __init__(self, times: StepTimePredictor) -> None:
        super().__init__(times)
        self.steps: list[tuple[StepContext, VerifyDecision]] = []

    def verify_lengths(self, ctx: StepContext, conf: FloatArray, lens: IntArray) -> VerifyDecision:
        d = super().verify_lengths(ctx, conf, lens)
        self.steps.append((ctx, d))
        return d


def _recorded(profile: Profile, budget_s: float | None) -> tuple[_Recording, SimResult]:
    from adaspec.policy.factory import StepLimits
    from adaspec.sim import AcceptanceModel, simulate

    pol = _Recording(StepTimePredictor(profile.time_model))
    res = simulate(
        _trace(profile),
        pol,
        StepLimits(8, budget_s),
        profile.time_model,
        AcceptanceModel.from_calibration(profile.calibration),
        SimConfig(max_batch=4, record_spec_lens=True),
        prefill_budget_s=budget_s,
    )
    return pol, res


@pytest.mark.parametrize("profile", [CPU, GPU], ids=["cpu", "gpu"])
def test_every_step_keeps_the_guard_rule(profile: Profile) -> None:
    """Budget just above a plain step: every step's simulated time per emitted token, for every
    request, stays within max(budget, plain step) (noise 0: the prediction is the truth)."""
    truth = StepTimePredictor(profile.time_model)
    budget = 1.3 * truth.verify(1, 1, 0)
    pol, res = _recorded(profile, budget)
    _, free = _recorded(profile, None)
    decoding = [i for i, b in enumerate(res.steps.batch) if b > 0]
    assert len(decoding) == len(pol.steps)
    for i, (ctx, d) in zip(decoding, pol.steps, strict=True):
        took = res.steps.duration_s[i]
        assert took == pytest.approx(d.predicted_step_s, rel=1e-9)
        plain = truth.verify(ctx.batch, ctx.batch, float(ctx.context_lens.sum()))
        if ctx.prefill_extra_s > 0:
            plain += ctx.prefill_extra_s + truth.draft_forward_fixed_s
        worst = took / (1 + min(res.steps.spec_lens[i]))
        assert worst <= max(budget, plain) * (1 + 1e-9)
    # the guard bound: the same trace without a budget drafts more
    assert 0 < res.verified < free.verified


@pytest.mark.parametrize("profile", [CPU, GPU], ids=["cpu", "gpu"])
def test_drafts_nothing_when_the_draft_is_absurdly_expensive(profile: Profile) -> None:
    """Whole-prompt prefill: plain decoding, request for request. Chunked prefill: it drafts only
    in steps that carry prompt chunks, where the draft forward runs over them anyway (a step
    that drafts nothing pays it on its own), so the first draft pass costs no extra intercept."""
    dear = _expensive_draft(profile)
    doc = _doc(profile, budget_ms=10_000.0)
    tr, whole = _trace(profile), SimConfig(max_batch=4, prefill_chunk_tokens=0)
    ref = run_clairvoyant(tr, dear, doc, config=whole)
    off = run_policy("off", tr, dear, doc, config=whole)
    assert ref.proposed == 0
    assert [r.finish_s for r in ref.requests] == pytest.approx([r.finish_s for r in off.requests])
    chunked = run_clairvoyant(tr, dear, doc, config=SimConfig(max_batch=4))
    drafted = np.asarray(chunked.steps.proposed) > 0
    assert not (drafted & (np.asarray(chunked.steps.prefill_tokens) == 0)).any()


def test_start_without_reveal_is_a_clear_error() -> None:
    pol = ClairvoyantDrafter(StepTimePredictor(GPU.time_model))
    with pytest.raises(RuntimeError, match="reveal"):
        pol.start(StepContext(context_lens=np.array([10, 20]), max_draft=4))
    with pytest.raises(ValueError, match="accept_run_lens"):
        pol.reveal(np.array([1, -1]))
