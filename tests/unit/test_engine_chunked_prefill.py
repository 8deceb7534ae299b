"""The engine loop with chunked prefill on the torch backend (tiny fp32 Qwen2 pair).

Prompts that arrive while others decode are prefilled in chunks riding along with the decoding
steps; the output must equal whole-prompt admission (and plain greedy decoding), and every step
the decoding requests take part in must carry no more prompt than the plan allows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from adaspec import metric_names as mn
from adaspec.backends.base import PrefillChunks, SamplingParams, SeqState, StepResult
from adaspec.backends.torch import TorchBackend
from adaspec.backends.torch.tiny import noisy_copy, tiny_model
from adaspec.engine import LLMEngine, RequestOutput
from adaspec.metrics import EngineMetrics
from adaspec.policy.base import SpecPolicy
from adaspec.policy.prefill import chunk_ctx_work
from adaspec.policy.time_model import StepTimePredictor, default_cpu_time_model
from adaspec.policy_source import PolicySource, default_policy

BUDGET_MS = 380.0
"""With the default CPU time model a plain step of 1-2 rows (+ the chunks' draft forward) is
predicted at ~345-360 ms and a prompt token at 2.5 ms, so the budget leaves room for ~9-14
prompt tokens per step (below MAX_CHUNK)."""
MAX_CHUNK, MIN_CHUNK = 16, 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TokenCodec:
    """Detokenizer for the tiny models: one visible piece per token id."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{t}>" for t in token_ids)


@dataclass(frozen=True)
class Call:
    decoding: list[str]
    context_lens: list[int]
    chunks: dict[str, int]
    done: dict[str, int]
    left: dict[str, int]
    extra_s: float
    backlog: int = 0
    """What the engine said is left for later steps (PrefillChunks.backlog_tokens)."""
    unfed: int = 0
    """Prompt tokens the backend itself holds unfed after this step's chunks."""
    waiting: int = 0
    """Requests the engine said were queued for admission."""


