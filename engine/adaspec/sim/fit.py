"""Fit an AcceptanceModel from the real pair's drafts (adaspec.profile.measure.measure_acceptance).

Input: per request, the draft confidences and target verdicts of the draft tokens verification
*observed* (each step: the accepted ones and the first rejected one), in output order — exactly
the on-path tokens the simulator draws (adaspec.sim.acceptance) — and, optionally, per step the
confidences of the tokens drafted after the first rejected one (off-path).

- Confidence histogram and P(accept | confidence bin): pooled counts (empty bins get the
  neighbouring bins' rate via a monotone fill).
- Correlation: confidences are mapped to normal scores z through their pooled empirical CDF
  (mid-ranks, ties averaged: the inverse of how the simulator draws them). Under the model
  z = a_r + b_rp + e_rp (a: per request, b: exponential-kernel smoothed noise with correlation
  length ℓ, e: independent), the pooled autocorrelation of z at lag k is
      ρ(k) = request_sigma² + local_sigma² · exp(−k/ℓ).
  ρ(k) is estimated over all within-request pairs at lags 1…`max_lag` (z has mean 0 and variance
  1 by construction, so no per-request centring: that biases short requests towards zero), and
  (request_sigma², local_sigma², ℓ) are fitted by least squares weighted by the pair counts (ℓ
  on a log grid unless given; both variances ≥ 0, their sum ≤ 0.95). The lag-1 value is how
  persistent confidence is from one draft to the next within a step, which decides how deep
  a confidence-threshold policy drafts.
- Off-path shift (`fit_offpath_shift`), by simulated moments: the statistic is the mean normal
  score of the off-path confidences, each mapped through the *on-path* empirical CDF. Off-path
  tokens follow a rejection, so they sit where the latent score is low; rather than model that
  selection, the fixed-K measurement is replayed on the sampler's own draws (same output
  lengths and draft length, `replicas` copies, common random numbers) and the shift is
  bisected until the sampler's statistic equals the measured one (it is monotone in the shift).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import numpy as np
from numpy.typing import NDArray

from adaspec.sim.acceptance import OFFPATH_SHIFT_RANGE, AcceptanceModel, AcceptanceSampler

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

MAX_TOTAL_SIGMA2 = 0.95
"""request_sigma² + local_sigma² cap: keeps some independent noise in every token."""


class DraftStepLike(Protocol):
    """One row's drafts in one step (adaspec.profile.measure.DraftStep has this shape)."""

    @property
    def on_confidence(self) -> Sequence[float]: ...
    @property
    def on_accepted(self) -> Sequence[bool]: ...
    @property
    def off_confidence(self) -> Sequence[float]: ...


class ObservedStep(NamedTuple):
    """A DraftStepLike built from stored data (e.g. a bench/measure_acceptance.py report)."""

    on_confidence: Sequence[float]
    on_accepted: Sequence[bool]
    off_confidence: Sequence[float]


def norm_ppf(p: FloatArray) -> FloatArray:
    """Inverse standard normal CDF (Acklam's rational approximation, |rel. error| < 1.2e-9)."""
    a = (-39.69683028665376, 220.9460984245205, -275.9285104469687,
         138.3577518672690, -30.66479806614716, 2.506628277459239)  # fmt: skip
    b = (-54.47609879822406, 161.5858368580409, -155.6989798598866,
         66.80131188771972, -13.28068155288572)  # fmt: skip
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838,
         -2.549732539343734, 4.374664141464968, 2.938163982698783)  # fmt: skip
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996, 3.754408661907416)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    out = np.empty_like(p)
    lo, hi = p < 0.02425, p > 1 - 0.02425
    mid = ~(lo | hi)
    q = np.sqrt(-2 * np.log(p[lo]))
    out[lo] = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
        (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1
    )
    q = np.sqrt(-2 * np.log(1 - p[hi]))
    out[hi] = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
        (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1
    )
    q = p[mid] - 0.5
    r = q * q
    out[mid] = (
        (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5])
        * q
        / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
    )
    return out


def score_map(on_conf: FloatArray) -> Callable[[FloatArray], FloatArray]:
    """conf → normal score through the pooled empirical CDF of `on_conf` (mid-ranks, ties
    averaged, linear in between; values outside the observed range get the extreme ranks)."""
    xs = np.sort(np.asarray(on_conf, dtype=np.float64))
    n = xs.shape[0]
    if n == 0:
        raise ValueError("score_map: no on-path confidences")
    uniq, inv = np.unique(xs, return_inverse=True)
    mid = np.bincount(inv, weights=(np.arange(n) + 0.5) / n) / np.bincount(inv)

    def to_score(conf: FloatArray) -> FloatArray:
        u = np.interp(np.asarray(conf, dtype=np.float64), uniq, mid)
        return norm_ppf(u)

    return to_score


