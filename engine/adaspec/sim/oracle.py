"""A clairvoyant drafter: an upper reference for what drafting could reach on a trace (sim only).

Before each step the simulator tells it (adaspec.sim.simulator.ClairvoyantPolicy) how many of
each running request's next draft tokens the target would accept in a row, n_i (capped at
max_draft). It then plans the step exactly, with the time model the policy believes:

- It never drafts or verifies a token the target rejects: request i drafts and verifies
  s_i ≤ n_i tokens, all accepted, so it emits s_i + 1 (a request with n_i = 0 does not draft:
  drafting it would only cost). Its acceptance rate is 1.
- Among those plans it maximises the step's goodput, (B + Σ s_i) ÷ T, exactly: T is a fixed
  part per number of draft passes D (their intercepts, a plain verification) plus one cost per
  drafted token (its draft-pass row, its verification token, both growing with its context).
  For each D = 0 … max_draft the best set of tokens of a given size is the cheapest one, so it
  scans the cheapest-first prefixes of the tokens usable with D passes (j < min(n_i, D)) and
  keeps the best; the best D wins (a plan that leaves pass D empty is counted with too many
  intercepts at D but exactly at its own, smaller D, so the maximum is exact).
- Goodput and the guard treat prompt chunks as AdaSpec does (adaspec.policy.adaptive): their
  predicted cost `ctx.prefill_extra_s` counts in every time held against the budget but not in
  the goodput maximised (the prompt costs the same however much is drafted), except for the
  draft forward of their own that a step which drafts nothing needs. Like AdaSpec it credits
  the chunks with `prefill_credit` × what plain decoding would emit in their time while a
  prompt backlog remains (the goodput becomes (B + credit + Σ s_i) ÷ T), and it does not
  draft while the engine is saturated (prompt backlog *and* requests waiting for admission;
  `yield_to_admission`), and it applies the same online bias correction to its time model, so
  AdaSpec ÷ clairvoyant measures what knowing the acceptances is worth, objective held equal.
- SLO guard, as AdaSpec's: a plan is admitted only if every request's predicted time per
  emitted token, (T + chunks) ÷ (s_i + 1), is within `ctx.budget_s`; plain decoding is never
  refused, and when even plain decoding breaks the budget a plan is admitted only if its worst
  time per token is no worse than plain decoding's. Put together: worst ≤ max(budget, plain).

Why it is only a *reference*, not a strict bound on every metric:
- It is greedy per step: it maximises each step's goodput, not the trace's. Finishing a request
  earlier or later changes the next steps' batches and admissions, and a step-optimal plan is
  not always trace-optimal (e.g. at high load a shorter step admits queued requests sooner).
- Under the guard it is exact when some request has n_i = 0 (its time per token is the step
  time, so the budget caps T and the cheapest sets are the best candidates), which is nearly
  always so in a large batch. When every request has n_i ≥ 1, a dearer set that raises the
  smallest s_i (and so the budget's room) is not searched. With a time model whose cost falls
  with context (a negative fitted slope) the cheapest-first order is only approximate.
- It knows acceptance and, through the simulator, output lengths: the revealed runs are capped
  at what each request has left, so it never drafts a token that would not be emitted.
- Its time model is the policy's (bias-corrected online), not the simulator's truth with noise.
"""

from __future__ import annotations

import numpy as np

from adaspec.contract import Policy, Profile
from adaspec.policy.adaptive import DEFAULT_PREFILL_CREDIT, prefill_credit_tokens
from adaspec.policy.base import (
    BoolArray,
    FloatArray,
    IntArray,
    StepContext,
    StepOutcome,
    VerifyDecision,
)
from adaspec.policy.factory import limits_for
from adaspec.policy.time_model import StepTimePredictor
from adaspec.sim.acceptance import AcceptanceSource
from adaspec.sim.simulator import SimConfig, SimResult, run_with_policy
from adaspec.sim.traces import Trace


