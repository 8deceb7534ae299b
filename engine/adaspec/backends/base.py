"""The interface between the engine loop (scheduler, server, metrics) and a model backend.

The engine owns requests, queues and streaming; a backend owns model state (KV caches) and runs
one speculative step for the running batch under a policy. The torch backend implements this on
CPU/GPU with transformers models; a vLLM backend wraps vLLM's own engine instead.

Chunked prefill (`ChunkedPrefillBackend`): admitting a request with `add` runs its whole prompt
in a forward of its own between two steps, and every running request stalls for it. A backend
that can instead feed prompt chunks along with a step's verification forward registers the
request with `begin_prefill` and takes the chunk sizes (planned by the engine with
`adaspec.policy.prefill.plan_prefill`) in `step`. `add` keeps its meaning for every backend.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    max_draft: int | None = None
    """This request's own cap on draft tokens per step (0 = it never speculates); None = only
    the live Policy's limit applies. The effective cap is the smaller of the two."""


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
    prefill_tokens: int = 0
    """Prompt tokens prefilled in this step (chunked prefill; 0 otherwise)."""
    prefill_done: int = 0
    """Requests whose prefill finished in this step (their first token is in new_tokens)."""
    # Per-pass detail for the engine's step log (`adaspec serve --step-log`). A backend that
    # cannot measure it leaves the defaults (empty lists, 0.0) rather than inventing numbers.
    context_lens: list[int] = field(default_factory=list)
    """Each decoding row's target context length at step start (as its StepContext has it)."""
    draft_rows: list[int] = field(default_factory=list)
    """Decoding rows drafting in each draft pass (one entry per pass)."""
    draft_ctx: list[int] = field(default_factory=list)
    """Per draft pass j: Σ over its drafting rows of (context length + j)."""
    draft_pass_s: list[float] = field(default_factory=list)
    """Per draft pass: wall time of its forward, token choice and bookkeeping (policy calls
    excluded; pass 0 includes the prompt chunks' draft rows when it carries them)."""
    policy_s: float = 0.0
    """Time inside the policy's start / keep_drafting / verify_lengths / observe this step."""


@dataclass(frozen=True)
class StepResult:
    new_tokens: dict[str, list[int]]
    """Tokens emitted this step per sequence (≥ 1 each; may run past max_tokens/EOS —
    the engine truncates)."""
    stats: StepStats


@dataclass(frozen=True)
class PrefillChunks:
    """Prompt chunks to feed in one step, from the engine's prefill plan."""

    tokens: Mapping[str, int]
    """seq_id → prompt tokens to prefill this step (≥ 1; requests absent from it wait)."""
    extra_s: float = 0.0
    """Predicted time the chunks add to the step (`PrefillPlan.extra_s`): the policy sees it as
    `StepContext.prefill_extra_s` and drafts only what still fits the budget."""
    backlog_tokens: int = 0
    """Prompt tokens of admitted requests left for later steps (`StepContext.
    prefill_backlog_tokens`)."""
    waiting_requests: int = 0
    """Requests queued for admission when the step was planned (`StepContext.requests_waiting`):
    with a backlog too, the system is saturated and the step's length paces admission."""


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


class ChunkedPrefillBackend(Backend, Protocol):
    """A backend that prefills prompts in chunks riding along with the steps' forwards.

    `begin_prefill` registers a request (slots allocated, input checked exactly as `add` does)
    without running it; from then on the request is *prefilling*: it is not passed in `seqs`
    and is invisible to the policy. `step(..., prefill=PrefillChunks)` feeds each listed
    request's next chunk; on the step its last chunk is fed, its first generated token (sampled
    from the last prompt position, as `add` would) appears in `StepResult.new_tokens` and it is
    a decoding request from the next step on. A step may have no decoding rows at all.
    """

    chunked_prefill: bool
    """True when `begin_prefill` and `step(prefill=...)` are available."""
    has_draft: bool
    """A plain step with prompt chunks still runs one draft forward over them (to keep the
    draft cache complete): its fixed cost belongs in the plan's plain step time."""

    def begin_prefill(self, seq: SeqState) -> None:
        """Register `seq` for chunked prefill of its prompt (+ any output so far)."""
        ...

    def step(
        self,
        seqs: list[SeqState],
        policy: SpecPolicy,
        max_draft: int,
        budget_s: float | None,
        prefill: PrefillChunks | None = None,
    ) -> StepResult:
        """`Backend.step` for the decoding `seqs`, plus the prompt chunks in `prefill`."""
        ...


def supports_chunked_prefill(backend: Backend) -> bool:
    """Whether `backend` implements `ChunkedPrefillBackend` (the scripted and vLLM backends
    do not: they keep whole-prompt admission)."""
    return bool(getattr(backend, "chunked_prefill", False))
