"""AdaSpec (arXiv 2503.05096): adaptive drafter, confidence-prior verifier and SLO guard.

Goodput of a step = expected emitted tokens / predicted step time, where
  expected tokens  E_i = 1 + Σ_j P_ij,  P_ij = Π_{m≤j} p̂_im  (p̂ = calibrated confidence),
  step time        T   = Σ draft passes + verification  (linear time model, bias-corrected).

*Drafter* (predict → execute → correct): before each draft pass, rank the still-drafting
requests by the expected value of their next token (survival so far × predicted acceptance of a
token not yet drafted) and pick the prefix of that ranking that maximises predicted goodput; the
others stop for good. After the pass the real confidences replace the prediction.

*Verifier*: drop drafted tokens in order of lowest survival (always a request's tail) while
goodput does not fall; each request ends up with its own length.

*SLO guard*: every request emits ≥ 1 token per step, so request i's time per token in this step
is T / E_i. A plan is admitted only if T / E_i ≤ budget for every request; plain decoding is
never refused. If even plain decoding is predicted to break the budget, no plan can meet it:
the step is flagged infeasible (the operator adds replicas) and the guard switches to damage
control: a draft pass is admitted only if it lowers the predicted worst time per token,
max_i T / E_i. At batch 1 that is exactly "speculate when it lowers TPOT"; in a large batch it
stops drafting that would slow down the requests that do not draft.

*Prompt chunks* (chunked prefill, policy/prefill.py) ride along with the step: their predicted
cost `ctx.prefill_extra_s` (from the profile's model; the policy applies its own verification
bias to it, as StepTimePredictor does to every prefill prediction) is part of T wherever T
is held against the budget (drafter, verifier, guard, the infeasibility check) and in the
prediction kept for the bias correction, so a step carrying a large chunk drafts less or is
flagged infeasible. It is *not* part of the goodput the drafter and verifier maximise: the prompt
costs the same however much is drafted, and amortising it over more drafts only lengthens the
step and slows admission (the simulator showed 2.6× TTFT P90 at saturation when it was).
*Prefill credit*: while admitted prompts still have tokens left after this step's chunks
(`ctx.prefill_backlog_tokens` > 0), the step's length also paces admission, so a draft pass must
pay for the prompt progress it delays. The drafter then credits the chunks' time with what plain
decoding would emit in it, times `prefill_credit` (w, default 0.5): with X the chunks' time and T₀
the plain step, it maximises (ΣE + w·b·X/T₀) / T instead of ΣE / T, which raises the bar for the
next draft in proportion to the chunk. Without it AdaSpec drafted as if admission were free and
lost 1–5% of goodput past saturation to the SmartSpec-style baseline in the simulator (load sweep
at 40 req/s: 0.954; with w = 0.5: 0.996 with P90 TPOT 20.9 against SmartSpec's 20.6 ms). Cutting
drafting outright whenever a backlog exists also recovered the goodput, but raised P90 TPOT
1.4–1.7× at moderate load (code ×4) where the credit costs ≤ 6%. The verifier does not use the
credit: what it prunes has been drafted already. When the engine is saturated — a backlog *and*
requests waiting for admission (`ctx.requests_waiting`) — AdaSpec does not draft at all: the chunk
was sized for a plain step, so every draft pass would stretch the steps that pace admission. A step
with chunks that does not draft at all also pays one draft forward's fixed cost to put the
chunks into the draft cache (drafting pays it in its first pass anyway), so plain decoding is
charged that too.

Everything is vectorised over the batch (O(B·K) numpy work per call, no Python loop over
requests) so the decision stays far below a step's duration. What it costs at any batch size
is numpy's fixed price per call (~0.5–1 µs), so the normal loop takes shortcuts that make fewer
calls: start() ranks nobody (nothing is drafted yet, the ranking is the batch order); after a
pass in which every drafting request drafted the same position (a request that stops never
resumes) the acceptance just predicted is reused and a prefix of the batch is handled through
views; the verifier decides "nothing to drop" from each request's last token, runs its loop on
(B,) arrays when nobody drafted more than one token, and otherwise on the drafted tokens only.
Every shortcut does the same floating-point operations in the same order as the general path,
so the answers are bit-identical (tests/unit/test_policy_equivalence.py replays a recording of
the policy before the shortcuts); anything unusual (a call without start(), lengths that do not
continue the step, a calibration table outside [0, 1], costs that fall with context) takes the
general path.
"""

from __future__ import annotations

from typing import cast

import numpy as np

