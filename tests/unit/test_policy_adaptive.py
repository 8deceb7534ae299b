"""Properties of the AdaSpec policy (pure numpy): drafter, verifier pruning, SLO guard."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaspec.contract import StepTimeModel, TimeModel
from adaspec.policy import (
    AcceptanceCalibrator,
    AdaSpecPolicy,
    StepContext,
    StepOutcome,
    StepTimePredictor,
)
from adaspec.policy.adaptive import StepCosts

# A GPU-like model where verifying extra tokens is cheap relative to a forward pass, and a
# CPU-like one where a draft pass costs ~40% of a verification.
GPU_LIKE = TimeModel(
    draft=StepTimeModel(intercept_ms=2.0, per_row_ms=0.01, per_ctx_ktoken_ms=0.002),
    verify=StepTimeModel(
        intercept_ms=20.0, per_row_ms=0.05, per_token_ms=0.02, per_ctx_ktoken_ms=0.004
    ),
)
CPU_LIKE = TimeModel(
    draft=StepTimeModel(intercept_ms=95.0, per_row_ms=8.0, per_ctx_ktoken_ms=4.0),
    verify=StepTimeModel(
        intercept_ms=235.0, per_row_ms=10.0, per_token_ms=3.0, per_ctx_ktoken_ms=6.0
    ),
)


def _policy(model: TimeModel = GPU_LIKE) -> AdaSpecPolicy:
    return AdaSpecPolicy(StepTimePredictor(model), AcceptanceCalibrator.identity())


def run_drafting(
    policy: AdaSpecPolicy, ctx: StepContext, conf_source: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Drive the policy like a backend does, drawing confidences from `conf_source` (B, K)."""
    b = conf_source.shape[0]
    conf = np.zeros((b, max(ctx.max_draft, 1)))
    lens = np.zeros(b, dtype=np.int64)
    drafting = policy.start(ctx)
    for j in range(ctx.max_draft):
        if not drafting.any():
            break
        conf[drafting, j] = conf_source[drafting, j]
        lens[drafting] += 1
        drafting = drafting & policy.keep_drafting(ctx, conf, lens, drafting)
    return conf, lens


def step_time(policy: AdaSpecPolicy, ctx: StepContext, conf: np.ndarray, lens: np.ndarray) -> float:
    """Predicted step time of verifying `lens` (draft passes counted from the drafted lens),
    prompt chunks included: they ride along (`prefill_extra_s`), and when nothing was drafted
    they need a draft forward of their own."""
    c = StepCosts(ctx, conf, lens, policy.cal, policy.times)
    L = ctx.context_lens.astype(float)
    s = lens.astype(float)
    work = float(((s + 1) * L + s * (s + 1) / 2).sum())
    t = c.draft_s + policy.times.verify(ctx.batch, float(s.sum()) + ctx.batch, work)
    t += ctx.prefill_extra_s
    if ctx.prefill_extra_s > 0 and ctx.max_draft > 0 and int(lens.sum()) == 0:
        t += policy.times.draft_forward_fixed_s
    return t


batch_sizes = st.integers(min_value=1, max_value=48)


@st.composite
def step_inputs(draw: st.DrawFn) -> tuple[StepContext, np.ndarray]:
    b = draw(batch_sizes)
    k = draw(st.integers(min_value=1, max_value=8))
    seed = draw(st.integers(min_value=0, max_value=2**31 - 1))
    rng = np.random.default_rng(seed)
    ctx_lens = rng.integers(1, 2048, size=b).astype(np.int64)
    conf = rng.beta(draw(st.floats(0.2, 5.0)), draw(st.floats(0.2, 5.0)), size=(b, k))
    budget = draw(st.one_of(st.none(), st.floats(min_value=0.005, max_value=0.2)))
    extra = draw(st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=0.1)))
    return StepContext(
        context_lens=ctx_lens, max_draft=k, budget_s=budget, prefill_extra_s=extra
    ), conf


@settings(max_examples=150, deadline=None)
@given(step_inputs())
def test_pruning_never_raises_predicted_step_time(inp: tuple[StepContext, np.ndarray]) -> None:
    ctx, conf = inp
    policy = _policy()
    rng = np.random.default_rng(0)
    lens = rng.integers(0, ctx.max_draft + 1, size=ctx.batch).astype(np.int64)
    d = policy.verify_lengths(ctx, conf, lens)
    assert np.all(d.lens <= lens) and np.all(d.lens >= 0)
    assert d.predicted_step_s <= step_time(policy, ctx, conf, lens) + 1e-12


