"""The interface between the engine loop (scheduler, server, metrics) and a model backend.

The engine owns requests, queues and streaming; a backend owns model state (KV caches) and runs
one speculative step for the running batch under a policy. The torch backend implements this on
CPU/GPU with transformers models; a vLLM backend wraps vLLM's own engine instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from adaspec.policy.base import SpecPolicy, VerifyDecision


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    """0 means greedy; > 0 samples (lossless rejection sampling when speculating)."""
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class SeqState:
    """A running sequence as the backend sees it."""

    seq_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class StepStats:
    """Timings and counts of one step, for metrics and the policy's online correction."""

    batch: int
    draft_passes: int
    draft_time_s: float
    verify_time_s: float
    proposed: int
    """Draft tokens produced by draft passes."""
    verified: int
    """Draft tokens sent to verification (after pruning / guard)."""
    accepted: int
    decision: VerifyDecision | None
    """None when the step was plain decoding chosen before any drafting."""
    spec_lens: list[int] = field(default_factory=list)
    """Verified draft tokens per request, in batch order."""


@dataclass(frozen=True)
class StepResult:
    new_tokens: dict[str, list[int]]
    """Tokens emitted this step per sequence (≥ 1 each; may run past max_tokens/EOS —
    the engine truncates)."""
    stats: StepStats


class Backend(Protocol):
    """A model backend that runs the AdaSpec step loop for a batch of sequences."""

    eos_token_ids: frozenset[int]
    max_batch: int
    max_model_len: int

    def add(self, seq: SeqState) -> int:
        """Prefill the prompt into target and draft caches; return the first generated token."""
        ...

    def step(
        self, seqs: list[SeqState], policy: SpecPolicy, max_draft: int, budget_s: float | None
    ) -> StepResult:
        """Run one speculative step (draft passes, verification) for all `seqs`.

        The backend builds the policy's StepContext (it knows the cache lengths); `max_draft`
        and `budget_s` come from the live Policy (0 / None for plain decoding without a guard).
        """
        ...

    def remove(self, seq_id: str) -> None:
        """Free the sequence's cache slots (finished, aborted or client gone)."""
        ...
