"""How many drafts to verify this step, and whose: AdaSpec's confidence-prior verifier with the
SLO guard, in the shape vLLM's adaptive verification (Model Runner V2) decides it. Pure numpy.

vLLM 0.32's `AdaptiveVerificationManager` (GPU only) picks one number per step, the batch's draft
budget n, and then admits the n draft slots with the highest survival probability (running
product of per-position acceptance estimates) across all requests on the GPU; requests end up
with different verified lengths. Its budget maximises expected emitted tokens / step cost
(its start-up cost tables). `plan_verification` makes the same kind of decision with AdaSpec's
pieces:

  ranking       every scheduled draft slot (request i, position j) by survival
                S_ij = Π_{m≤j} p_im, best first (vLLM's order: a global top-n is always a
                prefix of each request's drafts, because survival falls along a request)
  expected      tokens emitted with budget n: Σ_i emits_i + Σ_{top n} S (emits_i: the request
                samples a token this step, i.e. is not mid-prefill)
  step time     T(n): from the Profile's time model (`profile_step_times`: verified tokens and
                their attention context, prompt chunks in the same forward priced by the
                Profile's prefill model) or vLLM's cost tables (`table_step_times`)
  goodput       G(n) = expected(n) / T(n); unconstrained choice argmax G (= vLLM's rule)
  SLO guard     request i's time per token T(n) / E_i(n), E_i(n) = 1 + Σ of its admitted S;
                admit n only if every emitting request stays within the budget. The binding
                request is often one with no drafts (E = 1): verifying others' drafts makes
                its step longer for nothing. If no n meets the budget (not even n = 0: the
                drafts are already paid for), take the n with the lowest worst time per
                token and report the step infeasible.

Modes: off → n = 0; fixed → every scheduled draft (K was fixed by the scheduler; no pruning);
adaptive → the above with the Policy's tpotBudgetMs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from adaspec.contract import AcceptanceCalibration, Policy, SpecMode
from adaspec.policy.time_model import StepTimePredictor

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]


class VerifierUnsupportedError(RuntimeError):
    """AdaSpec's adaptive verification was requested where vLLM cannot run it."""


@dataclass(frozen=True)
class RankedSlots:
    """Scheduled draft slots, best (highest survival) first."""

    req: IntArray
    pos: IntArray
    survival: FloatArray


@dataclass(frozen=True)
class VerifyPlan:
    draft_budget: int
    """Draft slots to verify across the batch (vLLM's `draft_budget`)."""
    per_request: IntArray
    """Predicted verified drafts per request (the top-`draft_budget` slots of our ranking)."""
    step_s: float
    goodput: float
    """Expected emitted tokens per second."""
    worst_tpot_s: float
    """Predicted time per token of the worst emitting request (inf when none emits)."""
    free_budget: int
    """The goodput-optimal budget without the guard."""
    infeasible: bool = False


def rank_slots(accept: FloatArray, drafts: IntArray) -> RankedSlots:
    """Every scheduled slot (position j < drafts_i of request i) by survival, best first; ties
    go to the earlier position, then the earlier request."""
    p = np.clip(np.asarray(accept, dtype=np.float64), 0.0, 1.0)
    if p.ndim != 2 or p.shape[0] != drafts.shape[0]:
        raise ValueError("accept must be [requests, positions] with one row per request")
    surv = np.cumprod(p, axis=1)
    req, pos = np.nonzero(np.arange(p.shape[1])[None, :] < np.asarray(drafts)[:, None])
    s: FloatArray = surv[req, pos].astype(np.float64)
    order = np.lexsort((req, pos, -s))
    return RankedSlots(req[order].astype(np.int64), pos[order].astype(np.int64), s[order])


def calibrate(top1: FloatArray, cal: AcceptanceCalibration) -> FloatArray:
    """The Profile's calibration (draft top-1 probability → P(accept)) for any array shape;
    torch.bucketize(x, inner_edges, right=True) gives the same bins on the GPU."""
    inner = np.asarray(cal.bin_edges[1:-1], dtype=np.float64)
    prob = np.asarray(cal.accept_prob, dtype=np.float64)
    out: FloatArray = prob[np.searchsorted(inner, top1, side="right")]
    return out


def table_step_times(
    draft_ms: FloatArray, verify_ms: FloatArray, rows: int, base_tokens: int, n_max: int
) -> FloatArray:
    """T(n), n = 0..n_max, in seconds from vLLM's cost tables (ms): the draft pass for `rows`
    requests plus the target forward over base_tokens + n tokens."""
    if base_tokens + n_max >= verify_ms.shape[0] or rows >= draft_ms.shape[0]:
        raise ValueError("the cost tables do not cover this batch")
    out: FloatArray = (draft_ms[rows] + verify_ms[base_tokens : base_tokens + n_max + 1]) / 1e3
    return out


def profile_draft_s(times: StepTimePredictor, context: FloatArray, k: int) -> float:
    """The k draft passes that follow the verification (MRV2 drafts the next step's tokens in
    the same step): pass j attends to L_i + j tokens for every request."""
    rows = float(context.shape[0])
    base = float(np.sum(context))
    return float(sum(times.draft_pass(rows, base + rows * j) for j in range(max(k, 0))))


