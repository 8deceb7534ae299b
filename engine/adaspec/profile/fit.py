"""Fit the linear step-time model (contract.StepTimeModel) to measured step times.

Pure numpy, no torch: t = intercept + per_row·rows + per_token·tokens + per_ctx_ktoken·Σ q·ctx/1000.
Coefficients are constrained to be non-negative (a forward pass never gets faster with more
work), solved with a small Lawson–Hanson active-set NNLS. Quality is reported on a deterministic
held-out subset so the number says how well the model predicts points it did not see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from adaspec.contract import FitQuality, StepTimeModel

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class StepSample:
    """One measured forward pass: per-row query tokens and context lengths, and its time."""

    q_lens: tuple[int, ...]
    ctx_lens: tuple[int, ...]
    time_ms: float
    ctx_work: float | None = None
    """Attention work in tokens when it is not Σ q·ctx: a prompt chunk also attends causally
    to itself, Σ n·offset + n(n+1)/2 (adaspec.policy.prefill.chunk_ctx_work), which for a
    512-token chunk dwarfs what it reads from the cache."""

    @property
    def rows(self) -> int:
        return len(self.q_lens)

    @property
    def tokens(self) -> int:
        return sum(self.q_lens)

    @property
    def ctx_ktokens(self) -> float:
        if self.ctx_work is not None:
            return self.ctx_work / 1000.0
        return sum(q * c for q, c in zip(self.q_lens, self.ctx_lens, strict=True)) / 1000.0


def features(samples: Sequence[StepSample]) -> FloatArray:
    """Design matrix with columns [1, rows, tokens, Σ q·ctx / 1000]."""
    return np.array(
        [[1.0, s.rows, s.tokens, s.ctx_ktokens] for s in samples], dtype=np.float64
    ).reshape(len(samples), 4)


def nnls(A: FloatArray, b: FloatArray, max_iter: int = 200) -> FloatArray:
    """min ||A x − b||₂ subject to x ≥ 0 (Lawson–Hanson active set)."""
    m, n = A.shape
    if b.shape != (m,):
        raise ValueError(f"b must have shape ({m},), got {b.shape}")
    # Scale columns so the tolerance means the same for every feature.
    scale = np.linalg.norm(A, axis=0)
    scale[scale == 0.0] = 1.0
    As = A / scale
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 1e-10 * max(1.0, float(np.abs(As).max())) * max(1.0, float(np.abs(b).max()))
    for _ in range(max_iter):
        w = As.T @ (b - As @ x)
        if passive.all() or not (w[~passive] > tol).any():
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(As[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = float(np.min(x[neg] / (x[neg] - z[neg])))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x / scale


def holdout_mask(n: int, fraction: float = 0.25, seed: int = 0) -> NDArray[np.bool_]:
    """Deterministic split: a fixed-seed permutation picks round(fraction·n) points (≥ 1) to
    hold out; seeded rather than strided so it does not alias with the grid's nesting order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    n_test = min(max(1, round(fraction * n)), n - 1)
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:n_test]] = True
    return mask


def r2_score(y: FloatArray, pred: FloatArray) -> float:
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def mape(y: FloatArray, pred: FloatArray) -> float:
    """Mean absolute percentage error, as a fraction (0.1 = 10 %)."""
    return float(np.mean(np.abs(pred - y) / np.abs(y)))


def predict(model: StepTimeModel, samples: Sequence[StepSample]) -> FloatArray:
    coef = np.array(
        [model.intercept_ms, model.per_row_ms, model.per_token_ms, model.per_ctx_ktoken_ms]
    )
    return features(samples) @ coef


def fit_coefficients(samples: Sequence[StepSample]) -> FloatArray:
    """Non-negative coefficients minimising the squared *relative* error.

    Relative, because the quality that matters (and is reported) is MAPE: an absolute fit lets
    the few slowest points dominate and mispredicts the common fast steps.
    """
    X = features(samples)
    y = np.array([s.time_ms for s in samples], dtype=np.float64)
    return nnls(X / y[:, None], np.ones(len(samples)))


def fit_step_time(samples: Sequence[StepSample], holdout: float = 0.25) -> StepTimeModel:
    """Relative-error NNLS fit on the training points; R² and MAPE on the held-out points.

    The returned coefficients are refitted on all points (the held-out numbers describe the
    procedure, the final model uses every measurement).
    """
    if len(samples) < 6:
        raise ValueError(f"need at least 6 timing points to fit and hold out, got {len(samples)}")
    if any(not s.time_ms > 0 for s in samples):
        raise ValueError("every timing point needs a positive time_ms")
    X = features(samples)
    y = np.array([s.time_ms for s in samples], dtype=np.float64)
    test = holdout_mask(len(samples), holdout)
    coef_train = fit_coefficients([s for s, t in zip(samples, test, strict=True) if not t])
    pred = X[test] @ coef_train
    quality = FitQuality(
        r2=round(r2_score(y[test], pred), 4),
        mape=round(mape(y[test], pred), 4),
        n_train=int((~test).sum()),
        n_test=int(test.sum()),
    )
    c = fit_coefficients(samples)
    return StepTimeModel(
        intercept_ms=round(float(c[0]), 4),
        per_row_ms=round(float(c[1]), 4),
        per_token_ms=round(float(c[2]), 4),
        per_ctx_ktoken_ms=round(float(c[3]), 5),
        fit=quality,
    )
