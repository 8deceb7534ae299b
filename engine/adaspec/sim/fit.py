"""Fit an AcceptanceModel from per-request (confidence, accepted) sequences of the real pair.

Input: for each request, the draft confidences and target verdicts of the draft tokens that
verification *observed* (each step: the accepted ones and the first rejected one), in output
order — exactly the on-path tokens the simulator draws (adaspec.sim.acceptance).

- Confidence histogram and P(accept | confidence bin): pooled counts (empty bins get the
  neighbouring bins' rate via a monotone fill).
- Correlation: confidences are mapped to normal scores z through their pooled empirical CDF
  (the inverse of how the simulator draws them); then, with the model
  z = a_r + b_rp + e_rp (a: per request, b: exponential-kernel smoothed noise with correlation
  length ℓ, so corr(b_p, b_{p+1}) = exp(−1/ℓ)), moment estimates:
    local_sigma²   ≈ lag-1 autocovariance of z within requests / exp(−1/ℓ)
    request_sigma² ≈ variance of per-request means − (within variance)/n̄ − local part
  clipped so that request_sigma² + local_sigma² < 0.95.
These are rough method-of-moments estimates (documented as such in the fitted model's source).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from adaspec.sim.acceptance import AcceptanceModel

FloatArray = NDArray[np.float64]


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


def fit_acceptance(
    requests: Sequence[tuple[Sequence[float], Sequence[bool]]],
    bin_edges: Sequence[float] = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0),
    local_len: float = 16.0,
    source: str = "measured",
) -> AcceptanceModel:
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

    # normal scores through the pooled empirical CDF (mid-ranks)
    order = np.argsort(conf, kind="stable")
    ranks = np.empty(conf.shape[0])
    ranks[order] = (np.arange(conf.shape[0]) + 0.5) / conf.shape[0]
    z_all = norm_ppf(ranks)
    z_req, start = [], 0
    for c, _ in reqs:
        z_req.append(z_all[start : start + c.shape[0]])
        start += c.shape[0]
    long = [z for z in z_req if z.shape[0] >= 3]
    rho1 = math.exp(-1.0 / local_len)
    if long:
        cov1 = float(
            np.mean(np.concatenate([(z[1:] - z.mean()) * (z[:-1] - z.mean()) for z in long]))
        )
        within = float(np.mean(np.concatenate([(z - z.mean()) ** 2 for z in long])))
        means = np.asarray([z.mean() for z in long])
        n_bar = float(np.mean([z.shape[0] for z in long]))
        local2 = max(0.0, cov1 / rho1)
        local_mean_var = local2 * min(1.0, 2.0 * local_len / n_bar)
        req2 = max(0.0, float(means.var()) - within / n_bar - local_mean_var)
    else:
        local2 = req2 = 0.0
    total = req2 + local2
    if total > 0.95:
        req2, local2 = req2 * 0.95 / total, local2 * 0.95 / total
    return AcceptanceModel(
        bin_edges=[float(e) for e in edges],
        conf_mass=[float(x) for x in counts] if counts.sum() > 0 else [1.0] * len(counts),
        accept_prob=[float(p) for p in np.clip(prob, 0.0, 1.0)],
        request_sigma=math.sqrt(req2),
        local_sigma=math.sqrt(local2),
        local_len=local_len,
        source=f"{source} ({conf.shape[0]} observations, {len(reqs)} requests; "
        "correlation by method of moments)",
    )
