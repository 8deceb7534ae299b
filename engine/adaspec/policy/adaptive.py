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
step and slows admission (the simulator showed 2.6× TTFT P90 at saturation when it was). A step
with chunks that does not draft at all also pays one draft forward's fixed cost to put the
chunks into the draft cache (drafting pays it in its first pass anyway), so plain decoding is
charged that too.

Everything is vectorised over the batch (O(B·K) numpy work per call, no Python loop over
requests) so the decision stays far below a step's duration.
"""

from __future__ import annotations

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
    """Running per-step sums for the drafter (mutable; owned by one policy instance)."""

    __slots__ = ("E", "L", "P", "P_last", "b", "budget", "draft_s", "infeasible", "s_sum", "work")

    def __init__(self, b: int, L: FloatArray, k: int) -> None:
        self.b = b
        self.L = L
        self.P = np.zeros((b, max(k, 1)))
        self.P_last = np.ones(b)
        self.E = np.ones(b)
        self.draft_s = 0.0
        self.s_sum = 0
        self.work = float(L.sum())
        self.budget: float | None = None  # the guard's budget this step (None: no guard)
        self.infeasible = False  # even plain decoding breaks the budget: damage control

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
        st.draft_s = c.draft_s
        st.s_sum = int(lens.sum())
        st.work = _verify_ctx_work(c.L, lens.astype(np.float64))
        return st


def _verify_ctx_work(L: FloatArray, s: FloatArray) -> float:
    """Σ_i Σ_{t=0..s_i} (L_i + t): attention work of verifying s_i drafts + 1 token."""
    return float(((s + 1.0) * L + s * (s + 1.0) / 2.0).sum())


class AdaSpecPolicy:
    """The adaptive, SLO-aware speculative policy."""

    name = "adaspec"

    def __init__(
        self,
        times: StepTimePredictor | None = None,
        calibrator: AcceptanceCalibrator | None = None,
        next_token_blend: float = 0.5,
    ) -> None:
        self.times = times or StepTimePredictor(default_cpu_time_model())
        self.cal = calibrator or AcceptanceCalibrator.identity()
        if not 0.0 <= next_token_blend <= 1.0:
            raise ValueError("next_token_blend must be in [0, 1]")
        self._blend = next_token_blend
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
        if ctx.max_draft <= 0 or b == 0:
            return np.zeros(b, dtype=np.bool_)
        self._state = _StepState(b, ctx.context_lens.astype(np.float64), ctx.max_draft)
        self._set_budget(self._state, ctx)
        conf = np.zeros((b, ctx.max_draft), dtype=np.float64)
        lens = np.zeros(b, dtype=np.int64)
        return self.keep_drafting(ctx, conf, lens, np.zeros(b, dtype=np.bool_), _first=True)

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
            return st
        st = _StepState.build(ctx, conf, lens, self.cal, self.times)
        self._set_budget(st, ctx)
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
        b = ctx.batch
        out = np.zeros(b, dtype=np.bool_)
        st = self._step_state(ctx, conf, lens, drafting)
        cand = (np.ones(b, dtype=np.bool_) if _first else drafting) & (lens < ctx.max_draft)
        if not cand.any():
            return out
        # Goodput is judged on the decoding work alone: the chunks cost the same whatever is
        # drafted (the prompt must be prefilled once), so amortising them over more drafts
        # would only lengthen the step and slow admission. The guard (below) counts them.
        extra = self._prefill_s(ctx)
        base = st.draft_s + self.times.verify(b, st.s_sum + b, st.work)
        # before the first pass, stopping here means the chunks need a draft forward of their own
        t_cur = base + (self._plain_prefill_s(ctx) - extra if st.s_sum == 0 else 0.0)
        a_cur = float(st.E.sum())
        g_cur = a_cur / t_cur

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

        m = np.arange(1.0, idx.shape[0] + 1.0)
        pos = np.cumsum(st.L[idx] + lens[idx])  # context of the tokens drafted / verified next
        t_m = base + self.times.draft_and_verify_increment(m, pos)
        g_m = (a_cur + np.cumsum(gain)) / t_m
        best_any = int(np.argmax(g_m))
        if g_m[best_any] <= g_cur * (1.0 + 1e-9):
            return out
        budget = st.budget
        if st.infeasible:
            # damage control: admit the prefix only if it lowers max_i T / E_i, crediting the
            # drafted tokens their predicted value (E of the others is unchanged)
            e_cur = float(st.E.min())
            fixed = ~cand
            fixed_min = float(st.E[fixed].min()) if fixed.any() else np.inf
            chosen_min = np.minimum.accumulate(st.E[idx] + gain)
            suffix = np.minimum.accumulate(st.E[idx][::-1])[::-1]
            rest_min = np.append(suffix[1:], np.inf)
            min_e = np.minimum(np.minimum(chosen_min, rest_min), fixed_min)
            ok = ((t_m + extra) / min_e < (t_cur + extra) / e_cur) & (g_m > g_cur * (1.0 + 1e-9))
            if not ok.any():
                return out
            best = int(np.argmax(np.where(ok, g_m, -np.inf)))
        elif budget is not None:
            # Conservative on purpose: the token about to be drafted is credited nothing. Its
            # real confidence is only known after the pass is paid for; crediting its
            # *predicted* value could leave a step whose sunk draft time already breaks the
            # budget. With E counted before the pass, verifying everything drafted stays
            # admissible after the pass (E only grows), so the guard holds at verification.
            ok = (t_m + extra <= budget * float(st.E.min())) & (g_m > g_cur * (1.0 + 1e-9))
            if not ok.any():
                self._refusals += best_any + 1
                return out
            best = int(np.argmax(np.where(ok, g_m, -np.inf)))
            self._refusals += max(0, best_any - best)
        else:
            best = best_any
        out[idx[: best + 1]] = True
        return out

    # -- verifier + guard ---------------------------------------------------------------

    def verify_lengths(self, ctx: StepContext, conf: FloatArray, lens: IntArray) -> VerifyDecision:
        b = ctx.batch
        lens = lens.astype(np.int64)
        L = ctx.context_lens.astype(np.float64)
        t_plain = self.times.verify(b, float(b), float(L.sum())) + self._plain_prefill_s(ctx)
        t_plain = t_plain if b else 0.0
        infeasible = ctx.budget_s is not None and t_plain > ctx.budget_s
        budget = ctx.budget_s
        extra = self._prefill_s(ctx)
        if b == 0 or int(lens.sum()) == 0:
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
        if st is None or st.b != b or st.s_sum != int(lens.sum()) or st.P.shape[1] < conf.shape[1]:
            st = _StepState.build(ctx, conf, lens, self.cal, self.times)
        k = conf.shape[1]
        mask = np.arange(k)[None, :] < lens[:, None]
        P = st.P[:, :k] * mask
        # goodput on the decoding work alone (see keep_drafting); the guard adds the chunks
        t_full = st.draft_s + self.times.verify(b, st.s_sum + b, st.work)
        a_full = float(st.E.sum())

        # Fast path (Dinkelbach): drop every token whose expected value per second of
        # verification is below the step's goodput, until goodput stops rising. Value/cost is
        # non-increasing along a request's drafts, so what is dropped is always a tail.
        tau = self.times.verify_per_token_s + self.times.verify_per_ctx_s * (
            L[:, None] + np.arange(k)[None, :] + 1.0
        )
        ratio = np.where(mask, P / tau, np.inf)
        g = a_full / t_full
        drop = np.zeros_like(mask)
        t_r = t_full
        for _ in range(16):
            new_drop = ratio < g
            if np.array_equal(new_drop, drop):
                break
            a_new = a_full - float(P[new_drop].sum())
            t_new = t_full - float(tau[new_drop].sum())
            if a_new / t_new <= g:
                break
            drop, t_r, g = new_drop, t_new, a_new / t_new
        cut = drop.sum(axis=1)
        new_lens = lens - cut
        expected = 1.0 + (P * ~drop).sum(axis=1)
        if budget is None or (not infeasible and t_r + extra <= budget * float(expected.min())):
            return self._decide(
                VerifyDecision(
                    lens=new_lens,
                    predicted_step_s=t_r + extra,
                    expected_tokens=expected,
                    pruned=int(cut.sum()),
                    guard_refusals=self._refusals,
                    infeasible=bool(infeasible),
                ),
                st.draft_s,
                t_r + extra - st.draft_s,
            )
        return self._verify_scan(ctx, None if infeasible else budget, lens, L, P, st)

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
        if cached is not None and np.array_equal(cached[0], outcome.verified_lens):
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
        if outcome.prefill_extra_s > 0.0:
            # The chunks' cost is split between draft pass 0 and the verification in a way the
            # combined prefill model cannot separate. Take the draft passes as predicted (their
            # bias is learnt on steps without chunks) and correct the verification bias (which
            # also scales the prefill model) from the rest of the step.
            observed = outcome.draft_time_s + outcome.verify_time_s
            self.times.observe(0.0, 0.0, pred_verify, observed - pred_draft)
            return
        self.times.observe(pred_draft, outcome.draft_time_s, pred_verify, outcome.verify_time_s)

    def predicted_plain_step_s(self, context_lens: IntArray) -> float:
        b = context_lens.shape[0]
        return self.times.verify(b, float(b), float(context_lens.sum()))
