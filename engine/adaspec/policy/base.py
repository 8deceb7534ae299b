"""The interface every speculative policy implements, and the step data it sees.

A backend runs one decoding *step* for a batch of B running requests like this:

    plan = policy.start(ctx)                       # who drafts at all this step
    drafting = plan.copy(); lens = zeros(B)
    for j in range(ctx.max_draft):
        if not drafting.any(): break
        draft one token for rows in `drafting`; write its confidence to conf[:, j]
        lens[drafting] += 1
        drafting &= policy.keep_drafting(ctx, conf, lens, drafting)
    decision = policy.verify_lengths(ctx, conf, lens)   # pruning + SLO guard
    verify decision.lens draft tokens per request (plus the bonus/corrected token)
    policy.observe(StepOutcome(...))                  # online correction

Everything is numpy, vectorised over the batch; nothing here imports torch or vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]


@dataclass(frozen=True)
class StepContext:
    """What the policy knows about the batch before drafting."""

    context_lens: IntArray
    """(B,) tokens already in each request's target KV cache (prompt + generated)."""
    max_draft: int
    """Upper bound on draft tokens per request this step (policy maxDraftTokens / fixed K)."""
    budget_s: float | None = None
    """TPOT budget (seconds per emitted token) the SLO guard enforces; None disables it."""
    prefill_extra_s: float = 0.0
    """Predicted time prompt chunks add to this step's verification (policy/prefill.py), from
    the profile's time model without online bias correction (a policy applies its own); the
    SLO guard must count it in every step-time prediction."""
    prefill_backlog_tokens: int = 0
    """Prompt tokens of admitted requests still waiting for prefill after this step's chunks.
    With requests also waiting for admission, the step's length paces admission."""
    requests_waiting: int = 0
    """Requests queued for admission (not yet prefilling) when the step was planned."""

    @property
    def batch(self) -> int:
        return int(self.context_lens.shape[0])


@dataclass(frozen=True)
class VerifyDecision:
    """The final per-request lengths to verify and what the policy predicted for the step."""

    lens: IntArray
    """(B,) draft tokens to verify per request (≤ drafted length)."""
    predicted_step_s: float
    """Predicted time of the whole step (draft passes already run + verification)."""
    expected_tokens: FloatArray
    """(B,) expected tokens emitted per request (1 + Σ survival)."""
    pruned: int = 0
    """Draft tokens dropped by the confidence-prior verifier."""
    guard_refusals: int = 0
    """Draft tokens dropped because the step would break the TPOT budget."""
    infeasible: bool = False
    """Even plain decoding is predicted to break the budget."""


@dataclass(frozen=True)
class StepOutcome:
    """What happened, fed back for online correction (acceptance calibration, time bias)."""

    conf: FloatArray
    """(B, K) draft confidences (0 where nothing was drafted)."""
    verified_lens: IntArray
    """(B,) draft tokens sent to verification."""
    accepted: IntArray
    """(B,) draft tokens accepted (≤ verified_lens)."""
    context_lens: IntArray
    """(B,) context lengths at the start of the step."""
    drafted_lens: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """(B,) draft tokens each request drafted (before pruning); empty means = verified_lens."""
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    prefill_extra_s: float = 0.0
    """The step's `StepContext.prefill_extra_s`: prompt chunks rode along with its forwards
    (draft pass 0 and verification), so their measured time is in both phases."""


class SpecPolicy(Protocol):
    """A speculative-length policy: AdaSpec or one of the baselines."""

    name: str

    def start(self, ctx: StepContext) -> BoolArray:
        """(B,) which requests draft a first token this step. All False means plain decoding."""
        ...

    def keep_drafting(
        self, ctx: StepContext, conf: FloatArray, lens: IntArray, drafting: BoolArray
    ) -> BoolArray:
        """After a draft pass: (B,) which of the `drafting` requests draft one more token."""
        ...

    def verify_lengths(self, ctx: StepContext, conf: FloatArray, lens: IntArray) -> VerifyDecision:
        """Choose how many of the drafted tokens each request verifies."""
        ...

    def observe(self, outcome: StepOutcome) -> None:
        """Learn from the verification outcome and the measured step times."""
        ...
