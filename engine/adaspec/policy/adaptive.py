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
is T / E_i. A plan is admitted only if T / E_i ≤ budget for every request. Plain decoding is
the floor; if even plain decoding breaks the budget the step is flagged infeasible and the plan
with the lowest worst-case time per token is taken.

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
        b = ctx.batch
        if ctx.max_draft <= 0 or b == 0:
            return np.zeros(b, dtype=np.bool_)
        conf = np.zeros((b, 1), dtype=np.float64)
        lens = np.zeros(b, dtype=np.int64)
        return self.keep_drafting(ctx, conf, lens, np.ones(b, dtype=np.bool_))

    def keep_drafting(
        self, ctx: StepContext, conf: FloatArray, lens: IntArray, drafting: BoolArray
    ) -> BoolArray:
        b = ctx.batch
        out = np.zeros(b, dtype=np.bool_)
        cand = drafting & (lens < ctx.max_draft)
        if not cand.any():
            return out
        c = StepCosts(ctx, conf, lens, self.cal, self.times)
        s = lens.astype(np.float64)
        t_cur = c.draft_s + self.times.verify(b, float(s.sum()) + b, _verify_ctx_work(c.L, s))
        a_cur = float(c.E.sum())
        g_cur = a_cur / t_cur

        # value of each candidate's next token: survival so far × predicted acceptance
        idx = np.nonzero(cand)[0]
        last = np.maximum(lens[idx] - 1, 0)
        has = lens[idx] > 0
        surv = np.where(has, c.P[idx, last], 1.0)
        rate = self.cal.mean_rate
        p_last = self.cal.predict(conf[idx, last])
        p_next = np.where(has, self._blend * p_last + (1.0 - self._blend) * rate, rate)
        gain = surv * p_next
        order = np.argsort(-gain, kind="stable")
        idx, gain = idx[order], gain[order]

        m = np.arange(1, idx.shape[0] + 1, dtype=np.float64)
        pos = c.L[idx] + lens[idx]  # context of the token drafted / verified next
        d_pass = self.times.draft_passes(m, np.cumsum(pos))
        d_verify = self.times.verify_per_token_s * m + self.times.verify_per_ctx_s * np.cumsum(
            pos + 1.0
        )
        t_m = t_cur + d_pass + d_verify
        g_m = (a_cur + np.cumsum(gain)) / t_m
        better = g_m > g_cur * (1.0 + 1e-9)
        feasible = self._guard_prefix(ctx, c.E, cand, idx, gain, t_m)
        ok = better & feasible
        if better.any():
            best_any = int(np.argmax(np.where(better, g_m, -np.inf)))
            best_ok = int(np.argmax(np.where(ok, g_m, -np.inf))) if ok.any() else -1
            if best_ok < best_any:
                self._refusals += best_any - best_ok
        if not ok.any():
            return out
        best = int(np.argmax(np.where(ok, g_m, -np.inf)))
        out[idx[: best + 1]] = True
        return out

    @staticmethod
    def _guard_prefix(
        ctx: StepContext,
        E: FloatArray,
        cand: BoolArray,
        idx: IntArray,
        gain: FloatArray,
        t_m: FloatArray,
    ) -> BoolArray:
        """For each prefix size m: is T_m / E_i ≤ budget for every request?"""
        if ctx.budget_s is None:
            return np.ones(t_m.shape[0], dtype=np.bool_)
        fixed_min = float(E[~cand].min()) if (~cand).any() else np.inf
        chosen_min = np.minimum.accumulate(E[idx] + gain)
        e_rest = E[idx]
        # min over not-chosen candidates after the prefix: suffix minimum shifted by one
        suffix = np.minimum.accumulate(e_rest[::-1])[::-1]
        rest_min = np.append(suffix[1:], np.inf)
        min_e = np.minimum(np.minimum(chosen_min, rest_min), fixed_min)
        feasible: BoolArray = t_m <= ctx.budget_s * min_e
        return feasible

    # -- verifier + guard ---------------------------------------------------------------

    def verify_lengths(self, ctx: StepContext, conf: FloatArray, lens: IntArray) -> VerifyDecision:
        b = ctx.batch
        lens = lens.astype(np.int64)
        L = ctx.context_lens.astype(np.float64)
        t_plain = self.times.verify(b, float(b), float(L.sum())) if b else 0.0
        infeasible = ctx.budget_s is not None and t_plain > ctx.budget_s
        if b == 0 or int(lens.sum()) == 0:
            d = VerifyDecision(
                lens=np.zeros(b, dtype=np.int64),
                predicted_step_s=t_plain,
                expected_tokens=np.ones(b, dtype=np.float64),
                guard_refusals=self._refusals,
                infeasible=infeasible,
            )
            self._last_decision = d
            return d
        c = StepCosts(ctx, conf, lens, self.cal, self.times)
        ii, jj = np.nonzero(c.mask)
        surv = c.P[ii, jj]
        order = np.lexsort((-jj, surv))  # lowest survival first; a request's tail first
        ii, jj, surv = ii[order], jj[order], surv[order]
        n = ii.shape[0]

        s0 = lens.astype(np.float64)
        tokens0 = float(s0.sum()) + b
        work0 = _verify_ctx_work(L, s0)
        removed_work = np.concatenate(([0.0], np.cumsum(L[ii] + jj + 1.0)))
        removed_tok = np.arange(n + 1, dtype=np.float64)
        a_r = float(c.E.sum()) - np.concatenate(([0.0], np.cumsum(surv)))
        t_r = c.draft_s + self.times.verify_vec(b, tokens0 - removed_tok, work0 - removed_work)
        g_r = a_r / t_r

        if ctx.budget_s is not None:
            # E of the request just cut back to length j is 1 + Σ_{j'<j} P; E only falls
            prefix_e = 1.0 + np.cumsum(c.P, axis=1) - c.P
            e_touched = prefix_e[ii, jj]
            min_e = np.minimum(float(c.E.min()), np.minimum.accumulate(e_touched))
            min_e = np.concatenate(([float(c.E.min())], min_e))
            per_token = t_r / min_e
            feasible = per_token <= ctx.budget_s
        else:
            per_token = t_r
            feasible = np.ones(n + 1, dtype=np.bool_)

        best_any = int(np.argmax(g_r))
        if feasible.any():
            r = int(np.argmax(np.where(feasible, g_r, -np.inf)))
            refused = max(0, r - best_any)
        else:
            r = int(np.argmin(per_token))
            refused = max(0, r - best_any)
        cut = np.bincount(ii[:r], minlength=b).astype(np.int64)
        new_lens = lens - cut
        keep = np.arange(c.P.shape[1])[None, :] < new_lens[:, None]
        expected = 1.0 + (c.P * keep).sum(axis=1)
        d = VerifyDecision(
            lens=new_lens,
            predicted_step_s=float(t_r[r]),
            expected_tokens=expected,
            pruned=min(r, best_any),
            guard_refusals=self._refusals + refused,
            infeasible=bool(infeasible),
        )
        self._last_decision = d
        return d

    # -- online correction --------------------------------------------------------------

    def observe(self, outcome: StepOutcome) -> None:
        conf = outcome.conf
        if conf.ndim == 2 and conf.shape[1] > 0:
            self.cal.update(conf, outcome.verified_lens, outcome.accepted)
        b = outcome.context_lens.shape[0]
        if b == 0:
            return
        drafted = outcome.drafted_lens if outcome.drafted_lens.size else outcome.verified_lens
        L = outcome.context_lens.astype(np.float64)
        k = int(drafted.max()) if drafted.size else 0
        if k > 0:
            j = np.arange(k)
            mask = j[None, :] < drafted[:, None]
            rows = mask.sum(axis=0).astype(np.float64)
            ctx_work = (mask * (L[:, None] + j[None, :])).sum(axis=0)
            pred_draft = float(self.times.draft_passes(rows, ctx_work).sum())
        else:
            pred_draft = 0.0
        s = outcome.verified_lens.astype(np.float64)
        pred_verify = self.times.verify(b, float(s.sum()) + b, _verify_ctx_work(L, s))
        self.times.observe(pred_draft, outcome.draft_time_s, pred_verify, outcome.verify_time_s)

    def predicted_plain_step_s(self, context_lens: IntArray) -> float:
        b = context_lens.shape[0]
        return self.times.verify(b, float(b), float(context_lens.sum()))