@settings(max_examples=150, deadline=None)
@given(step_inputs())
def test_guard_never_admits_an_over_budget_step(inp: tuple[StepContext, np.ndarray]) -> None:
    ctx, conf_source = inp
    policy = _policy()
    conf, lens = run_drafting(policy, ctx, conf_source)
    d = policy.verify_lengths(ctx, conf, lens)
    if ctx.budget_s is None:
        return
    worst = d.predicted_step_s / float(d.expected_tokens.min())
    plain = policy.plain_step_s(ctx)  # prompt chunks included
    if d.infeasible:
        # nothing can meet the budget: damage control picks the plan with the lowest worst
        # time per token among "verify all drafted" and "verify none" (drafts already paid)
        assert plain > ctx.budget_s
        c = StepCosts(ctx, conf, lens, policy.cal, policy.times)
        verify_all = step_time(policy, ctx, conf, lens) / float(c.E.min())
        verify_none = c.draft_s + plain  # (an upper bound when drafts paid the chunks' pass)
        assert worst <= min(verify_all, verify_none) + 1e-12
    elif d.lens.sum() > 0:
        assert plain <= ctx.budget_s
        assert worst <= ctx.budget_s + 1e-12


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=64), st.integers(min_value=2, max_value=8))
def test_all_sure_drafts_draft_and_verify_max_length(b: int, k: int) -> None:
    policy = _policy()
    ctx = StepContext(context_lens=np.full(b, 200, dtype=np.int64), max_draft=k)
    policy.cal = AcceptanceCalibrator(np.linspace(0, 1, 11), np.full(10, 0.999), initial_rate=0.999)
    conf, lens = run_drafting(policy, ctx, np.full((b, k), 0.999))
    assert np.all(lens == k)
    d = policy.verify_lengths(ctx, conf, lens)
    assert np.all(d.lens == k)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=64), st.integers(min_value=1, max_value=8))
def test_hopeless_drafts_mean_no_drafting(b: int, k: int) -> None:
    policy = _policy(CPU_LIKE)
    policy.cal = AcceptanceCalibrator(np.linspace(0, 1, 11), np.full(10, 0.01), initial_rate=0.01)
    ctx = StepContext(context_lens=np.full(b, 300, dtype=np.int64), max_draft=k)
    assert not policy.start(ctx).any()
    d = policy.verify_lengths(ctx, np.zeros((b, k)), np.zeros(b, dtype=np.int64))
    assert np.all(d.lens == 0)


def test_requests_get_their_own_lengths() -> None:
    """Confident requests keep drafting, unsure ones stop early (per-request early stop)."""
    policy = _policy()
    b, k = 4, 8
    ctx = StepContext(context_lens=np.full(b, 100, dtype=np.int64), max_draft=k)
    src = np.array([[0.99] * k, [0.95] * k, [0.3] * k, [0.05] * k])
    conf, lens = run_drafting(policy, ctx, src)
    d = policy.verify_lengths(ctx, conf, lens)
    assert d.lens[0] > d.lens[2] >= d.lens[3]
    assert len(set(d.lens.tolist())) >= 3


def test_tight_budget_refuses_speculation_and_reports_refusals() -> None:
    policy = _policy(GPU_LIKE)
    b = 2
    ctx_free = StepContext(context_lens=np.full(b, 100, dtype=np.int64), max_draft=4)
    src = np.array([[0.95] * 4, [0.9] * 4])
    conf, lens = run_drafting(policy, ctx_free, src)
    free = policy.verify_lengths(ctx_free, conf, lens)
    assert free.lens.sum() >= 4
    # budget just above plain decoding: the first draft pass already takes too long
    plain = policy.predicted_plain_step_s(ctx_free.context_lens)
    ctx_tight = StepContext(context_lens=ctx_free.context_lens, max_draft=4, budget_s=plain * 1.01)
    conf, lens = run_drafting(policy, ctx_tight, src)
    tight = policy.verify_lengths(ctx_tight, conf, lens)
    assert tight.lens.sum() == 0
    assert tight.guard_refusals > 0
    assert not tight.infeasible
    ctx_impossible = StepContext(
        context_lens=ctx_free.context_lens, max_draft=4, budget_s=plain * 0.5
    )
    conf, lens = run_drafting(policy, ctx_impossible, src)
    impossible = policy.verify_lengths(ctx_impossible, conf, lens)
    assert impossible.infeasible
    # nothing can meet it, so the guard steps aside: speculation still lowers time per token
    assert impossible.guard_refusals == 0
    assert impossible.lens.sum() == free.lens.sum()


