"""Step-level K for vLLM: AdaSpec's goodput model and SLO guard, before drafting. Pure numpy.

vLLM's scheduler decides the step's draft length *before* the drafter runs and never sees draft
confidences (V1 runner, greedy drafting), so the per-token confidence prior of AdaSpec is
replaced by a per-position acceptance estimate a_j = P(draft j accepted | drafts < j accepted):
the Profile's calibrated mean rate as a prior, corrected online from verification outcomes
(`PositionAcceptance`). For a batch of B requests with mean context L:

  expected tokens per request  E(K) = 1 + Σ_{j≤K} Π_{m≤j} a_m
  step time                    T(K) = Σ_{j<K} draft_pass(B rows, ctx B·(L+j))
                                      + verify(B rows, B·(K+1) tokens, ctx B·((K+1)L + K(K+1)/2))
  goodput                      G(K) = B·E(K) / T(K)
  SLO guard                    admit K only if T(K)/E_i(K) ≤ budget for every request i, with
                               E_i(K) = 1 + Σ_{j≤min(K,cap_i)} min(Π a, r_i^j): each request's
                               own acceptance r_i (tracked by the scheduler) and its own draft
                               cap (`adaspec_max_draft`). With uniform, uncapped requests the
                               goodput-optimal K also minimises T/E, so the guard bites through
                               the spread: a long draft that pays for the batch can still break
                               the budget of the request with the lowest acceptance, or of a
                               capped request (capped at 0: its time per token is T(K) itself).
                               If even K = 0 breaks it the guard steps aside (infeasible step:
                               refusing speculation would only make every request slower).
  caps                         a capped request verifies min(K, cap_i) drafts: the verified
                               tokens and the batch goodput count that, not K.

The same math (same time model class, same guard semantics) as adaspec.policy.adaptive, at the
granularity vLLM exposes. `k_table` folds it into vLLM's static `num_speculative_tokens_per_
batch_size` table for the config-only mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from adaspec.contract import Policy, Profile, SpecMode
from adaspec.policy.time_model import StepTimePredictor

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class KPlan:
    k: int
    goodput: float
    """Predicted tokens per second for the whole batch."""
    tpot_s: float
    """Predicted time per output token of the worst request in this step."""
    infeasible: bool = False
    """Even plain decoding is predicted to break the budget (the guard stepped aside)."""
    free_k: int = 0
    """The goodput-optimal K without the budget (what the guard lowered, if k < free_k)."""
    plain_s: float = 0.0
    """Predicted time of a plain step (K = 0): every request's time per token at K = 0."""


@dataclass(frozen=True)
class BatchRequests:
    """The running requests a K is planned for, as the guard sees them.

    `rates`: each request's own acceptance per draft token so far; `caps`: its own draft cap
    (`adaspec_max_draft`; k_max or more = uncapped). A capped request verifies min(K, cap)
    drafts and gains nothing from a longer K but still waits for the longer step; a request
    capped at 0 gets time per token = step time, so its budget bounds the step time itself.
    """

    rates: FloatArray
    caps: NDArray[np.int64]

    def __post_init__(self) -> None:
        if self.rates.shape != self.caps.shape or self.rates.ndim != 1:
            raise ValueError("rates and caps must be 1-D arrays of the same length")


def plan_k(
    batch: int,
    ctx_mean: float,
    accept_pos: FloatArray,
    times: StepTimePredictor,
    budget_s: float | None,
    k_max: int,
    worst_rate: float | None = None,
    requests: BatchRequests | None = None,
) -> KPlan:
    """The goodput-maximising K in [0, k_max] whose predicted TPOT stays within the budget
    for every request.

    `worst_rate`: the lowest per-request acceptance (one uncapped request the guard protects);
    `requests`: per-request rates and caps (goodput and verified tokens then count each
    request's min(K, cap) drafts). Neither: a uniform batch."""
    if batch < 1:
        return KPlan(0, 0.0, 0.0)
    k_max = max(0, min(int(k_max), int(accept_pos.shape[0])))
    b = float(batch)
    L = max(float(ctx_mean), 0.0)
    a = np.clip(np.asarray(accept_pos[:k_max], dtype=np.float64), 0.0, 1.0)
    surv_cum = np.concatenate(([0.0], np.cumsum(np.cumprod(a))))  # Σ_{j<=n} Π a, n = 0..k_max
    guard_rates, guard_caps = _guard_rows(requests, worst_rate, k_max)
    # Each guarded request's own expected tokens at n drafts: 1 + Σ_{j<=n} r^j.
    powers = guard_rates[:, None] ** np.arange(1, k_max + 1)[None, :]
    own_cum = 1.0 + np.concatenate((np.zeros((guard_rates.size, 1)), powers.cumsum(axis=1)), 1)
    rows = np.arange(guard_rates.size)
    best: KPlan | None = None
    plain: KPlan | None = None
    fallback: KPlan | None = None
    draft_s = 0.0
    for k in range(k_max + 1):
        if k > 0:
            draft_s += times.draft_pass(b, b * (L + k - 1))
        if requests is None or requests.caps.size == 0:
            n_req = np.array([k])
        else:
            n_req = np.minimum(requests.caps, k)
        m = float(n_req.mean())  # drafts verified per request
        e_req = 1.0 + surv_cum[n_req]
        verify_s = times.verify(b, b * (m + 1), b * ((m + 1) * L + m * (m + 1) / 2.0))
        t = draft_s + verify_s
        e_worst = float(e_req.min())
        if guard_rates.size:
            n_g = np.minimum(guard_caps, k)
            own = own_cum[rows, n_g]
            e_worst = min(e_worst, float(np.minimum(1.0 + surv_cum[n_g], own).min()))
        plan = KPlan(k, b * float(e_req.mean()) / t if t > 0 else float("inf"), t / e_worst)
        if k == 0:
            plain = plan
        if fallback is None or plan.goodput > fallback.goodput:
            fallback = plan
        if budget_s is not None and plan.tpot_s > budget_s:
            continue
        if best is None or plan.goodput > best.goodput:
            best = plan
    assert plain is not None and fallback is not None
    if best is not None:
        return KPlan(best.k, best.goodput, best.tpot_s, False, fallback.k, plain.tpot_s)
    # Nothing meets the budget, plain decoding included: refusing speculation would only make
    # every request slower, so step aside with the goodput-optimal K (reported infeasible).
    return KPlan(fallback.k, fallback.goodput, fallback.tpot_s, True, fallback.k, plain.tpot_s)


