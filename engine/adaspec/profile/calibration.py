"""Turn (draft confidence, accepted?) observations into an AcceptanceCalibration.

Pure numpy. Bins are equal-width on [0, 1]; bins with too few observations are merged into a
neighbour so no probability rests on a handful of tokens. Each bin's probability is shrunk
towards the bin's midpoint with one pseudo-observation (never exactly 0 or 1 from few samples).
AUC (how well confidence ranks accepted above rejected tokens) is computed on the raw
confidences; the Brier score on the binned map, in sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from adaspec.contract import AcceptanceCalibration


def roc_auc(scores: NDArray[np.float64], labels: NDArray[np.bool_]) -> float | None:
    """Mann–Whitney AUC with tied scores counted half; None when one class is absent."""
    pos = int(labels.sum())
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def _merge_small(edges: list[float], counts: list[int], min_count: int) -> list[float]:
    """Drop inner edges until every bin has ≥ min_count points (or one bin is left)."""
    edges = list(edges)
    counts = list(counts)
    while len(counts) > 1:
        i = int(np.argmin(counts))
        if counts[i] >= min_count:
            break
        # Merge with the smaller neighbour (keeps bins balanced).
        if i == 0:
            j = 1
        elif i == len(counts) - 1:
            j = i - 1
        else:
            j = i - 1 if counts[i - 1] <= counts[i + 1] else i + 1
        lo = min(i, j)
        counts[lo] = counts[lo] + counts[lo + 1]
        del counts[lo + 1]
        del edges[lo + 1]
    return edges


def calibrate(
    confidence: Sequence[float],
    accepted: Sequence[bool],
    bins: int = 10,
    min_count: int = 5,
) -> AcceptanceCalibration:
    """Piecewise-constant P(accept | confidence) with AUC and Brier score."""
    conf = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    acc = np.asarray(accepted, dtype=bool)
    if conf.shape != acc.shape:
        raise ValueError("confidence and accepted must have the same length")
    if len(conf) == 0:
        raise ValueError("no drafted tokens were observed; cannot calibrate")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    edges = [float(e) for e in np.linspace(0.0, 1.0, bins + 1)]
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, len(edges) - 2)
    counts = np.bincount(idx, minlength=len(edges) - 1).tolist()
    edges = _merge_small(edges, counts, min_count)
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, len(edges) - 2)
    n_bins = len(edges) - 1
    n = np.bincount(idx, minlength=n_bins).astype(np.float64)
    hits = np.bincount(idx, weights=acc.astype(np.float64), minlength=n_bins)
    mids = (np.array(edges[:-1]) + np.array(edges[1:])) / 2.0
    prob = (hits + mids) / (n + 1.0)
    brier = float(np.mean((prob[idx] - acc.astype(np.float64)) ** 2))
    auc = roc_auc(conf, acc)
    return AcceptanceCalibration(
        bin_edges=[round(e, 4) for e in edges],
        accept_prob=[round(float(p), 4) for p in prob],
        counts=[int(c) for c in n],
        auc=None if auc is None else round(auc, 4),
        brier=round(brier, 4),
    )