def pooled_autocorrelation(
    scores: Sequence[FloatArray], max_lag: int
) -> tuple[FloatArray, FloatArray]:
    """(ρ(1..max_lag), pair counts) of normal scores over all within-request pairs."""
    num = np.zeros(max_lag + 1)
    cnt = np.zeros(max_lag + 1)
    for z in scores:
        for k in range(min(max_lag, z.shape[0] - 1) + 1):
            num[k] += float(np.dot(z[: z.shape[0] - k], z[k:]))
            cnt[k] += z.shape[0] - k
    var = num[0] / max(cnt[0], 1.0)
    rho = np.where(cnt[1:] > 0, num[1:] / np.maximum(cnt[1:], 1.0), 0.0) / max(var, 1e-12)
    return rho, cnt[1:]


def fit_correlation(
    rho: FloatArray, pairs: FloatArray, local_len: float | None = None
) -> tuple[float, float, float]:
    """(request_sigma², local_sigma², ℓ) minimising Σ_k pairs_k (ρ_k − R − S·e^{−k/ℓ})²."""
    k = np.arange(1, rho.shape[0] + 1, dtype=np.float64)
    w = np.asarray(pairs, dtype=np.float64)
    if w.sum() <= 0:
        return 0.0, 0.0, local_len if local_len is not None else 16.0
    grid = [local_len] if local_len is not None else np.geomspace(0.5, 64.0, 120).tolist()
    best = (math.inf, 0.0, 0.0, grid[0])
    for ell in grid:
        e = np.exp(-k / ell)
        cands = [  # the unconstrained optimum and both boundary optima (R = 0, S = 0)
            _wls2(rho, e, w),
            (max(0.0, float(np.dot(w, rho) / w.sum())), 0.0),
            (0.0, max(0.0, float(np.dot(w * e, rho) / max(np.dot(w * e, e), 1e-300)))),
        ]
        for r2, s2 in cands:
            if r2 < 0 or s2 < 0:
                continue
            if r2 + s2 > MAX_TOTAL_SIGMA2:
                r2, s2 = (r2 * MAX_TOTAL_SIGMA2 / (r2 + s2), s2 * MAX_TOTAL_SIGMA2 / (r2 + s2))
            err = float(np.dot(w, (rho - r2 - s2 * e) ** 2))
            if err < best[0]:
                best = (err, r2, s2, ell)
    if best[2] == 0.0 and local_len is None:
        return best[1], 0.0, 16.0  # no local noise: its length means nothing; keep the default
    return best[1], best[2], float(best[3])


def _wls2(rho: FloatArray, e: FloatArray, w: FloatArray) -> tuple[float, float]:
    x = np.stack([np.ones_like(e), e], axis=1) * np.sqrt(w)[:, None]
    sol, *_ = np.linalg.lstsq(x, rho * np.sqrt(w), rcond=None)
    return float(sol[0]), float(sol[1])


def fit_acceptance(
    requests: Sequence[tuple[Sequence[float], Sequence[bool]]],
    bin_edges: Sequence[float] = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0),
    local_len: float | None = None,
    source: str = "measured",
    max_lag: int = 16,
) -> AcceptanceModel:
    """On-path fit (see module docstring); `local_len` None: fitted. `offpath_shift` keeps its
    default: on-path data cannot tell it (fit_offpath_shift / fit_acceptance_steps can)."""
    if max_lag < 1:
        raise ValueError(f"fit_acceptance: max_lag must be >= 1, got {max_lag}")
    reqs = [
        (np.asarray(c, dtype=np.float64), np.asarray(a, dtype=np.bool_))
        for c, a in requests
        if len(c) > 0
    ]
    if not reqs:
        raise ValueError("fit_acceptance: no observations")
    for c, a in reqs:
        if c.shape != a.shape:
            raise ValueError("fit_acceptance: confidence and accepted lengths differ")
    conf = np.concatenate([c for c, _ in reqs])
    acc = np.concatenate([a for _, a in reqs])
    edges = np.asarray(bin_edges, dtype=np.float64)
    bins = np.clip(np.searchsorted(edges[1:-1], conf, side="right"), 0, len(edges) - 2)
    counts = np.bincount(bins, minlength=len(edges) - 1).astype(np.float64)
    hits = np.bincount(bins, weights=acc.astype(np.float64), minlength=len(edges) - 1)
    overall = float(acc.mean())
    prob = np.where(counts > 0, hits / np.maximum(counts, 1.0), np.nan)
    # empty bins: carry the nearest lower bin's rate (or the overall rate), then force monotone
    last = overall
    for i in range(prob.shape[0]):
        if math.isnan(prob[i]):
            prob[i] = last
        last = prob[i]
    prob = np.maximum.accumulate(prob)

    to_score = score_map(conf)
    rho, pairs = pooled_autocorrelation([to_score(c) for c, _ in reqs], max_lag)
    req2, local2, ell = fit_correlation(rho, pairs, local_len)
    return AcceptanceModel(
        bin_edges=[float(e) for e in edges],
        conf_mass=[float(x) for x in counts] if counts.sum() > 0 else [1.0] * len(counts),
        accept_prob=[float(p) for p in np.clip(prob, 0.0, 1.0)],
        request_sigma=math.sqrt(req2),
        local_sigma=math.sqrt(local2),
        local_len=ell,
        source=f"{source} ({conf.shape[0]} observations, {len(reqs)} requests; correlation "
        f"fitted to the pooled autocorrelation at lags 1-{max_lag}, lag-1 {rho[0]:.2f})",
    )


