"""Chunked prefill with the real Qwen2.5-Coder 1.5B/0.5B pair (bf16, as served): a long prompt
that arrives while a request decodes no longer stalls that request for the whole prefill.

Whole-prompt admission runs the new prompt through both models between two steps; the decoding
request's next token waits for all of it. With chunked prefill the prompt rides along with the
decoding steps in budget-sized chunks, so the longest wait between two of its tokens is a
fraction of that. Timing on a shared CPU is noisy, so the claim is relative, with a wide margin.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from adaspec.backends.base import PrefillChunks, SamplingParams, SeqState, StepResult
from adaspec.backends.torch import TorchBackend
from adaspec.engine import LLMEngine
from adaspec.metrics import EngineMetrics
from adaspec.policy.base import SpecPolicy
from adaspec.policy_source import PolicySource, default_policy

pytestmark = pytest.mark.integration

BUDGET_MS = 800.0
LONG_PROMPT_TOKENS = 700


class TimedBackend(TorchBackend):
    """The real backend; records when each step that decoded request "a" ended, and how many
    tokens of the other prompt each step prefilled."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.a_steps: list[float] = []
        self.prefill_tokens: list[int] = []

    def step(
        self,
        seqs: list[SeqState],
        policy: SpecPolicy,
        max_draft: int,
        budget_s: float | None,
        prefill: PrefillChunks | None = None,
    ) -> StepResult:
        res = super().step(seqs, policy, max_draft, budget_s, prefill)
        if any(s.seq_id == "a" for s in seqs):
            self.a_steps.append(time.monotonic())
        chunks = prefill.tokens if prefill is not None else {}
        self.prefill_tokens.append(sum(n for sid, n in chunks.items() if sid != "a"))
        return res


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Any, Any, Any]]:
    from transformers import AutoModelForCausalLM

    from adaspec.models import ModelError, resolve_model
    from adaspec.server.codec import HFCodec

    try:
        target_dir = resolve_model("default-target")
        draft_dir = resolve_model("default-draft")
    except ModelError as e:
        pytest.skip(f"real model pair unavailable: {e}")
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.bfloat16).eval()
    draft = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=torch.bfloat16).eval()
    yield HFCodec.from_folder(str(target_dir)), target, draft
    del target, draft


def longest_wait_while_prefilling(
    pair: tuple[Any, Any, Any], chunk_tokens: int
) -> tuple[float, TimedBackend, list[str]]:
    """Seconds between two steps of the decoding request "a" around the long prompt's
    admission, the backend, and both requests' finish reasons."""
    codec, target, draft = pair
    backend = TimedBackend(target, draft, max_batch=2, max_model_len=1024)
    engine = LLMEngine(
        backend,
        codec,
        PolicySource(default_policy(max_draft_tokens=4, tpot_slo_ms=BUDGET_MS)),
        metrics=EngineMetrics(),
        prefill_chunk_tokens=chunk_tokens,
    )
    engine.start()
    short = codec.encode("def fibonacci(n: int) -> int:\n    ")
    text = "def add_{i}(a: int, b: int) -> int:\n    return a + b + {i}\n\n"
    long_ids = codec.encode("".join(text.format(i=i) for i in range(60)))[:LONG_PROMPT_TOKENS]
    assert len(long_ids) == LONG_PROMPT_TOKENS

    async def go() -> tuple[float, float, list[str]]:
        a = engine.submit(short, SamplingParams(max_tokens=40, ignore_eos=True), request_id="a")
        outs = 0
        async for _ in a:
            outs += 1
            if outs == 3:
                break
        arrived = time.monotonic()
        b = engine.submit(long_ids, SamplingParams(max_tokens=2, ignore_eos=True))
        fb = await b.collect()
        first_b = time.monotonic()
        fa = await a.collect()
        return arrived, first_b, [fa.finish_reason, fb.finish_reason]

    try:
        arrived, b_done, reasons = asyncio.run(asyncio.wait_for(go(), timeout=600))
    finally:
        engine.shutdown(drain_timeout_s=1.0)
    ends = backend.a_steps
    gaps = [t1 - t0 for t0, t1 in itertools.pairwise(ends) if t1 >= arrived and t0 <= b_done]
    assert gaps, "request a did not decode while the long prompt was admitted"
    return max(gaps), backend, reasons


def test_a_long_prompt_does_not_stall_decoding_requests(pair: tuple[Any, Any, Any]) -> None:
    torch.set_num_threads(2)
    whole, whole_backend, reasons = longest_wait_while_prefilling(pair, chunk_tokens=0)
    assert reasons == ["length", "length"]
    assert not any(whole_backend.prefill_tokens)
    chunked, backend, reasons = longest_wait_while_prefilling(pair, chunk_tokens=512)
    assert reasons == ["length", "length"]
    fed = [n for n in backend.prefill_tokens if n]
    assert sum(fed) == LONG_PROMPT_TOKENS and len(fed) >= 3  # spread over several steps
    print(f"longest wait of the decoding request: whole {whole:.2f} s, chunked {chunked:.2f} s")
    assert chunked < 0.7 * whole
