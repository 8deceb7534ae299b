"""Baseline speculative policies in the same interface, for benchmarks and comparisons.

- OffPolicy: plain decoding.
- FixedKPolicy: the static `num_speculative_tokens` flag every peer system ships.
- SmartSpecPolicy: SmartSpec-style goodput with i.i.d. acceptance α: pick one K for the whole
  batch before drafting, K* = argmax_K B·E(K)/T(K), E(K) = (1 − α^{K+1})/(1 − α).
- ThresholdPolicy: confidence-threshold dynamic drafting (HF "assistant" rule): stop the
  batch's drafting once the mean confidence of the last draft pass falls below a threshold.
None of them has an SLO guard or pruning: that is what AdaSpec adds.
"""

from __future__ import annotations

import numpy as np

from adaspec.policy.base import (
    BoolArray,
    FloatArray,
    IntArray,
    StepContext,
    StepOutcome,
    VerifyDecision,
)
from adaspec.policy.time_model import StepTimePredictor, default_cpu_time_model


def _plain_decision(b: int, lens: IntArray) -> VerifyDecision:
    return VerifyDecision(
        lens=lens.astype(np.int64).copy(),
        predicted_step_s=0.0,
        expected_tokens=np.ones(b, dtype=np.float64),
    )


class OffPolicy:
    name = "off"

    def start(self, ctx: StepContext) -> BoolArray:
        return np.zeros(ctx.batch, dtype=np.bool_)

    def keep_drafting(
        self, ctx: StepContext, conf: FloatArray, lens: IntArray, drafting: BoolArray
    ) -> BoolArray:
        return np.zeros(ctx.batch, dtype=np.bool_)

    def verify_lengths(self, ctx: StepContext, conf: FloatArray, lens: IntArray) -> VerifyDecision:
        return _plain_decision(ctx.batch, np.zeros(ctx.batch, dtype=np.int64))

    def observe(self, outcome: StepOutcome) -> None:
        return None


class FixedKPolicy:
    """Every request drafts exactly min(k, max_draft) tokens, all verified."""

    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError("k must be >= 0")
        self.k = k
        self.name = f"fixed-{k}"

    def _limit(self, ctx: StepContext) -> int:
        return min(self.k, ctx.max_draft)

    def start(self, ctx: StepContext) -> BoolArray:
        return np.full(ctx.batch, self._limit(ctx) > 0, dtype=np.bool_)

    def keep_drafting(
        self, ctx: StepContext, conf: FloatArray, lens: IntArray, drafting: BoolArray
    ) -> BoolArray:
        out: BoolArray = drafting & (lens < self._limit(ctx))
        return out

    def verify_lengths(self, ctx: StepContext, conf: FloatArray, lens: IntArray) -> VerifyDecision:
        return _plain_decision(ctx.batch, lens)

    def observe(self, outcome: StepOutcome) -> None:
        return None


class SmartSpecPolicy:
    """Batch-level K from an i.i.d. acceptance model (SmartSpec, arXiv 2406.14066)."""

    name = "smartspec"

    def __init__(
        self, times: StepTimePredictor | None = None, alpha0: float = 0.7, plain_bonus: float = 1.1
    ) -> None:
        self.times = times or StepTimePredictor(default_cpu_time_model())
        self._accepted = 0.0
        self._verified = 0.0
        self._alpha0 = alpha0
        self._plain_bonus = plain_bonus
        self._k = 0

    @property
    def alpha(self) -> float:
        if self._verified < 20:
            return self._alpha0
        return float(np.clip(self._accepted / self._verified, 0.01, 0.99))

    def choose_k(self, ctx: StepContext) -> int:
        b = ctx.batch
        L = ctx.context_lens.astype(np.float64)
        a = self.alpha
        ks = np.arange(ctx.max_draft + 1, dtype=np.float64)
        exp_tokens = b * (1.0 - a ** (ks + 1.0)) / (1.0 - a)
        ctx_sum = float(L.sum())
        draft = np.array(
            [sum(self.times.draft_pass(b, ctx_sum + b * j) for j in range(int(k))) for k in ks]
        )
        verify = self.times.verify_vec(
            b, b * (ks + 1.0), (ks + 1.0) * ctx_sum + b * ks * (ks + 1.0) / 2.0
        )
        goodput = exp_tokens / (draft + verify)
        goodput[0] *= self._plain_bonus
        return int(np.argmax(goodput))

    def start(self, ctx: StepContext) -> BoolArray:
        self._k = self.choose_k(ctx) if ctx.batch and ctx.max_draft > 0 else 0
        return np.full(ctx.batch, self._k > 0, dtype=np.bool_)

    def keep_drafting(
        self, ctx: StepContext, conf: FloatArray, lens: IntArray, drafting: BoolArray
    ) -> BoolArray:
        out: BoolArray = drafting & (lens < self._k)
        return out

    def verify_lengths(self, ctx: StepContext, conf: FloatArray, lens: IntArray) -> VerifyDecision:
        return _plain_decision(ctx.batch, lens)

    def observe(self, outcome: StepOutcome) -> None:
        verified = float(outcome.verified_lens.sum())
        if verified == 0:
            # K=0 yields no new evidence: forget slowly so α falls back to its prior and the
            # policy probes again instead of staying off for good after a few hard tokens
            self._accepted *= 0.99
            self._verified *= 0.99
            return
        self._accepted += float(outcome.accepted.sum())
        self._verified += verified


class ThresholdPolicy:
    """Draft while the batch's mean confidence of the last pass is ≥ threshold."""

    name = "threshold"

    def __init__(self, threshold: float = 0.6) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError("threshold must be in [0, 1]")
        self.threshold = threshold

    def start(self, ctx: StepContext) -> BoolArray:
        return np.full(ctx.batch, ctx.max_draft > 0, dtype=np.bool_)

    def keep_drafting(
        self, ctx: StepContext, conf: FloatArray, lens: IntArray, drafting: BoolArray
    ) -> BoolArray:
        if not drafting.any():
            return drafting.copy()
        j = int(lens[drafting].max()) - 1
        mean_conf = float(conf[drafting, j].mean()) if j >= 0 else 1.0
        if mean_conf < self.threshold:
            return np.zeros(ctx.batch, dtype=np.bool_)
        out: BoolArray = drafting & (lens < ctx.max_draft)
        return out

    def verify_lengths(self, ctx: StepContext, conf: FloatArray, lens: IntArray) -> VerifyDecision:
        return _plain_decision(ctx.batch, lens)

    def observe(self, outcome: StepOutcome) -> None:
        return None