def _guard_rows(
    requests: BatchRequests | None, worst_rate: float | None, k_max: int
) -> tuple[FloatArray, NDArray[np.int64]]:
    """(rate, cap) of every request whose own acceptance the guard protects."""
    rates: list[float] = []
    caps: list[int] = []
    if requests is not None:
        rates += [float(r) for r in requests.rates]
        caps += [int(c) for c in requests.caps]
    if worst_rate is not None:
        rates.append(float(worst_rate))
        caps.append(k_max)
    return (
        np.clip(np.asarray(rates, dtype=np.float64), 0.0, 1.0),
        np.asarray(caps, dtype=np.int64),
    )


class RequestRates:
    """Per-request acceptance rate per draft token (Beta-smoothed towards a prior), for the
    guard's worst request. Finished requests are dropped by `keep`."""

    def __init__(self, prior_weight: float = 4.0) -> None:
        self.prior_weight = prior_weight
        self._hits: dict[str, float] = {}
        self._trials: dict[str, float] = {}

    def observe(self, req_id: str, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        a = min(max(int(accepted), 0), int(drafted))
        self._trials[req_id] = self._trials.get(req_id, 0.0) + min(a + 1, int(drafted))
        self._hits[req_id] = self._hits.get(req_id, 0.0) + a

    def rate(self, req_id: str, prior: float) -> float:
        w = self.prior_weight
        return (self._hits.get(req_id, 0.0) + prior * w) / (self._trials.get(req_id, 0.0) + w)

    def worst(self, req_ids: list[str], prior: float) -> float | None:
        if not req_ids:
            return None
        return min(self.rate(r, prior) for r in req_ids)

    def keep(self, live: set[str]) -> None:
        for r in [r for r in self._trials if r not in live]:
            self._trials.pop(r, None)
            self._hits.pop(r, None)


class PositionAcceptance:
    """Per-position conditional acceptance, EWMA-corrected from verification outcomes.

    A request that verified d drafts and had a accepted reached positions 0..min(a, d−1):
    positions < a were accepted, position a (if a < d) was rejected.
    """

    def __init__(self, k_max: int, prior_rate: float, prior_weight: float = 20.0) -> None:
        if not 0.0 <= prior_rate <= 1.0:
            raise ValueError(f"prior_rate must be in [0, 1], got {prior_rate}")
        self.k_max = max(1, int(k_max))
        self._hits = np.full(self.k_max, prior_rate * prior_weight)
        self._trials = np.full(self.k_max, prior_weight)
        self.forget = 0.995

    @property
    def rates(self) -> FloatArray:
        out: FloatArray = self._hits / np.maximum(self._trials, 1e-9)
        return out

    def observe(self, drafted: int, accepted: int) -> None:
        d = min(int(drafted), self.k_max)
        if d <= 0:
            return
        a = min(max(int(accepted), 0), d)
        reached = min(a + 1, d)
        self._hits *= self.forget
        self._trials *= self.forget
        self._trials[:reached] += 1.0
        self._hits[:a] += 1.0


def profile_rate(profile: Profile | None, default: float = 0.7) -> float:
    """Mean acceptance per draft token implied by the Profile's calibration."""
    if profile is None:
        return default
    cal = profile.calibration
    p = np.asarray(cal.accept_prob, dtype=np.float64)
    if cal.counts and sum(cal.counts) > 0:
        return float(np.average(p, weights=np.asarray(cal.counts, dtype=np.float64)))
    return float(p.mean())


def static_k(policy: Policy) -> int | None:
    """K for the non-adaptive modes (None for adaptive)."""
    if policy.mode is SpecMode.off:
        return 0
    if policy.mode is SpecMode.fixed:
        return min(policy.fixed_draft_tokens, policy.max_draft_tokens)
    return None


def k_table(
    policy: Policy,
    times: StepTimePredictor,
    rate: float,
    max_batch: int,
    ctx_mean: float,
) -> list[list[int]]:
    """vLLM `num_speculative_tokens_per_batch_size` ([[bs_start, bs_end, K], ...], ranges
    inclusive and merged) for the config-only mode: fixed → one K; adaptive → plan_k per batch
    size with a flat acceptance `rate`, the Policy's budget and maxDraftTokens."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    fixed = static_k(policy)
    accept = np.full(max(policy.max_draft_tokens, 1), rate)
    budget = policy.tpot_budget_ms / 1000.0
    ks = []
    for b in range(1, max_batch + 1):
        if fixed is not None:
            ks.append(fixed)
        else:
            ks.append(plan_k(b, ctx_mean, accept, times, budget, policy.max_draft_tokens).k)
    table: list[list[int]] = []
    for b, k in enumerate(ks, start=1):
        if table and table[-1][2] == k:
            table[-1][1] = b
        else:
            table.append([b, b, k])
    return table