def test_online_calibration_learns_from_outcomes() -> None:
    """Raw confidence 0.9 that is in truth accepted 30% of the time gets corrected."""
    cal = AcceptanceCalibrator.identity()
    rng = np.random.default_rng(1)
    before = float(cal.predict(np.array([0.9]))[0])
    for _ in range(200):
        b, k = 8, 4
        conf = np.full((b, k), 0.9)
        verified = np.full(b, k)
        acc = np.minimum(rng.geometric(0.7, size=b) - 1, k)  # P(accept)=0.3 per token
        cal.update(conf, verified, acc)
    after = float(cal.predict(np.array([0.9]))[0])
    assert before > 0.85
    # the monotone map pools the observed bin with its unobserved neighbours' priors (weight
    # 40 each), so it lands a little above the truth
    assert abs(after - 0.3) < 0.1
    # monotone map
    assert np.all(np.diff(cal.table) >= -1e-12)


def test_time_bias_correction_tracks_a_slower_machine() -> None:
    policy = _policy(CPU_LIKE)
    b = 4
    ctx_lens = np.full(b, 200, dtype=np.int64)
    lens = np.full(b, 2, dtype=np.int64)
    conf = np.full((b, 2), 0.8)
    for _ in range(60):
        s = lens.astype(float)
        L = ctx_lens.astype(float)
        true_verify = 1.5 * StepTimePredictor(CPU_LIKE).verify(
            b, float(s.sum()) + b, float(((s + 1) * L + s * (s + 1) / 2).sum())
        )
        policy.observe(
            StepOutcome(
                conf=conf,
                verified_lens=lens,
                accepted=np.ones(b, dtype=np.int64),
                context_lens=ctx_lens,
                draft_time_s=0.0,
                verify_time_s=true_verify,
            )
        )
    assert policy.times.verify_scale == pytest.approx(1.5, rel=0.02)
    assert policy.times.draft_scale == 1.0  # no draft observations: untouched


def test_empty_batch_and_zero_max_draft() -> None:
    policy = _policy()
    ctx = StepContext(context_lens=np.zeros(0, dtype=np.int64), max_draft=4)
    assert policy.start(ctx).shape == (0,)
    d = policy.verify_lengths(ctx, np.zeros((0, 4)), np.zeros(0, dtype=np.int64))
    assert d.lens.shape == (0,)
    ctx = StepContext(context_lens=np.full(3, 10, dtype=np.int64), max_draft=0)
    assert not policy.start(ctx).any()


def test_prompt_chunks_make_the_guard_draft_less_then_flag_the_step() -> None:
    """The same step with a growing prefill extra: fewer drafts, then infeasible."""
    b, k = 2, 4
    lens0 = np.full(b, 100, dtype=np.int64)
    src = np.array([[0.95] * k, [0.9] * k])
    policy = _policy(CPU_LIKE)  # a draft pass costs ~40% of a verification
    plain = policy.plain_step_s(StepContext(context_lens=lens0, max_draft=k))
    budget = 1.6 * plain  # room for one or two draft passes
    ctx = StepContext(context_lens=lens0, max_draft=k, budget_s=budget)
    conf, lens = run_drafting(policy, ctx, src)
    roomy = policy.verify_lengths(ctx, conf, lens)
    assert roomy.lens.sum() > 0 and roomy.guard_refusals == 0 and not roomy.infeasible

    # chunks taking most of the room: the same step drafts less
    tight = StepContext(
        context_lens=lens0, max_draft=k, budget_s=budget, prefill_extra_s=0.19 * plain
    )
    conf, lens = run_drafting(policy, tight, src)
    d = policy.verify_lengths(tight, conf, lens)
    assert d.lens.sum() < roomy.lens.sum()
    assert d.guard_refusals > 0 and not d.infeasible
    assert d.predicted_step_s / float(d.expected_tokens.min()) <= budget
    assert d.predicted_step_s >= plain + tight.prefill_extra_s  # the chunks are in the step

    # chunks beyond the room: even plain decoding breaks the budget
    over = StepContext(
        context_lens=lens0, max_draft=k, budget_s=budget, prefill_extra_s=0.38 * plain
    )
    conf, lens = run_drafting(policy, over, src)
    d = policy.verify_lengths(over, conf, lens)
    assert d.infeasible and policy.plain_step_s(over) > budget