from adaspec.contract import Profile, TimeModel
from adaspec.policy.base import (
    BoolArray,
    FloatArray,
    IntArray,
    StepContext,
    StepOutcome,
    VerifyDecision,
)
from adaspec.policy.calibration import AcceptanceCalibrator
from adaspec.policy.time_model import StepTimePredictor, default_cpu_time_model

_EPS = 1e-12
DEFAULT_PREFILL_CREDIT = 0.5


def prefill_credit_tokens(weight: float, ctx: StepContext, extra_s: float, plain_s: float) -> float:
    """Expected tokens the step's prompt chunks (`extra_s` seconds) are credited with while
    prompt tokens are left for later steps: what plain decoding (a step of `plain_s`) would emit
    in that time, times `weight` (the prefill credit, module docstring); 0 without a backlog."""
    if ctx.prefill_backlog_tokens <= 0 or extra_s <= 0.0 or plain_s <= 0.0:
        return 0.0
    return weight * ctx.batch * extra_s / plain_s


class StepCosts:
    """Per-step quantities derived from (context, confidences, lengths)."""

    __slots__ = ("E", "L", "P", "draft_s", "mask")

    def __init__(
        self,
        ctx: StepContext,
        conf: FloatArray,
        lens: IntArray,
        cal: AcceptanceCalibrator,
        times: StepTimePredictor,
    ) -> None:
        self.L = ctx.context_lens.astype(np.float64)
        k = conf.shape[1]
        j = np.arange(k)
        self.mask = j[None, :] < lens[:, None]
        p = np.where(self.mask, cal.predict(conf), 1.0)
        self.P = np.cumprod(p, axis=1) * self.mask
        self.E = 1.0 + self.P.sum(axis=1)
        rows = self.mask.sum(axis=0).astype(np.float64)
        ctx_work = (self.mask * (self.L[:, None] + j[None, :])).sum(axis=0)
        self.draft_s = float(times.draft_passes(rows, ctx_work).sum())


class _StepState:
    """Running per-step sums for the drafter (mutable; owned by one policy instance).

    `lens` is set while the state is *regular*: it holds exactly the drafted lengths `lens`
    (P_ij the survival of drafted token j, zero beyond, P_last that of each row's last token)
    and every acceptance in it came from a calibration table within [0, 1], so survival never
    grows along a request's drafts. None once a caller strays from that (the general paths
    then do the work). `depth` is then max(lens) and `front` the rows at that depth (None:
    all of them). `e_sum` is E.sum() when known (None: to be computed)."""

    __slots__ = (
        "E",
        "L",
        "P",
        "P_last",
        "b",
        "budget",
        "credit",
        "depth",
        "draft_s",
        "e_sum",
        "front",
        "infeasible",
        "lens",
        "s_sum",
        "work",
    )

    def __init__(self, b: int, L: FloatArray, k: int) -> None:
        self.b = b
        self.L = L
        self.P = np.zeros((b, max(k, 1)))
        self.P_last = np.empty(b)
        self.P_last.fill(1.0)
        self.E = self.P_last.copy()
        self.draft_s = 0.0
        self.s_sum = 0
        self.work = float(L.sum())
        self.budget: float | None = None  # the guard's budget this step (None: no guard)
        self.credit = 0.0  # expected tokens credited to the prompt chunks (prefill credit)
        self.infeasible = False  # even plain decoding breaks the budget: damage control
        self.lens: IntArray | None = None
        self.depth = 0
        self.front: BoolArray | None = None
        self.e_sum: float | None = float(b)  # E is all ones

    @classmethod
    def build(
        cls,
        ctx: StepContext,
        conf: FloatArray,
        lens: IntArray,
        cal: AcceptanceCalibrator,
        times: StepTimePredictor,
    ) -> _StepState:
        c = StepCosts(ctx, conf, lens, cal, times)
        st = cls(ctx.batch, c.L, max(ctx.max_draft, conf.shape[1]))
        st.P[:, : c.P.shape[1]] = c.P
        last = np.maximum(lens - 1, 0)
        st.P_last = np.where(lens > 0, c.P[np.arange(ctx.batch), last], 1.0)
        st.E = c.E.copy()
        st.e_sum = None
        st.draft_s = c.draft_s
        st.s_sum = int(lens.sum())
        st.work = _verify_ctx_work(c.L, lens.astype(np.float64))
        st.lens = lens.astype(np.int64) if cal.bounded else None
        st.depth = int(lens.max()) if lens.size else 0
        st.front = lens == st.depth
        return st


