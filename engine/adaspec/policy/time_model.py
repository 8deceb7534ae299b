"""Linear step-time model with online multiplicative bias correction.

The profiler fits the coefficients offline (adaspec.profile); at run time the machine drifts
(other tenants, thermal state, a different prompt mix), so the ratio observed/predicted is
tracked as an exponentially weighted mean in log space and applied to every prediction.
"""

from __future__ import annotations

import math

import numpy as np

from adaspec.contract import StepTimeModel, TimeModel
from adaspec.policy.base import FloatArray


def default_cpu_time_model() -> TimeModel:
    """Prior for the default CPU pair when no profile is given (MODELS.md: 2 cores, bf16).

    Draft 1 token ≈ 105 ms, target 1 token ≈ 260 ms, target 5 tokens ≈ 265 ms; a prompt costs
    about 2.5 ms per token on top (target + draft), 100× the verification slope.
    """
    return TimeModel(
        draft=StepTimeModel(intercept_ms=95.0, per_row_ms=8.0, per_ctx_ktoken_ms=4.0),
        verify=StepTimeModel(
            intercept_ms=235.0, per_row_ms=10.0, per_token_ms=3.0, per_ctx_ktoken_ms=6.0
        ),
        # target + draft over prompt tokens: the profiler's fit on the pair (2 cores, shared)
        prefill=StepTimeModel(intercept_ms=240.0, per_token_ms=2.5, per_ctx_ktoken_ms=0.2),
    )


class _Linear:
    """One forward pass kind: seconds = (c0 + c_r·rows + c_t·tokens + c_c·ctx/1000)/1000."""

    __slots__ = ("c0", "cc", "cr", "ct")

    def __init__(self, m: StepTimeModel) -> None:
        self.c0 = m.intercept_ms / 1000.0
        self.cr = m.per_row_ms / 1000.0
        self.ct = m.per_token_ms / 1000.0
        self.cc = m.per_ctx_ktoken_ms / 1e6

    def __call__(self, rows: float, tokens: float, ctx_work: float) -> float:
        return self.c0 + self.cr * rows + self.ct * tokens + self.cc * ctx_work

    def vec(self, rows: FloatArray, tokens: FloatArray, ctx_work: FloatArray) -> FloatArray:
        out: FloatArray = self.c0 + self.cr * rows + self.ct * tokens + self.cc * ctx_work
        return out