def _draft_len(steps: Sequence[Sequence[DraftStepLike]]) -> int:
    lens = {len(s.on_confidence) + len(s.off_confidence) for req in steps for s in req}
    if len(lens) != 1:
        raise ValueError(
            f"steps: every step must hold draft_len drafts (on + off path); got lengths "
            f"{sorted(lens)}"
        )
    return lens.pop()


def offpath_statistic(steps: Sequence[Sequence[DraftStepLike]]) -> tuple[float, int]:
    """(mean normal score of the off-path confidences through the on-path empirical CDF,
    number of off-path tokens)."""
    on = [c for req in steps for s in req for c in s.on_confidence]
    off = np.asarray([c for req in steps for s in req for c in s.off_confidence])
    if off.shape[0] == 0:
        raise ValueError(
            "steps: no off-path drafts (every step accepted all, or draft_len is 1); "
            "measure with a larger draft_len"
        )
    return float(np.mean(score_map(np.asarray(on))(off))), int(off.shape[0])


def fixed_k_steps(accepted: NDArray[np.bool_], n_out: int, draft_len: int) -> list[tuple[int, int]]:
    """The steps a fixed-`draft_len` greedy measurement (measure_acceptance) takes on one
    request whose on-path verdicts by output position are `accepted`: (first position,
    observed drafts) per step. A step drafts positions s…s+K−1, observes up to the first
    rejected one, emits the accepted ones plus the target's token; stops once `n_out` are
    emitted. Positions s+observed…s+K−1 are that step's off-path drafts."""
    acc = np.asarray(accepted, dtype=np.bool_)
    if acc.shape[0] < n_out + draft_len:
        raise ValueError("fixed_k_steps: need n_out + draft_len verdicts")
    out: list[tuple[int, int]] = []
    s = 0
    while s < n_out:  # s = tokens emitted so far
        rej = np.flatnonzero(~acc[s : s + draft_len])
        n = int(rej[0]) if rej.shape[0] else draft_len
        out.append((s, min(n + 1, draft_len)))
        s += n + 1
    return out


def fit_offpath_shift(
    model: AcceptanceModel,
    steps: Sequence[Sequence[DraftStepLike]],
    replicas: int = 64,
    seed: int = 0,
    tol: float = 1e-3,
) -> AcceptanceModel:
    """`model` with `offpath_shift` fitted to the measured steps (per request, in output order)
    by simulated moments (module docstring). The draft length is read off the steps."""
    if replicas < 1:
        raise ValueError(f"fit_offpath_shift: replicas must be >= 1, got {replicas}")
    steps = [req for req in steps if req]
    if not steps:
        raise ValueError("fit_offpath_shift: no steps")
    k = _draft_len(steps)
    target, n_off = offpath_statistic(steps)
    n_outs = [sum(sum(bool(a) for a in s.on_accepted) + 1 for s in req) for req in steps]

    # on-path structure does not depend on the shift (the sampler draws it first): lay it out once
    base = AcceptanceSampler(model.model_copy(update={"offpath_shift": 0.0}), seed)
    layout: list[tuple[int, int, IntArray]] = []
    on_sim: list[FloatArray] = []
    for rep in range(replicas):
        for r, n_out in enumerate(n_outs):
            idx = rep * len(n_outs) + r
            c_on, a_on, _ = base.draw(idx, n_out + k + 2)
            walk = fixed_k_steps(a_on, n_out, k)
            on_pos = [p for s, seen in walk for p in range(s, s + seen)]
            off_pos = [p for s, seen in walk for p in range(s + seen, s + k)]
            layout.append((idx, n_out + k + 2, np.asarray(off_pos, dtype=np.int64)))
            on_sim.append(c_on[on_pos])
    to_score = score_map(np.concatenate(on_sim))

    def statistic(shift: float) -> float:
        smp = AcceptanceSampler(model.model_copy(update={"offpath_shift": shift}), seed)
        off = [smp.draw(idx, n)[2][pos] for idx, n, pos in layout]
        return float(np.mean(to_score(np.concatenate(off))))

    lo, hi = OFFPATH_SHIFT_RANGE
    s_lo, s_hi = statistic(lo), statistic(hi)  # statistic falls as the shift grows
    if target >= s_lo:
        shift = lo
    elif target <= s_hi:
        shift = hi
    else:
        while hi - lo > tol:
            mid = 0.5 * (lo + hi)
            if statistic(mid) > target:
                lo = mid
            else:
                hi = mid
        shift = 0.5 * (lo + hi)
    return model.model_copy(
        update={
            "offpath_shift": shift,
            "source": f"{model.source}; offpath_shift {shift:.3f} fitted by simulated moments "
            f"to {n_off} off-path drafts (mean on-path-CDF normal score {target:.3f}, "
            f"draft_len {k}, {replicas} replicas)",
        }
    )