def _row_sums(P: FloatArray, k: int) -> FloatArray:
    """Row sums of P padded with zero columns to k columns, bit for bit as numpy sums the
    padded matrix: with at most two columns a row holds at most two non-zeros and every
    summation order gives the same sum; wider, it pads and lets numpy sum."""
    if P.shape[1] == 1:
        return P[:, 0].copy()
    if P.shape[1] == 2:
        out: FloatArray = P[:, 0] + P[:, 1]
        return out
    full = np.zeros((P.shape[0], k))
    full[:, : P.shape[1]] = P
    sums: FloatArray = full.sum(axis=1)
    return sums


def _verify_ctx_work(L: FloatArray, s: FloatArray) -> float:
    """Σ_i Σ_{t=0..s_i} (L_i + t): attention work of verifying s_i drafts + 1 token."""
    return float(((s + 1.0) * L + s * (s + 1.0) / 2.0).sum())


def _dinkelbach(
    ratio: FloatArray, surv: FloatArray, tau: FloatArray, g: float, a_full: float, t_full: float
) -> tuple[BoolArray | None, int, float]:
    """The verifier's Dinkelbach loop over candidate tokens (value `surv`, verification cost
    `tau`, `ratio` = surv / tau): drop every token whose value per second is below the step's
    goodput `g` until goodput stops rising. Returns the dropped set (None: nothing dropped),
    its size and the step time after the drop."""
    drop: BoolArray | None = None
    n_drop = 0
    t_r = t_full
    for _ in range(16):
        new_drop = ratio < g
        n_new = int(np.count_nonzero(new_drop))
        if n_new == n_drop:  # g only rises, so the dropped set only grows: same set
            break
        a_new = a_full - float(surv[new_drop].sum())
        t_new = t_full - float(tau[new_drop].sum())
        if a_new / t_new <= g:
            break
        drop, n_drop, t_r, g = new_drop, n_new, t_new, a_new / t_new
    return drop, n_drop, t_r