class ClairvoyantDrafter:
    """SpecPolicy that is told each request's accepted run before the step (see module doc)."""

    name = "clairvoyant"

    def __init__(
        self,
        times: StepTimePredictor,
        yield_to_admission: bool = True,
        prefill_credit: float = DEFAULT_PREFILL_CREDIT,
    ) -> None:
        self.times = times
        self.yield_to_admission = yield_to_admission
        self.prefill_credit = prefill_credit
        self._revealed: IntArray | None = None
        self._plan: IntArray | None = None
        self._predicted: tuple[IntArray, float, float] | None = None

    # -- clairvoyance ---------------------------------------------------------------------

    def reveal(self, accept_run_lens: IntArray) -> None:
        """Per running request, how many of its next draft tokens the target would accept in a
        row; consumed by the next start()."""
        run = np.asarray(accept_run_lens)
        if run.ndim != 1 or (run.size and int(run.min()) < 0):
            raise ValueError("accept_run_lens must be a 1-D array of non-negative run lengths")
        self._revealed = run.astype(np.int64)

    # -- SpecPolicy -----------------------------------------------------------------------

    def start(self, ctx: StepContext) -> BoolArray:
        b = ctx.batch
        run, self._revealed = self._revealed, None
        self._predicted = None
        saturated = ctx.prefill_backlog_tokens > 0 and ctx.requests_waiting > 0
        if ctx.max_draft <= 0 or b == 0 or (saturated and self.yield_to_admission):
            self._plan = np.zeros(b, dtype=np.int64)
            return np.zeros(b, dtype=np.bool_)
        if run is None or run.shape != (b,):
            raise RuntimeError(
                "ClairvoyantDrafter.start: no accepted-run lengths revealed for this batch "
                f"(got {None if run is None else run.shape}, batch {b}); it runs only inside "
                "adaspec.sim.simulate, which calls reveal() before every start()"
            )
        self._plan = self.plan(ctx, np.minimum(run, ctx.max_draft))
        return self._plan > 0

    def keep_drafting(
        self, ctx: StepContext, conf: FloatArray, lens: IntArray, drafting: BoolArray
    ) -> BoolArray:
        plan = self._plan_for(ctx)
        out: BoolArray = drafting & (lens < plan)
        return out

    def verify_lengths(self, ctx: StepContext, conf: FloatArray, lens: IntArray) -> VerifyDecision:
        s = np.minimum(self._plan_for(ctx), lens.astype(np.int64))
        draft_s, verify_s = self.predict(ctx, s)
        self._predicted = (s, draft_s, verify_s)
        return VerifyDecision(
            lens=s,
            predicted_step_s=draft_s + verify_s,
            expected_tokens=(s + 1).astype(np.float64),
            infeasible=ctx.budget_s is not None and self.plain_step_s(ctx) > ctx.budget_s,
        )

    def observe(self, outcome: StepOutcome) -> None:
        """Online bias correction of the time model, split as AdaSpec splits it."""
        pred = self._predicted
        self._predicted = None
        if pred is None or outcome.context_lens.shape[0] == 0:
            return
        _, pred_draft, pred_verify = pred
        self.times.observe_step(
            pred_draft, pred_verify, outcome.draft_time_s, outcome.verify_time_s,
            outcome.prefill_extra_s,
        )  # fmt: skip

    # -- planning -------------------------------------------------------------------------

    def plain_step_s(self, ctx: StepContext) -> float:
        """Predicted time of the step if nobody drafts, prompt chunks included."""
        return sum(self.predict(ctx, np.zeros(ctx.batch, dtype=np.int64)))

    def predict(self, ctx: StepContext, s: IntArray) -> tuple[float, float]:
        """Predicted (draft passes, verification + prompt chunks) seconds when request i drafts
        and verifies s_i tokens: the simulator's forwards, term by term."""
        t = self.times
        L = ctx.context_lens.astype(np.float64)
        b = ctx.batch
        d = int(s.max()) if b else 0
        draft_s = 0.0
        if d:
            j = np.arange(d)
            m = j[None, :] < s[:, None]
            rows = m.sum(axis=0).astype(np.float64)
            work = (m * (L[:, None] + j[None, :])).sum(axis=0)
            draft_s = float(t.draft_passes(rows, work).sum())
        sf = s.astype(np.float64)
        verify_s = t.verify(
            b, float(sf.sum() + b), float(((sf + 1.0) * L + sf * (sf + 1.0) / 2.0).sum())
        )
        extra = ctx.prefill_extra_s * t.verify_scale
        if extra > 0.0:
            verify_s += extra + (t.draft_forward_fixed_s if d == 0 and ctx.max_draft > 0 else 0.0)
        return draft_s, verify_s

    def plan(self, ctx: StepContext, run: IntArray) -> IntArray:
        """Draft lengths s (s_i ≤ run_i) maximising the step's goodput under the guard.

        For D draft passes the plans worth a look are the cheapest-first prefixes of the tokens
        drafts could verify (j < min(run_i, D)): for a given number of tokens the cheapest set
        has the shortest step, so the best goodput, and the best chance to fit the budget when
        some request has run 0 (its time per token is the step time). Along a request a draft's
        cost grows with its context, so a prefix of the order is a prefix of every request."""
        b, k = ctx.batch, int(run.max()) if run.size else 0
        if k == 0:
            return np.zeros(b, dtype=np.int64)
        plain = self.times.verify(b, float(b), float(ctx.context_lens.sum()))
        tok, fixed = self._costs(ctx, k, plain)
        rows, cols = np.nonzero(np.arange(k)[None, :] < run[:, None])
        # order by cost (made non-decreasing along each request, ties by position) so that
        # every prefix of the order takes a prefix of each request's drafts
        key = np.maximum.accumulate(tok, axis=1)[rows, cols]
        order = np.lexsort((cols, key))
        rows, cols, cost = rows[order], cols[order], tok[rows[order], cols[order]]
        m = rows.shape[0]
        in_d = cols[None, :] < np.arange(1, k + 1)[:, None]  # (D-1, m): token usable with D
        n_tok = np.cumsum(in_d, axis=1)
        t_dec = fixed[1:, None] + np.cumsum(np.where(in_d, cost[None, :], 0.0), axis=1)
        extra = ctx.prefill_extra_s * self.times.verify_scale
        credit = prefill_credit_tokens(self.prefill_credit, ctx, extra, plain)
        good = (b + credit + n_tok) / t_dec
        if ctx.budget_s is not None:
            # the guard: worst (T + chunks) / (s_i + 1) within max(budget, plain). min_i s_i
            # reaches c once every request's c-th draft is in (never if some run_i < c)
            pos = np.full((b, k), m)
            pos[rows, cols] = np.arange(m)
            reach = pos.max(axis=0)  # (k,)
            got = reach[None, :] <= np.arange(m)[:, None]  # (m, c): min s ≥ c+1 at prefix q
            min_s = np.cumsum(got, axis=1).T  # (c, m): Σ_{c' ≤ c}: min s at prefix q, D = c+1
            bound = max(ctx.budget_s, float(fixed[0]) + extra)
            good = np.where((t_dec + extra) <= bound * (1.0 + min_s), good, -np.inf)
        best = int(np.argmax(good))  # ties: the fewest passes, then the fewest drafts
        d, q = divmod(best, m)
        if not good.flat[best] > (b + credit) / float(fixed[0]):  # plain: always admitted
            return np.zeros(b, dtype=np.int64)
        take = np.zeros(b, dtype=np.int64)
        sel = cols[: q + 1] <= d  # tokens usable with d + 1 passes
        np.add.at(take, rows[: q + 1][sel], 1)
        return take

    def _costs(self, ctx: StepContext, k: int, plain: float) -> tuple[FloatArray, FloatArray]:
        """`tok[i, j]` (seconds): what request i's draft j adds to the step (its row in draft
        pass j and its verification token); `fixed[D]`: the rest of a step with D draft passes
        (their intercepts and a plain verification; with prompt chunks and D = 0, the chunks'
        own draft forward; `plain`: the predicted plain verification). Goodput time, so without
        the chunks' share of the forwards."""
        t = self.times
        tm = t.model
        L = ctx.context_lens.astype(np.float64)
        j = np.arange(k, dtype=np.float64)
        pos = L[:, None] + j[None, :]  # context of draft j
        ds, vs = t.draft_scale, t.verify_scale
        dm, vm = tm.draft, tm.verify
        tok = ds * ((dm.per_row_ms + dm.per_token_ms) + dm.per_ctx_ktoken_ms * pos / 1000.0)
        tok += vs * (vm.per_token_ms + vm.per_ctx_ktoken_ms * (pos + 1.0) / 1000.0)
        tok /= 1000.0
        fixed: FloatArray = plain + np.arange(k + 1, dtype=np.float64) * t.draft_forward_fixed_s
        if ctx.prefill_extra_s > 0.0:
            fixed[0] += t.draft_forward_fixed_s
        return tok, fixed

    def _plan_for(self, ctx: StepContext) -> IntArray:
        plan = self._plan
        if plan is None or plan.shape != (ctx.batch,):
            raise RuntimeError("ClairvoyantDrafter: keep_drafting/verify_lengths without start()")
        return plan


def run_clairvoyant(
    trace: Trace,
    profile: Profile,
    doc: Policy,
    acceptance: AcceptanceSource | None = None,
    config: SimConfig | None = None,
    policy_profile: Profile | None = None,
    yield_to_admission: bool = True,
) -> SimResult:
    """Simulate `trace` under the clairvoyant drafter as adaspec.sim.run_policy runs "adaptive":
    the same limits (maxDraftTokens, the TPOT budget), chunk planner and acceptance draws;
    `profile` is the truth, `policy_profile` (default: the same) what the drafter and the
    planner believe."""
    believed = policy_profile or profile
    drafter = ClairvoyantDrafter(StepTimePredictor(believed.time_model), yield_to_admission)
    limits = limits_for(doc, "adaptive")
    return run_with_policy(drafter, limits, trace, profile, doc, acceptance, config, believed)