class StepTimePredictor:
    """Predicts draft-pass and verification times in seconds, bias-corrected online.

    `ctx_work` is Σ over the pass's query tokens of the context they attend to (tokens).
    """

    def __init__(self, model: TimeModel, smoothing: float = 0.1) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise ValueError("smoothing must be in (0, 1]")
        self.model = model
        self._draft = _Linear(model.draft)
        self._verify = _Linear(model.verify)
        self._prefill = _Linear(model.prefill or model.verify)
        self._smoothing = smoothing
        self._log_bias_draft = 0.0
        self._log_bias_verify = 0.0
        self.draft_scale = 1.0
        self.verify_scale = 1.0
        # the m-terms of draft_and_verify_prefix for m = 1..len (the coefficients never change)
        self._draft_m = np.zeros(0)
        self._verify_m = np.zeros(0)

    def draft_pass(self, rows: float, ctx_work: float) -> float:
        if rows <= 0:
            return 0.0
        return self.draft_scale * self._draft(rows, rows, ctx_work)

    def draft_passes(self, rows: FloatArray, ctx_work: FloatArray) -> FloatArray:
        """Vectorised draft-pass times; passes with no rows cost nothing."""
        t = self.draft_scale * self._draft.vec(rows, rows, ctx_work)
        out: FloatArray = np.where(rows > 0, t, 0.0)
        return out

    def draft_and_verify_increment(self, m: FloatArray, ctx_cumsum: FloatArray) -> FloatArray:
        """Extra step time of drafting (one pass over m rows) and verifying one more token for
        each of the first m candidates; `ctx_cumsum[m-1]` is Σ of their contexts."""
        d, v = self._draft, self._verify
        out: FloatArray = self.draft_scale * (
            d.c0 + (d.cr + d.ct) * m + d.cc * ctx_cumsum
        ) + self.verify_scale * ((v.ct + v.cc) * m + v.cc * ctx_cumsum)
        return out

    def draft_and_verify_prefix(self, ctx_cumsum: FloatArray, base: float) -> FloatArray:
        """`base + draft_and_verify_increment(m, ctx_cumsum)` for m = 1..n in a new array, bit
        for bit: the same operations in the same order, with the m-terms cached (the drafter
        calls this before every pass)."""
        n = ctx_cumsum.shape[0]
        if n > self._draft_m.shape[0]:
            d, v = self._draft, self._verify
            m = np.arange(1.0, max(n, 2 * self._draft_m.shape[0]) + 1.0)
            self._draft_m = d.c0 + (d.cr + d.ct) * m
            self._verify_m = (v.ct + v.cc) * m
        t: FloatArray = ctx_cumsum * self._draft.cc
        t += self._draft_m[:n]
        t *= self.draft_scale
        u = ctx_cumsum * self._verify.cc
        u += self._verify_m[:n]
        u *= self.verify_scale
        t += u
        t += base
        return t

    def verify(self, rows: float, tokens: float, ctx_work: float) -> float:
        return self.verify_scale * self._verify(rows, tokens, ctx_work)

    def verify_vec(self, rows: float, tokens: FloatArray, ctx_work: FloatArray) -> FloatArray:
        out: FloatArray = self.verify_scale * self._verify.vec(
            np.full_like(tokens, rows), tokens, ctx_work
        )
        return out

    def prefill(self, rows: float, tokens: float, ctx_work: float) -> float:
        """A forward pass of its own over `tokens` prompt tokens in `rows` prompts (or chunks):
        what an unchunked admission stalls the batch for."""
        if tokens <= 0:
            return 0.0
        return self.verify_scale * self._prefill(rows, tokens, ctx_work)

    def prefill_extra(self, rows: float, tokens: float, ctx_work: float) -> float:
        """What prompt chunks add to a verification forward they ride along with: the prefill
        model without its intercept (the weights are read once for the whole pass)."""
        if tokens <= 0:
            return 0.0
        p = self._prefill
        return self.verify_scale * (p.cr * rows + p.ct * tokens + p.cc * ctx_work)

    def prefill_extra_vec(self, tokens: FloatArray, ctx_work: FloatArray) -> FloatArray:
        """`prefill_extra` of one chunk for each candidate size (tokens > 0)."""
        p = self._prefill
        out: FloatArray = self.verify_scale * (p.cr + p.ct * tokens + p.cc * ctx_work)
        return out

    @property
    def draft_forward_fixed_s(self) -> float:
        """Fixed cost of one draft forward (its intercept). A step with prompt chunks that does
        not draft still runs one draft forward over the chunks and pays this on top of
        `prefill_extra`, which assumes the chunks ride along with a forward that runs anyway."""
        return self.draft_scale * self._draft.c0

    @property
    def prefill_per_token_s(self) -> float:
        return self.verify_scale * self._prefill.ct

    @property
    def verify_per_token_s(self) -> float:
        return self.verify_scale * self._verify.ct

    @property
    def verify_per_ctx_s(self) -> float:
        return self.verify_scale * self._verify.cc

    def observe_step(
        self,
        predicted_draft_s: float,
        predicted_verify_s: float,
        observed_draft_s: float,
        observed_verify_s: float,
        prefill_extra_s: float,
    ) -> None:
        """`observe` for a whole step. When prompt chunks rode along, their cost is split between
        draft pass 0 and the verification in a way the combined prefill model cannot separate:
        take the draft passes as predicted (their bias is learnt on steps without chunks) and
        correct the verification bias (which also scales the prefill model) from the rest."""
        if prefill_extra_s > 0.0:
            observed = observed_draft_s + observed_verify_s
            self.observe(0.0, 0.0, predicted_verify_s, observed - predicted_draft_s)
            return
        self.observe(predicted_draft_s, observed_draft_s, predicted_verify_s, observed_verify_s)

    def observe(
        self,
        predicted_draft_s: float,
        observed_draft_s: float,
        predicted_verify_s: float,
        observed_verify_s: float,
    ) -> None:
        """Move the bias towards observed/predicted (log-space EWMA; ignores empty passes)."""
        a = self._smoothing
        if predicted_draft_s > 0 and observed_draft_s > 0:
            r = math.log(observed_draft_s / predicted_draft_s) + self._log_bias_draft
            self._log_bias_draft += a * (r - self._log_bias_draft)
            self.draft_scale = math.exp(self._log_bias_draft)
        if predicted_verify_s > 0 and observed_verify_s > 0:
            r = math.log(observed_verify_s / predicted_verify_s) + self._log_bias_verify
            self._log_bias_verify += a * (r - self._log_bias_verify)
            self.verify_scale = math.exp(self._log_bias_verify)