class AdaSpecPolicy:
    """The adaptive, SLO-aware speculative policy."""

    name = "adaspec"

    def __init__(
        self,
        times: StepTimePredictor | None = None,
        calibrator: AcceptanceCalibrator | None = None,
        next_token_blend: float = 0.5,
        prefill_credit: float = DEFAULT_PREFILL_CREDIT,
    ) -> None:
        self.times = times or StepTimePredictor(default_cpu_time_model())
        self.cal = calibrator or AcceptanceCalibrator.identity()
        if not 0.0 <= next_token_blend <= 1.0:
            raise ValueError("next_token_blend must be in [0, 1]")
        if not 0.0 <= prefill_credit <= 1.0:
            raise ValueError("prefill_credit must be in [0, 1]")
        self._blend = next_token_blend
        self._prefill_credit = prefill_credit
        self._refusals = 0
        self._last_decision: VerifyDecision | None = None
        self._state: _StepState | None = None
        self._predicted: tuple[IntArray, float, float] | None = None

    @classmethod
    def from_profile(cls, profile: Profile | None) -> AdaSpecPolicy:
        if profile is None:
            return cls()
        return cls(
            StepTimePredictor(profile.time_model),
            AcceptanceCalibrator.from_profile(profile.calibration),
        )

    @classmethod
    def from_time_model(cls, model: TimeModel) -> AdaSpecPolicy:
        return cls(StepTimePredictor(model))

    # -- drafter ------------------------------------------------------------------------

    def start(self, ctx: StepContext) -> BoolArray:
        self._refusals = 0
        self._state = None
        b = ctx.batch
        saturated = ctx.prefill_backlog_tokens > 0 and ctx.requests_waiting > 0
        if ctx.max_draft <= 0 or b == 0 or saturated:
            return np.zeros(b, dtype=np.bool_)  # (saturated: see the module docstring)
        st = _StepState(b, ctx.context_lens.astype(np.float64), ctx.max_draft)
        if self.cal.bounded:
            st.lens = np.zeros(b, dtype=np.int64)  # (front None: every row is at depth 0)
        self._state = st
        # Nothing drafted yet: every request is a candidate and its next token is worth the
        # running acceptance rate, so the ranking is the batch order (a stable sort of equal
        # values) and the contexts of the tokens drafted next are the contexts themselves.
        extra = self._prefill_s(ctx)
        base = st.draft_s + self.times.verify(b, st.s_sum + b, st.work)  # = plain verification
        plain_prefill = self._plain_prefill_s(ctx)  # the chunks' own draft forward included
        st.budget = ctx.budget_s
        st.infeasible = st.budget is not None and base + plain_prefill > st.budget
        t_cur = base + (plain_prefill - extra)
        st.credit = prefill_credit_tokens(self._prefill_credit, ctx, extra, base)
        gain = np.full(b, self.cal.mean_rate)  # P_last (= 1) × the rate
        # (E is all ones: its sum is b and its minimum 1)
        return self._pick(st, None, gain, st.L, base, t_cur, float(b), extra, 1.0)

    def _set_budget(self, st: _StepState, ctx: StepContext) -> None:
        st.budget = ctx.budget_s if ctx.batch else None
        st.infeasible = st.budget is not None and self.plain_step_s(ctx) > st.budget

    def _prefill_s(self, ctx: StepContext) -> float:
        """The chunks' share of the step's forwards, bias-corrected like every prediction."""
        return ctx.prefill_extra_s * self.times.verify_scale

    def _plain_prefill_s(self, ctx: StepContext) -> float:
        """What the step's prompt chunks cost if nobody drafts: their share of the forwards plus
        the draft forward of their own they then need (only a backend with a draft model, i.e.
        max_draft > 0, runs it)."""
        extra = self._prefill_s(ctx)
        if extra > 0.0 and ctx.max_draft > 0:
            return extra + self.times.draft_forward_fixed_s
        return extra

    def plain_step_s(self, ctx: StepContext) -> float:
        """Predicted time of the step if nobody drafts (prompt chunks included)."""
        return self.predicted_plain_step_s(ctx.context_lens) + self._plain_prefill_s(ctx)

    def _step_state(
        self, ctx: StepContext, conf: FloatArray, lens: IntArray, drafted: BoolArray
    ) -> _StepState:
        """Per-step running sums, updated with the pass that just ran (O(rows) numpy work).

        Rebuilt from scratch when the caller's lengths do not continue the cached state
        (a direct call without start(), or a different batch)."""
        st = self._state
        n_new = int(np.count_nonzero(drafted))
        if (
            st is not None
            and st.b == ctx.batch
            and st.P.shape[1] >= conf.shape[1]
            and st.s_sum + n_new == int(lens.sum())
        ):
            if n_new:
                rows = np.nonzero(drafted)[0]
                j = lens[rows] - 1
                p = self.cal.predict(conf[rows, j])
                st.P_last[rows] *= p
                st.P[rows, j] = st.P_last[rows]
                st.E[rows] += st.P_last[rows]
                pos = st.L[rows] + j
                st.draft_s += self.times.draft_pass(float(n_new), float(pos.sum()))
                st.s_sum += n_new
                st.work += float(pos.sum()) + n_new
                st.lens = None
                st.e_sum = None
            return st
        st = _StepState.build(ctx, conf, lens, self.cal, self.times)
        self._set_budget(st, ctx)
        st.credit = prefill_credit_tokens(
            self._prefill_credit,
            ctx,
            self._prefill_s(ctx),
            self.predicted_plain_step_s(ctx.context_lens),
        )
        self._state = st
        return st

    def keep_drafting(
        self,
        ctx: StepContext,
        conf: FloatArray,
        lens: IntArray,
        drafting: BoolArray,
        _first: bool = False,
    ) -> BoolArray:
        st = self._state
        if (
            not _first
            and st is not None
            and st.lens is not None
            and st.b == ctx.batch
            and st.P.shape[1] >= conf.shape[1]
            and isinstance(drafting, np.ndarray)
            and drafting.dtype == np.bool_
        ):
            # The normal loop: the drafting rows are all at the state's depth (they drafted
            # every pass so far) and each drafted one more token; no other length moved.
            after = st.lens + drafting
            if (
                after.shape == lens.shape
                and (after == lens).all()
                and (st.front is None or (drafting <= st.front).all())
            ):
                rows = drafting.nonzero()[0]
                if rows.shape[0]:
                    return self._next_pass(ctx, st, conf, rows, st.depth, after, drafting)
        return self._keep_drafting_general(ctx, conf, lens, drafting, _first)

    def _next_pass(
        self,
        ctx: StepContext,
        st: _StepState,
        conf: FloatArray,
        rows: IntArray,
        j: int,
        lens: IntArray,
        drafted: BoolArray,
    ) -> BoolArray:
        """keep_drafting after a pass in which every drafting request drafted position j (the
        normal loop): the acceptance predicted for the tokens just drafted is also the last
        confidence the next token's guess is blended from, and the candidates are the rows.
        `lens`: the new lengths (a copy the state keeps); `drafted`: the rows as a mask."""
        n = rows.shape[0]
        cal = self.cal
        # rows 0..n-1 (the first pass after start() picks a prefix of the batch): views
        sel: IntArray | slice = slice(0, n) if rows[n - 1] == n - 1 else rows
        p = cal.predict(conf[sel, j])
        prob = st.P_last[sel] * p  # survival of the token just drafted
        st.P_last[sel] = prob
        st.P[sel, j] = prob
        st.E[sel] += prob
        st.e_sum = None
        st.lens = lens if cal.bounded else None
        st.depth = j + 1
        st.front = drafted.copy()
        pos = st.L[sel] + j if j else st.L[sel]  # context of the tokens just drafted
        pos_sum = float(pos.sum())
        st.draft_s += self.times.draft_pass(float(n), pos_sum)
        st.s_sum += n
        st.work += pos_sum + n
        if j + 1 >= ctx.max_draft:
            return np.zeros(st.b, dtype=np.bool_)
        extra = self._prefill_s(ctx)
        base = st.draft_s + self.times.verify(st.b, st.s_sum + st.b, st.work)
        t_cur = base + 0.0  # drafts ran: the chunks rode along with the first pass
        blend = self._blend
        gain = prob * (blend * p + (1.0 - blend) * cal.mean_rate)
        order = (-gain).argsort(kind="stable")
        nxt = pos[order]
        nxt += 1.0  # L + lens of the ranked candidates
        a_cur = st.e_sum = float(st.E.sum())
        idx = order if isinstance(sel, slice) else rows[order]
        return self._pick(st, idx, gain[order], nxt, base, t_cur, a_cur, extra, None)

    def _pick(
        self,
        st: _StepState,
        idx: IntArray | None,
        gain: FloatArray,
        nxt: FloatArray,
        base: float,
        t_cur: float,
        a_cur: float,
        extra: float,
        e_min: float | None,
    ) -> BoolArray:
        """Choose the prefix of the ranked candidates `idx` (None: every row, in batch order)
        that drafts next.

        `gain`: the value of each one's next token; `nxt`: the context of the token it drafts
        next (L + lens); `base`, `t_cur`, `a_cur`: the step's time and expected tokens if
        nobody drafts any more (t_cur as the guard sees it before the chunks are added);
        `e_min`: min E when known (else computed)."""
        out = np.zeros(st.b, dtype=np.bool_)
        if st.credit:
            a_cur += st.credit  # the prompt chunks' progress (prefill credit, module docstring)
        g_cur = a_cur / t_cur
        t_m = self.times.draft_and_verify_prefix(nxt.cumsum(), base)
        g_m = gain.cumsum()
        g_m += a_cur
        g_m /= t_m
        best_any = int(g_m.argmax())
        floor = g_cur * (1.0 + 1e-9)
        if g_m[best_any] <= floor:
            return out
        budget = st.budget
        if st.infeasible:
            # damage control: admit the prefix only if it lowers max_i T / E_i, crediting the
            # drafted tokens their predicted value (E of the others is unchanged)
            if idx is None:
                idx = np.arange(st.b)
            e_cur = float(st.E.min())
            fixed = np.ones(st.b, dtype=np.bool_)
            fixed[idx] = False
            fixed_min = float(st.E[fixed].min()) if fixed.any() else np.inf
            chosen_min = np.minimum.accumulate(st.E[idx] + gain)
            suffix = np.minimum.accumulate(st.E[idx][::-1])[::-1]
            rest_min = np.append(suffix[1:], np.inf)
            min_e = np.minimum(np.minimum(chosen_min, rest_min), fixed_min)
            ok = ((t_m + extra) / min_e < (t_cur + extra) / e_cur) & (g_m > floor)
            if not ok.any():
                return out
            best = int(np.argmax(np.where(ok, g_m, -np.inf)))
        elif budget is not None:
            # Conservative on purpose: the token about to be drafted is credited nothing. Its
            # real confidence is only known after the pass is paid for; crediting its
            # *predicted* value could leave a step whose sunk draft time already breaks the
            # budget. With E counted before the pass, verifying everything drafted stays
            # admissible after the pass (E only grows), so the guard holds at verification.
            limit = budget * (float(st.E.min()) if e_min is None else e_min)
            if g_m[best_any] > floor and t_m[best_any] + extra <= limit:
                best = best_any  # the best prefix is admitted (what the masked argmax finds)
            else:
                t_m += extra
                ok = t_m <= limit
                ok &= g_m > floor
                admitted = np.where(ok, g_m, -np.inf)
                best = int(admitted.argmax())
                if admitted[best] == -np.inf:  # nothing admitted
                    self._refusals += best_any + 1
                    return out
                self._refusals += max(0, best_any - best)
        else:
            best = best_any
        if idx is None:
            out[: best + 1] = True
        else:
            out[idx[: best + 1]] = True
        return out

    def _keep_drafting_general(
        self,
        ctx: StepContext,
        conf: FloatArray,
        lens: IntArray,
        drafting: BoolArray,
        first: bool,
    ) -> BoolArray:
        """keep_drafting for any lengths (a call without start(), rows at different positions)."""
        b = ctx.batch
        out = np.zeros(b, dtype=np.bool_)
        st = self._step_state(ctx, conf, lens, drafting)
        cand = (np.ones(b, dtype=np.bool_) if first else drafting) & (lens < ctx.max_draft)
        if not cand.any():
            return out
        # Goodput is judged on the decoding work alone: the chunks cost the same whatever is
        # drafted (the prompt must be prefilled once), so amortising them over more drafts
        # would only lengthen the step and slow admission. The guard (_pick) counts them.
        extra = self._prefill_s(ctx)
        base = st.draft_s + self.times.verify(b, st.s_sum + b, st.work)
        # before the first pass, stopping here means the chunks need a draft forward of their own
        t_cur = base + (self._plain_prefill_s(ctx) - extra if st.s_sum == 0 else 0.0)
        a_cur = float(st.E.sum())

        # value of each candidate's next token: survival so far × predicted acceptance
        idx = np.nonzero(cand)[0]
        rate = self.cal.mean_rate
        has = lens[idx] > 0
        if has.any():
            p_last = self.cal.predict(conf[idx, np.maximum(lens[idx] - 1, 0)])
            p_next = np.where(has, self._blend * p_last + (1.0 - self._blend) * rate, rate)
        else:
            p_next = np.full(idx.shape[0], rate)
        gain = st.P_last[idx] * p_next
        order = np.argsort(-gain, kind="stable")
        idx, gain = idx[order], gain[order]
        nxt = st.L[idx] + lens[idx]  # context of the tokens drafted / verified next
        return self._pick(st, idx, gain, nxt, base, t_cur, a_cur, extra, None)

    # -- verifier + guard ---------------------------------------------------------------

    def verify_lengths(self, ctx: StepContext, conf: FloatArray, lens: IntArray) -> VerifyDecision:
        b = ctx.batch
        lens = lens.astype(np.int64)
        ctx_lens = ctx.context_lens  # (sums of integers: exact, as float64 or not)
        t_plain = self.times.verify(b, float(b), float(ctx_lens.sum())) + self._plain_prefill_s(ctx)
        t_plain = t_plain if b else 0.0
        infeasible = ctx.budget_s is not None and t_plain > ctx.budget_s
        s_total = int(lens.sum())
        if b == 0 or s_total == 0:
            return self._decide(
                VerifyDecision(
                    lens=np.zeros(b, dtype=np.int64),
                    predicted_step_s=t_plain,
                    expected_tokens=np.ones(b, dtype=np.float64),
                    guard_refusals=self._refusals,
                    infeasible=infeasible,
                ),
                0.0,
                t_plain,
            )
        st = self._state
        if st is None or st.b != b or st.s_sum != s_total or st.P.shape[1] < conf.shape[1]:
            st = _StepState.build(ctx, conf, lens, self.cal, self.times)
        k = conf.shape[1]
        # goodput on the decoding work alone (see keep_drafting); the guard adds the chunks
        t_full = st.draft_s + self.times.verify(b, st.s_sum + b, st.work)
        a_full = float(st.E.sum()) if st.e_sum is None else st.e_sum
        g = a_full / t_full

        # Fast path (Dinkelbach): drop every token whose expected value per second of
        # verification is below the step's goodput, until goodput stops rising. Value/cost is
        # non-increasing along a request's drafts, so what is dropped is always a tail.
        vpt, vpc = self.times.verify_per_token_s, self.times.verify_per_ctx_s
        if st.lens is not None and st.lens.shape == lens.shape and (st.lens == lens).all():
            # A regular state. Each row's last token has the row's lowest value/cost when
            # there is only one, or when the verification cost is positive and grows along a
            # row (survival never grows): then if no last token is below the goodput, nothing
            # is dropped (a row without drafts can only raise a false alarm).
            tau = cast(FloatArray, vpt + vpc * (ctx_lens + lens))  # each last token: L + j + 1
            ratio = st.P_last / tau
            lowest_last = st.depth <= 1 or (vpt > 0.0 and vpc >= 0.0 and bool(ctx_lens.min() >= 0))
            if lowest_last and not (ratio < g).any():
                P = st.P[:, : min(st.depth, k)]  # already zero beyond lens
                kept_sum = _row_sums(P, k)
                return self._verified(ctx, infeasible, lens, lens, P, st, t_full, kept_sum, 0, k)
            if st.depth == 1 and k >= 1:
                # One draft per drafting row: the drafted tokens are column 0 of the rows with
                # lens 1, in row order (that of P[mask]); the others cannot be dropped.
                ratio[lens == 0] = np.inf
                return self._prune_single(
                    ctx, infeasible, lens, st, tau, ratio, g, a_full, t_full, k
                )
        L = ctx_lens.astype(np.float64)
        # the drafted tokens lie in the first max(lens) columns
        mask = np.arange(min(int(lens.max()), k))[None, :] < lens[:, None]
        P = st.P[:, : mask.shape[1]] * mask
        # Only drafted tokens can be dropped: work on them alone, in row-major order (that of
        # P[mask], so every sum adds the same numbers in the same order).
        rows, cols = mask.nonzero()
        surv = P[rows, cols]
        tau = vpt + vpc * (L[rows] + cols + 1.0)
        ratio = surv / tau
        drop, _, t_r = _dinkelbach(ratio, surv, tau, g, a_full, t_full)
        if drop is None:
            kept_sum = _row_sums(P, k)
            return self._verified(ctx, infeasible, lens, lens, P, st, t_r, kept_sum, 0, k)
        cut = np.bincount(rows[drop], minlength=b)
        kept = mask.copy()
        kept[rows[drop], cols[drop]] = False
        kept_sum = _row_sums(P * kept, k)
        pruned = int(cut.sum())
        new_lens = lens - cut
        return self._verified(ctx, infeasible, lens, new_lens, P, st, t_r, kept_sum, pruned, k)

    def _prune_single(
        self,
        ctx: StepContext,
        infeasible: bool,
        lens: IntArray,
        st: _StepState,
        tau: FloatArray,
        ratio: FloatArray,
        g: float,
        a_full: float,
        t_full: float,
        k: int,
    ) -> VerifyDecision:
        """The Dinkelbach loop of verify_lengths when every request drafted at most one token,
        on (B,) arrays (`ratio` is inf where nothing was drafted)."""
        surv = st.P[:, 0]
        drop, n_drop, t_r = _dinkelbach(ratio, surv, tau, g, a_full, t_full)
        P = st.P[:, :1]
        kept_sum = surv.copy()
        if drop is None:
            return self._verified(ctx, infeasible, lens, lens, P, st, t_r, kept_sum, 0, k)
        kept_sum[drop] = 0.0
        return self._verified(ctx, infeasible, lens, lens - drop, P, st, t_r, kept_sum, n_drop, k)

    def _verified(
        self,
        ctx: StepContext,
        infeasible: bool,
        lens: IntArray,
        new_lens: IntArray,
        P: FloatArray,
        st: _StepState,
        t_r: float,
        kept_sum: FloatArray,
        pruned: int,
        k: int,
    ) -> VerifyDecision:
        """The goodput-best lengths `new_lens` out of the drafted `lens` (`t_r` of decoding
        work, Σ survival `kept_sum` per row) if the guard admits them, else the guard's scan.
        `P` holds the survival of every drafted token (zero elsewhere) in its first columns."""
        budget = ctx.budget_s
        extra = self._prefill_s(ctx)
        expected = 1.0 + kept_sum
        if budget is None or (not infeasible and t_r + extra <= budget * float(expected.min())):
            return self._decide(
                VerifyDecision(
                    lens=new_lens,
                    predicted_step_s=t_r + extra,
                    expected_tokens=expected,
                    pruned=pruned,
                    guard_refusals=self._refusals,
                    infeasible=bool(infeasible),
                ),
                st.draft_s,
                t_r + extra - st.draft_s,
            )
        full = np.zeros((P.shape[0], k))  # the scan works on every column of conf
        full[:, : P.shape[1]] = P
        L = ctx.context_lens.astype(np.float64)
        return self._verify_scan(ctx, None if infeasible else budget, lens, L, full, st)

    def _verify_scan(
        self,
        ctx: StepContext,
        budget: float | None,
        lens: IntArray,
        L: FloatArray,
        P: FloatArray,
        st: _StepState,
    ) -> VerifyDecision:
        """Slow path when the guard binds: scan every removal count in survival order. With no
        budget to meet (infeasible step), or when no count meets it (the prediction moved after
        the drafts were paid for), take the one with the lowest worst-case time per token."""
        b = ctx.batch
        ii, jj = np.nonzero(np.arange(P.shape[1])[None, :] < lens[:, None])
        surv = P[ii, jj]
        order = np.lexsort((-jj, surv))  # lowest survival first; a request's tail first
        ii, jj, surv = ii[order], jj[order], surv[order]
        n = ii.shape[0]
        s0 = lens.astype(np.float64)
        removed_work = np.concatenate(([0.0], np.cumsum(L[ii] + jj + 1.0)))
        removed_tok = np.arange(n + 1, dtype=np.float64)
        a_r = float(st.E.sum()) - np.concatenate(([0.0], np.cumsum(surv)))
        t_r = st.draft_s + self.times.verify_vec(
            b, float(s0.sum()) + b - removed_tok, st.work - removed_work
        )
        g_r = a_r / t_r  # goodput on the decoding work alone (see keep_drafting)
        t_r = t_r + self._prefill_s(ctx)  # what the step takes: the guard's time
        # E of the request just cut back to length j is 1 + Σ_{j'<j} P; E only falls
        prefix_e = 1.0 + np.cumsum(P, axis=1) - P
        e0 = float(st.E.min())
        min_e = np.concatenate(([e0], np.minimum(e0, np.minimum.accumulate(prefix_e[ii, jj]))))
        per_token = t_r / min_e
        feasible = per_token <= budget if budget is not None else np.zeros_like(per_token, bool)
        best_any = int(np.argmax(g_r))
        r = (
            int(np.argmax(np.where(feasible, g_r, -np.inf)))
            if feasible.any()
            else int(np.argmin(per_token))
        )
        new_lens = lens - np.bincount(ii[:r], minlength=b).astype(np.int64)
        keep = np.arange(P.shape[1])[None, :] < new_lens[:, None]
        return self._decide(
            VerifyDecision(
                lens=new_lens,
                predicted_step_s=float(t_r[r]),
                expected_tokens=1.0 + (P * keep).sum(axis=1),
                pruned=min(r, best_any),
                guard_refusals=self._refusals + (max(0, r - best_any) if budget else 0),
                infeasible=budget is None,
            ),
            st.draft_s,
            float(t_r[r]) - st.draft_s,
        )

    def _decide(self, d: VerifyDecision, draft_s: float, verify_s: float) -> VerifyDecision:
        self._last_decision = d
        self._predicted = (d.lens, draft_s, verify_s)
        return d

    # -- online correction --------------------------------------------------------------

    def observe(self, outcome: StepOutcome) -> None:
        conf = outcome.conf
        if int(outcome.verified_lens.sum()) == 0:
            self.cal.relax()
        elif conf.ndim == 2 and conf.shape[1] > 0:
            self.cal.update(conf, outcome.verified_lens, outcome.accepted)
        b = outcome.context_lens.shape[0]
        if b == 0:
            return
        cached = self._predicted
        if cached is not None and (
            cached[0] is outcome.verified_lens or np.array_equal(cached[0], outcome.verified_lens)
        ):
            pred_draft, pred_verify = cached[1], cached[2]
        else:  # observe() without the matching verify_lengths(): recompute the prediction
            drafted = outcome.drafted_lens if outcome.drafted_lens.size else outcome.verified_lens
            L = outcome.context_lens.astype(np.float64)
            k = int(drafted.max()) if drafted.size else 0
            pred_draft = 0.0
            if k > 0:
                j = np.arange(k)
                mask = j[None, :] < drafted[:, None]
                rows = mask.sum(axis=0).astype(np.float64)
                ctx_work = (mask * (L[:, None] + j[None, :])).sum(axis=0)
                pred_draft = float(self.times.draft_passes(rows, ctx_work).sum())
            s = outcome.verified_lens.astype(np.float64)
            pred_verify = self.times.verify(b, float(s.sum()) + b, _verify_ctx_work(L, s))
            pred_verify += outcome.prefill_extra_s * self.times.verify_scale
            if outcome.prefill_extra_s > 0.0 and k == 0 and conf.shape[1] > 0:
                pred_verify += self.times.draft_forward_fixed_s  # the chunks' own draft forward
        self._predicted = None
        self.times.observe_step(
            pred_draft, pred_verify, outcome.draft_time_s, outcome.verify_time_s,
            outcome.prefill_extra_s,
        )  # fmt: skip

    def predicted_plain_step_s(self, context_lens: IntArray) -> float:
        b = context_lens.shape[0]
        return self.times.verify(b, float(b), float(context_lens.sum()))