class RecordingBackend(TorchBackend):
    """The real torch backend; records what every step was asked to do."""

    def __init__(self, *args: Any, step_delay_s: float = 0.0, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.calls: list[Call] = []
        self.step_delay_s = step_delay_s

    def step(
        self,
        seqs: list[SeqState],
        policy: SpecPolicy,
        max_draft: int,
        budget_s: float | None,
        prefill: PrefillChunks | None = None,
    ) -> StepResult:
        chunks = dict(prefill.tokens) if prefill is not None else {}
        pf = {sid: self._prefilling[sid] for sid in chunks if sid in self._prefilling}
        self.calls.append(
            Call(
                [s.seq_id for s in seqs],
                [self.target.length(self._rows[s.seq_id].t_slot) for s in seqs],
                chunks,
                {sid: p.done for sid, p in pf.items()},
                {sid: len(p.tokens) - p.done for sid, p in pf.items()},
                prefill.extra_s if prefill is not None else 0.0,
                prefill.backlog_tokens if prefill is not None else 0,
                sum(len(p.tokens) - p.done for p in self._prefilling.values())
                - sum(chunks.values()),
                prefill.waiting_requests if prefill is not None else 0,
            )
        )
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        return super().step(seqs, policy, max_draft, budget_s, prefill)


@pytest.fixture(scope="module")
def pair() -> tuple[Any, Any]:
    target = tiny_model("qwen2", seed=0)
    return target, noisy_copy(target, 0.1, seed=7)


def make_engine(
    pair: tuple[Any, Any], chunk: int, min_chunk: int = MIN_CHUNK, max_batch: int = 3, **kw: Any
) -> tuple[LLMEngine, RecordingBackend]:
    backend = RecordingBackend(
        pair[0], pair[1], max_batch=max_batch, max_model_len=128, dtype=torch.float32, **kw
    )
    engine = LLMEngine(
        backend,
        TokenCodec(),
        PolicySource(default_policy(max_draft_tokens=4, tpot_slo_ms=BUDGET_MS)),
        metrics=EngineMetrics(),
        prefill_chunk_tokens=chunk,
        prefill_min_chunk=min_chunk,
    )
    engine.start()
    return engine, backend


def reference_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            toks.append(int(model(torch.tensor([toks])).logits[0, -1].argmax()))
    return toks[len(prompt) :]


PROMPT_A = [(7 * i + 3) % 90 + 3 for i in range(20)]
PROMPT_B = [(11 * i + 5) % 90 + 3 for i in range(45)]
PROMPT_C = [(13 * i + 1) % 90 + 3 for i in range(33)]


def serve_arrivals(engine: LLMEngine) -> list[str]:
    """A decodes; B and C arrive after A's first output (while A decodes)."""

    async def go() -> list[str]:
        params = SamplingParams(max_tokens=30, ignore_eos=True)
        a = engine.submit(PROMPT_A, params)
        first: RequestOutput = await anext(a)
        texts = [first.text]
        late = SamplingParams(max_tokens=12, ignore_eos=True)
        b = engine.submit(PROMPT_B, late)
        c = engine.submit(PROMPT_C, late)
        rest_a = await a.collect()
        texts[0] += rest_a.text
        texts.append((await b.collect()).text)
        texts.append((await c.collect()).text)
        return texts

    try:
        return asyncio.run(asyncio.wait_for(go(), timeout=120))
    finally:
        engine.shutdown(drain_timeout_s=1.0)


def test_prompts_arriving_mid_decode_match_whole_prompt_admission(pair: tuple[Any, Any]) -> None:
    codec = TokenCodec()
    want = [
        codec.decode(reference_greedy(pair[0], PROMPT_A, 30)),
        codec.decode(reference_greedy(pair[0], PROMPT_B, 12)),
        codec.decode(reference_greedy(pair[0], PROMPT_C, 12)),
    ]
    whole_engine, whole_backend = make_engine(pair, chunk=0)
    assert not whole_engine.chunked_prefill
    assert serve_arrivals(whole_engine) == want
    assert all(not c.chunks for c in whole_backend.calls)

    engine, backend = make_engine(pair, chunk=MAX_CHUNK)
    assert engine.chunked_prefill
    assert serve_arrivals(engine) == want

    times = StepTimePredictor(default_cpu_time_model())
    budget = BUDGET_MS / 1000.0
    mixed = [c for c in backend.calls if c.decoding and c.chunks]
    assert mixed, "no prompt chunk rode along with a decoding step"
    for c in backend.calls:
        if not c.chunks:
            continue
        assert sum(c.chunks.values()) <= MAX_CHUNK
        extra = sum(
            times.prefill_extra(1, n, chunk_ctx_work(c.done[sid], n)) for sid, n in c.chunks.items()
        )
        assert c.extra_s == pytest.approx(extra)
        if not c.decoding:  # nobody waits: the oldest prompt takes a full chunk
            oldest = next(iter(c.chunks))
            assert c.chunks[oldest] == min(MAX_CHUNK, c.left[oldest])
            continue
        b = len(c.decoding)
        plain = times.verify(b, b, float(sum(c.context_lens))) + times.draft_forward_fixed_s
        forced = len(c.chunks) == 1 and next(iter(c.chunks.values())) <= MIN_CHUNK
        assert plain + c.extra_s <= budget + 1e-9 or forced, c
    # the policy hears of the prompt tokens left for later steps and of the admission queue
    # (AdaSpec decodes plainly when both are non-empty); max_batch holds all three requests here
    assert all(c.backlog == c.unfed for c in backend.calls)
    assert any(c.backlog > 0 for c in mixed)
    assert all(c.waiting == 0 for c in backend.calls)
    # the budget, not the chunk limit, bounded the chunks that rode along with decoding rows
    assert max(sum(c.chunks.values()) for c in mixed) < MAX_CHUNK
    m = engine.metrics.registry
    assert m.get_sample_value(mn.REQUEST_TTFT + "_count") == 3
    decode_rows = sum(len(c.decoding) for c in backend.calls)
    assert m.get_sample_value(mn.TARGET_FORWARDS) == decode_rows + 3  # one per prefill


def test_a_full_batch_with_a_prefill_backlog_is_reported_saturated(pair: tuple[Any, Any]) -> None:
    """Two slots: A decodes, B prefills over several steps, C waits for a slot. The engine must
    tell the backend (and so the policy) both the backlog and the queue on B's steps; output
    is unchanged."""
    codec = TokenCodec()
    want = [
        codec.decode(reference_greedy(pair[0], PROMPT_A, 30)),
        codec.decode(reference_greedy(pair[0], PROMPT_B, 12)),
        codec.decode(reference_greedy(pair[0], PROMPT_C, 12)),
    ]
    engine, backend = make_engine(pair, chunk=8, min_chunk=4, max_batch=2)
    assert serve_arrivals(engine) == want
    assert all(c.backlog == c.unfed for c in backend.calls)
    saturated = [c for c in backend.calls if c.decoding and c.backlog > 0 and c.waiting > 0]
    assert saturated, "no step saw a prefill backlog with a request waiting for admission"
    assert all(c.waiting <= 1 for c in backend.calls)


def test_abort_while_prefilling_frees_the_slots(pair: tuple[Any, Any]) -> None:
    engine, backend = make_engine(pair, chunk=2, min_chunk=1, step_delay_s=0.01)
    long_prompt = [(5 * i + 2) % 90 + 3 for i in range(60)]

    async def go() -> tuple[RequestOutput, str]:
        stream = engine.submit(long_prompt, SamplingParams(max_tokens=5), request_id="long")
        while not any("long" in c.chunks for c in backend.calls):
            await asyncio.sleep(0.005)
        assert "long" in backend._prefilling
        stream.abort()
        outs = [o async for o in stream]
        after = await engine.submit(PROMPT_A, SamplingParams(max_tokens=3)).collect()
        return outs[-1], after.finish_reason

    try:
        last, after = asyncio.run(asyncio.wait_for(go(), timeout=60))
    finally:
        engine.shutdown(drain_timeout_s=1.0)
    assert last.finish_reason == "abort" and last.completion_tokens == 0
    assert after == "length"  # the engine keeps serving
    assert backend.running == 0
    assert backend.target.cache.free_slots == backend.max_batch
    assert backend.draft is not None and backend.draft.cache.free_slots == backend.max_batch
    fed = sum(c.chunks.get("long", 0) for c in backend.calls)
    assert 0 < fed < len(long_prompt)


def test_a_refused_prompt_fails_only_that_request(pair: tuple[Any, Any]) -> None:
    engine, backend = make_engine(pair, chunk=MAX_CHUNK)

    async def go() -> tuple[Any, Any]:
        good = engine.submit(PROMPT_C, SamplingParams(max_tokens=6, ignore_eos=True))
        bad = engine.submit([5, 500, 7], SamplingParams(max_tokens=6))  # 500: outside vocab
        return await good.collect(), await bad.collect()

    try:
        good, bad = asyncio.run(asyncio.wait_for(go(), timeout=60))
    finally:
        engine.shutdown(drain_timeout_s=1.0)
    assert good.finish_reason == "length"
    assert good.text == TokenCodec().decode(reference_greedy(pair[0], PROMPT_C, 6))
    assert bad.finish_reason == "error" and bad.error is not None
    assert "prefill failed" in bad.error and "vocabulary" in bad.error
    assert backend.running == 0


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"prefill_chunk_tokens": -1}, "prefill_chunk_tokens"),
        ({"prefill_min_chunk": 0}, "prefill_min_chunk"),
        ({"prefill_chunk_tokens": 8, "prefill_min_chunk": 16}, "prefill_min_chunk"),
    ],
)
def test_bad_chunk_limits_are_refused(pair: Any, kw: dict[str, Any], match: str) -> None:
    backend = TorchBackend(pair[0], None, max_batch=1, max_model_len=32, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        LLMEngine(backend, TokenCodec(), PolicySource(default_policy()), **kw)