def profile_step_times(
    times: StepTimePredictor,
    ranked: RankedSlots,
    context: FloatArray,
    base_tokens: IntArray,
    draft_s: float,
    n_max: int,
) -> FloatArray:
    """T(n), n = 0..n_max, in seconds from the Profile's time model: the target forward over
    each decoding request's token (token t of request i attends to L_i + t) plus the first n
    ranked draft slots (slot j of request i attends to L_i + u_i + j), prompt chunks riding
    along (u_i > 1 tokens: the prefill model without its intercept, `prefill_extra`), and the
    draft passes."""
    L = np.asarray(context, dtype=np.float64)
    u = np.asarray(base_tokens, dtype=np.float64)
    chunk = u > 1.0
    work = u * L + u * (u - 1.0) / 2.0
    prefill_s = times.prefill_extra(
        float(np.count_nonzero(chunk)), float(u[chunk].sum()), float(work[chunk].sum())
    )
    slot_work = L[ranked.req] + u[ranked.req] + ranked.pos
    n = np.arange(n_max + 1, dtype=np.float64)
    verify_work = float(work[~chunk].sum()) + np.concatenate(([0.0], np.cumsum(slot_work[:n_max])))
    rows = float(np.count_nonzero(~chunk))
    out: FloatArray = (
        draft_s + prefill_s + times.verify_vec(rows, float(u[~chunk].sum()) + n, verify_work)
    )
    return out


@dataclass(frozen=True)
class _Curves:
    """Step time, goodput and worst time per token for every budget n = 0..n_max."""

    step_s: FloatArray
    goodput: FloatArray
    tpot: FloatArray

    @property
    def n_max(self) -> int:
        return int(self.step_s.shape[0]) - 1


def _curves(ranked: RankedSlots, emits: BoolArray, step_s: FloatArray) -> _Curves:
    n_reqs = int(emits.shape[0])
    n_max = min(int(step_s.shape[0]) - 1, int(ranked.survival.shape[0]))
    if n_max < 0:
        raise ValueError("step_s must hold T(0)")
    t = np.asarray(step_s[: n_max + 1], dtype=np.float64)
    surv = ranked.survival[:n_max]
    expected = float(np.count_nonzero(emits)) + np.concatenate(([0.0], np.cumsum(surv)))
    # E_i(n) for every n: each admitted slot adds its survival to its request's row.
    gains = np.zeros((n_max + 1, n_reqs))
    gains[np.arange(1, n_max + 1), ranked.req[:n_max]] = surv
    e_req = 1.0 + np.cumsum(gains, axis=0)
    # Worst time per token over the emitting requests (none emits: no one to protect).
    tpot = t / e_req[:, emits].min(axis=1) if np.any(emits) else np.full(n_max + 1, np.inf)
    return _Curves(t, expected / t, tpot)


def _plan_at(
    n: int, c: _Curves, ranked: RankedSlots, n_reqs: int, infeasible: bool = False
) -> VerifyPlan:
    return VerifyPlan(
        draft_budget=n,
        per_request=np.bincount(ranked.req[:n], minlength=n_reqs).astype(np.int64),
        step_s=float(c.step_s[n]),
        goodput=float(c.goodput[n]),
        worst_tpot_s=float(c.tpot[n]),
        free_budget=int(np.argmax(c.goodput)),
        infeasible=infeasible,
    )


def plan_verification(
    ranked: RankedSlots,
    emits: BoolArray,
    step_s: FloatArray,
    budget_s: float | None,
) -> VerifyPlan:
    """The draft budget n in [0, min(len(step_s) - 1, slots)] (see the module docstring)."""
    c = _curves(ranked, emits, step_s)
    n_reqs = int(emits.shape[0])
    if budget_s is None or not np.any(emits):
        return _plan_at(int(np.argmax(c.goodput)), c, ranked, n_reqs)
    feasible = c.tpot <= budget_s
    if feasible.any():
        return _plan_at(int(np.argmax(np.where(feasible, c.goodput, -np.inf))), c, ranked, n_reqs)
    return _plan_at(int(np.argmin(c.tpot)), c, ranked, n_reqs, infeasible=True)


def plan_for_policy(
    policy: Policy | None,
    ranked: RankedSlots,
    emits: BoolArray,
    step_s: FloatArray,
) -> VerifyPlan:
    """`plan_verification` under the live Policy: off verifies nothing, fixed verifies every
    scheduled draft (up to len(step_s) - 1), adaptive decides with the guard (no policy: no
    budget)."""
    if policy is not None and policy.mode is not SpecMode.adaptive:
        c = _curves(ranked, emits, step_s)
        n = 0 if policy.mode is SpecMode.off else c.n_max
        return _plan_at(n, c, ranked, int(emits.shape[0]))
    budget = None if policy is None else policy.tpot_budget_ms / 1000.0
    return plan_verification(ranked, emits, step_s, budget)


def check_verifier_platform(device_type: str, use_v2_env: str | None) -> None:
    """Refuse, before any model loads, a platform where vLLM 0.32 has no adaptive verification:
    it exists only in Model Runner V2 on CUDA GPUs (full CUDA graphs)."""
    if device_type != "cuda":
        raise VerifierUnsupportedError(
            "adaptive_verification: vLLM's adaptive verification runs only in Model Runner V2 "
            f"on CUDA GPUs; this vLLM platform is {device_type!r}. Turn adaptive_verification "
            "off (the scheduler plugin still chooses K per step and applies per-request caps)"
        )
    if use_v2_env is not None and use_v2_env.strip().lower() in ("0", "false", "no", "off"):
        raise VerifierUnsupportedError(
            f"adaptive_verification needs Model Runner V2, but VLLM_USE_V2_MODEL_RUNNER="
            f"{use_v2_env!r} forces the V1 runner; unset it"
        )