def test_without_a_budget_prompt_chunks_do_not_buy_more_drafts() -> None:
    """The prompt costs the same however much is drafted, so with no budget to respect the
    chunks must not change what is verified once drafting has started: amortising them over
    more drafts would only lengthen the step and slow admission."""
    b, k = 3, 6
    ctx_lens = np.full(b, 200, dtype=np.int64)
    src = np.array([[0.97] * k, [0.8] * k, [0.55] * k])
    chunks = StepContext(context_lens=ctx_lens, max_draft=k, prefill_extra_s=2.0)
    plain = StepContext(context_lens=ctx_lens, max_draft=k)
    for model in (CPU_LIKE, GPU_LIKE):
        with_chunks = _policy(model)
        conf, lens = run_drafting(with_chunks, chunks, src)
        d_chunks = with_chunks.verify_lengths(chunks, conf, lens)
        without = _policy(model)
        conf0, lens0 = run_drafting(without, plain, src)
        d_plain = without.verify_lengths(plain, conf0, lens0)
        assert lens0.sum() > 0
        np.testing.assert_array_equal(lens, lens0)
        np.testing.assert_array_equal(d_chunks.lens, d_plain.lens)
        assert d_chunks.predicted_step_s == pytest.approx(d_plain.predicted_step_s + 2.0)


def test_no_drafting_when_saturated() -> None:
    """A prefill backlog while requests wait for admission means the step's length paces
    admission: AdaSpec decodes plainly and says so in its prediction. A backlog alone (nobody
    waiting) or a queue alone (no prompt left to feed) does not stop it."""
    ctx_lens = np.full(3, 100, dtype=np.int64)
    src = np.full((3, 4), 0.95)
    cases = ((0, 0, True), (0, 5, True), (700, 0, True), (1, 1, False), (700, 5, False))
    for backlog, waiting, drafts in cases:
        policy = _policy(CPU_LIKE)
        ctx = StepContext(
            context_lens=ctx_lens,
            max_draft=4,
            prefill_extra_s=0.05,
            prefill_backlog_tokens=backlog,
            requests_waiting=waiting,
        )
        conf, lens = run_drafting(policy, ctx, src)
        d = policy.verify_lengths(ctx, conf, lens)
        assert bool(lens.sum() > 0) is drafts
        assert bool(d.lens.sum() > 0) is drafts
        if not drafts:
            assert d.predicted_step_s == pytest.approx(policy.plain_step_s(ctx))


def test_a_step_without_drafts_is_charged_the_chunks_and_their_draft_forward() -> None:
    policy = _policy(CPU_LIKE)
    ctx_lens = np.full(3, 50, dtype=np.int64)
    base = StepContext(context_lens=ctx_lens, max_draft=4)
    with_chunks = StepContext(context_lens=ctx_lens, max_draft=4, prefill_extra_s=0.2)
    no_draft_model = StepContext(context_lens=ctx_lens, max_draft=0, prefill_extra_s=0.2)
    zero = np.zeros((3, 4))
    none = np.zeros(3, dtype=np.int64)
    plain = policy.verify_lengths(base, zero, none).predicted_step_s
    charged = policy.verify_lengths(with_chunks, zero, none).predicted_step_s
    assert charged == pytest.approx(plain + 0.2 + policy.times.draft_forward_fixed_s)
    assert policy.plain_step_s(with_chunks) == pytest.approx(charged)
    assert policy.plain_step_s(no_draft_model) == pytest.approx(plain + 0.2)