def fit_acceptance_steps(
    steps: Sequence[Sequence[DraftStepLike]],
    bin_edges: Sequence[float] = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0),
    local_len: float | None = None,
    source: str = "measured",
    max_lag: int = 16,
    replicas: int = 64,
    seed: int = 0,
) -> AcceptanceModel:
    """fit_acceptance on the steps' on-path tokens, then fit_offpath_shift."""
    requests = [
        (
            [c for s in req for c in s.on_confidence],
            [bool(a) for s in req for a in s.on_accepted],
        )
        for req in steps
    ]
    model = fit_acceptance(requests, bin_edges, local_len, source, max_lag)
    return fit_offpath_shift(model, steps, replicas, seed)


def step_statistics(
    steps: Sequence[Sequence[DraftStepLike]], threshold: float = 0.6
) -> dict[str, float]:
    """What a confidence-threshold policy sees along a step (for measured-vs-sampled reports):
    shares of drafts at or above `threshold` on and off path, P(next ≥ t | this ≥ t) and
    P(next ≥ t | this < t) for consecutive drafts on→on, rejected→first off, off→off, the
    mean off-path normal score, and how deep a one-row threshold policy would draft."""
    on = np.asarray([c for req in steps for s in req for c in s.on_confidence])
    off = np.asarray([c for req in steps for s in req for c in s.off_confidence])
    pairs: dict[str, list[tuple[float, float]]] = {"on_on": [], "rej_off": [], "off_off": []}
    depth = []
    for req in steps:
        for s in req:
            seq = [*s.on_confidence, *s.off_confidence]
            n_on = len(s.on_confidence)
            for j in range(len(seq) - 1):
                kind = "on_on" if j + 1 < n_on else ("rej_off" if j + 1 == n_on else "off_off")
                pairs[kind].append((seq[j], seq[j + 1]))
            low = [j for j, c in enumerate(seq) if c < threshold]
            depth.append(low[0] + 1 if low else len(seq))
    out = {
        "p_on_above": float(np.mean(on >= threshold)) if on.size else math.nan,
        "p_off_above": float(np.mean(off >= threshold)) if off.size else math.nan,
        "mean_conf_on": float(on.mean()) if on.size else math.nan,
        "mean_conf_off": float(off.mean()) if off.size else math.nan,
        "offpath_score": offpath_statistic(steps)[0] if off.size and on.size else math.nan,
        "threshold_depth_one_row": float(np.mean(depth)) if depth else math.nan,
    }
    for kind, v in pairs.items():
        a = np.asarray(v, dtype=np.float64).reshape(-1, 2)
        hi = a[:, 0] >= threshold
        out[f"p_{kind}_stay_above"] = (
            float(np.mean(a[hi, 1] >= threshold)) if hi.any() else math.nan
        )
        out[f"p_{kind}_rise_above"] = (
            float(np.mean(a[~hi, 1] >= threshold)) if (~hi).any() else math.nan
        )
    return out


def sampled_steps(
    model: AcceptanceModel, n_outs: Sequence[int], draft_len: int, replicas: int, seed: int = 0
) -> list[list[ObservedStep]]:
    """The steps a fixed-`draft_len` measurement would record on the sampler's draws (requests
    with output lengths `n_outs`, `replicas` times): the sampled side of a measured-vs-model
    comparison, off-path drafts included (the simulator's own on/off bookkeeping)."""
    smp = AcceptanceSampler(model, seed)
    out: list[list[ObservedStep]] = []
    for rep in range(replicas):
        for r, n_out in enumerate(n_outs):
            c_on, a_on, c_off = smp.draw(rep * len(n_outs) + r, n_out + draft_len + 2)
            req = [
                ObservedStep(
                    c_on[s : s + seen].tolist(),
                    a_on[s : s + seen].tolist(),
                    c_off[s + seen : s + draft_len].tolist(),
                )
                for s, seen in fixed_k_steps(a_on, n_out, draft_len)
            ]
            out.append(req)
    return out