@pytest.mark.parametrize("slowdown", [1.0, 1.5])
def test_bias_correction_counts_the_chunks_of_a_step(slowdown: float) -> None:
    """Steps with prompt chunks, whose draft share is measured in the first draft pass, move
    the biases by the machine's true slowdown only (a prediction without the chunks would scale
    a correct model up; one that trusted the phase split would move the draft bias)."""
    policy = _policy(CPU_LIKE)
    truth = StepTimePredictor(CPU_LIKE)
    b, k = 2, 3
    src = np.full((b, k), 0.9)
    for i in range(160):
        extra = 0.3 if i % 2 else 0.0  # every other step carries prompt chunks
        ctx = StepContext(
            context_lens=np.full(b, 120, dtype=np.int64), max_draft=k, prefill_extra_s=extra
        )
        conf, lens = run_drafting(policy, ctx, src)
        d = policy.verify_lengths(ctx, conf, lens)
        draft_s = StepCosts(ctx, conf, lens, policy.cal, truth).draft_s
        s = d.lens.astype(float)
        L = ctx.context_lens.astype(float)
        verify_s = truth.verify(b, float(s.sum()) + b, float(((s + 1) * L + s * (s + 1) / 2).sum()))
        verify_s += extra
        if extra and not lens.any():
            verify_s += truth.draft_forward_fixed_s
        shift = 0.1 if extra and lens.any() else 0.0  # the chunks' draft share, in pass 0
        policy.observe(
            StepOutcome(
                conf=conf,
                verified_lens=d.lens,
                accepted=np.minimum(d.lens, 1),
                context_lens=ctx.context_lens,
                drafted_lens=lens,
                draft_time_s=slowdown * (draft_s + shift),
                verify_time_s=slowdown * (verify_s - shift),
                prefill_extra_s=extra,
            )
        )
    assert policy.times.verify_scale == pytest.approx(slowdown, rel=0.02)
    assert policy.times.draft_scale == pytest.approx(slowdown, rel=0.02)


# -- prefill credit: while prompt tokens wait for later steps, drafting must also pay for the
# admission it delays (module docstring)


def _with_backlog(ctx: StepContext, backlog: int) -> StepContext:
    return StepContext(
        context_lens=ctx.context_lens,
        max_draft=ctx.max_draft,
        budget_s=ctx.budget_s,
        prefill_extra_s=ctx.prefill_extra_s,
        prefill_backlog_tokens=backlog,
    )


@settings(max_examples=150, deadline=None)
@given(step_inputs())
def test_a_prefill_backlog_never_makes_the_drafter_draft_more(
    inp: tuple[StepContext, np.ndarray],
) -> None:
    ctx, conf = inp
    _, free = run_drafting(_policy(), _with_backlog(ctx, 0), conf)
    _, paced = run_drafting(_policy(), _with_backlog(ctx, 1000), conf)
    assert int(paced.sum()) <= int(free.sum())


def test_the_prefill_credit_stops_drafts_that_only_pay_when_admission_is_free() -> None:
    rng = np.random.default_rng(3)
    b, k = 32, 6
    base = StepContext(
        context_lens=rng.integers(200, 1500, size=b), max_draft=k, budget_s=None,
        prefill_extra_s=0.02,  # a chunk as long as a plain step of this batch
    )  # fmt: skip
    conf = np.full((b, k), 0.7)  # the third draft pays only if the chunk's time is free
    _, free = run_drafting(_policy(), base, conf)
    _, paced = run_drafting(_policy(), _with_backlog(base, 4096), conf)
    assert int(free.sum()) > 0
    assert int(paced.sum()) < int(free.sum())
    # no credit: the backlog changes nothing
    no_credit = AdaSpecPolicy(
        StepTimePredictor(GPU_LIKE), AcceptanceCalibrator.identity(), prefill_credit=0.0
    )
    _, same = run_drafting(no_credit, _with_backlog(base, 4096), conf)
    assert np.array_equal(same, free)


def test_prefill_credit_tokens_is_plain_decoding_output_in_the_chunks_time() -> None:
    from adaspec.policy.adaptive import prefill_credit_tokens

    ctx = StepContext(context_lens=np.full(4, 100), max_draft=4, prefill_backlog_tokens=10)
    # 4 rows, plain step 20 ms, chunks 10 ms: plain decoding emits 2 tokens in that time
    assert prefill_credit_tokens(0.5, ctx, 0.010, 0.020) == pytest.approx(1.0)
    assert prefill_credit_tokens(0.5, _with_backlog(ctx, 0), 0.010, 0.020) == 0.0
    assert prefill_credit_tokens(0.5, ctx, 0.0, 0.020) == 0.0
    with pytest.raises(ValueError, match="prefill_credit"):
        AdaSpecPolicy(prefill_credit=1.5)
