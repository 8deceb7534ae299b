"""The engine loop with the scripted backend (a deterministic Backend twin; fault injection)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from adaspec import metric_names as mn
from adaspec.backends.base import SamplingParams
from adaspec.contract import Policy, SpecMode
from adaspec.engine import (
    EngineUnavailableError,
    InvalidRequestError,
    LLMEngine,
    QueueFullError,
    RequestOutput,
)
from adaspec.metrics import EngineMetrics
from adaspec.policy_source import PolicySource, default_policy
from adaspec.server.codec import ByteCodec
from adaspec.server.scripted import DEFAULT_REPLY, ScriptedBackend

T = TypeVar("T")
CODEC = ByteCodec()
PROMPT = CODEC.encode("hello")


def make_engine(
    backend: ScriptedBackend | None = None,
    *,
    policy: Policy | None = None,
    max_waiting: int = 8,
    start: bool = True,
) -> tuple[LLMEngine, ScriptedBackend]:
    backend = backend or ScriptedBackend()
    engine = LLMEngine(
        backend,
        backend.codec,
        PolicySource(policy or default_policy(max_draft_tokens=4, tpot_slo_ms=10_000.0)),
        max_waiting=max_waiting,
        metrics=EngineMetrics(),
    )
    if start:
        engine.start()
    return engine, backend


def run(engine: LLMEngine, coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        return asyncio.run(asyncio.wait_for(coro(), timeout=30))
    finally:
        engine.shutdown(drain_timeout_s=1.0)


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def sample(engine: LLMEngine, name: str, **labels: str) -> float:
    value = engine.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def test_generates_the_script_and_stops_at_max_tokens() -> None:
    engine, backend = make_engine()

    async def go() -> list[RequestOutput]:
        return [out async for out in engine.submit(PROMPT, greedy(20))]

    outs = run(engine, go)
    text = "".join(o.text for o in outs)
    assert text == DEFAULT_REPLY[:20]
    final = outs[-1]
    assert final.finish_reason == "length"
    assert (final.prompt_tokens, final.completion_tokens) == (len(PROMPT), 20)
    assert sum(len(o.token_ids) for o in outs) == 20
    assert len(outs) > 2  # streamed in increments, not one blob
    assert backend.positions == {}  # slot freed
    assert sample(engine, mn.REQUESTS_TOTAL, outcome="length") == 1
    assert sample(engine, mn.GENERATED_TOKENS) == 20
    assert sample(engine, mn.REQUEST_TPOT + "_count") == 1
    assert sample(engine, mn.REQUEST_TTFT + "_count") == 1
    # one prefill forward plus one per step, for this single sequence
    assert sample(engine, mn.TARGET_FORWARDS) == 1 + backend.steps
    assert sample(engine, mn.DRAFT_ACCEPTED) > 0


def test_eos_stops_unless_ignored() -> None:
    engine, _ = make_engine(ScriptedBackend("abc", eos_at_end=True))

    async def go() -> tuple[Any, Any]:
        a = await engine.submit(PROMPT, greedy(50)).collect()
        b = await engine.submit(PROMPT, greedy(10, ignore_eos=True)).collect()
        return a, b

    a, b = run(engine, go)
    assert (a.text, a.finish_reason, a.completion_tokens) == ("abc", "stop", 4)  # EOS counted
    assert b.finish_reason == "length" and b.completion_tokens == 10
    assert b.text.startswith("abcabc")


def test_stop_strings_cut_the_text_and_are_never_streamed() -> None:
    engine, _ = make_engine(ScriptedBackend("one two three four five "))

    async def go() -> list[RequestOutput]:
        return [o async for o in engine.submit(PROMPT, greedy(100), stop=["four", "zzz"])]

    outs = run(engine, go)
    assert "".join(o.text for o in outs) == "one two three "
    assert outs[-1].finish_reason == "stop"
    assert all("fo" not in o.text for o in outs)  # the stop prefix was held back, not sent


def test_multibyte_characters_are_never_split() -> None:
    reply = "héllo wörld ✓ 日本 "
    engine, _ = make_engine(ScriptedBackend(reply))

    async def go() -> list[RequestOutput]:
        return [o async for o in engine.submit(PROMPT, greedy(len(reply.encode())))]

    outs = run(engine, go)
    assert "".join(o.text for o in outs) == reply
    assert all("\ufffd" not in o.text for o in outs)


def test_continuous_batching_respects_max_batch_and_frees_slots() -> None:
    engine, backend = make_engine(ScriptedBackend(max_batch=2, verify_s=0.002))

    async def go() -> list[Any]:
        streams = [engine.submit(PROMPT, greedy(8 + 3 * i)) for i in range(5)]
        return list(await asyncio.gather(*(s.collect() for s in streams)))

    finals = run(engine, go)
    assert [f.completion_tokens for f in finals] == [8 + 3 * i for i in range(5)]
    assert all(f.finish_reason == "length" for f in finals)
    assert max(backend.batch_sizes) == 2 and 1 in backend.batch_sizes
    assert backend.positions == {}
    assert sample(engine, mn.REQUEST_TPOT + "_count") == 5
    assert sample(engine, mn.REQUESTS_RUNNING) == 0
    assert sample(engine, mn.REQUESTS_WAITING) == 0


def test_full_queue_raises_and_counts_rejection() -> None:
    engine, _ = make_engine(ScriptedBackend(max_batch=1, verify_s=0.02), max_waiting=1)

    async def go() -> tuple[Any, Any]:
        first = engine.submit(PROMPT, greedy(30))
        await first.__anext__()  # admitted and running
        second = engine.submit(PROMPT, greedy(5))  # waits
        with pytest.raises(QueueFullError, match="waiting queue is full"):
            engine.submit(PROMPT, greedy(5))
        return await first.collect(), await second.collect()

    a, b = run(engine, go)
    assert a.finish_reason == b.finish_reason == "length"
    assert sample(engine, mn.REQUESTS_TOTAL, outcome="rejected") == 1


def test_abort_frees_the_slot_before_the_next_step() -> None:
    engine, backend = make_engine(ScriptedBackend(verify_s=0.02))

    async def go() -> list[RequestOutput]:
        stream = engine.submit(PROMPT, greedy(500))
        outs = [await stream.__anext__()]
        stream.abort()
        outs += [o async for o in stream]
        return outs

    outs = run(engine, go)
    assert outs[-1].finish_reason == "abort"
    assert backend.positions == {}
    assert sample(engine, mn.REQUESTS_TOTAL, outcome="abort") == 1
    assert sample(engine, mn.REQUEST_TPOT + "_count") == 0  # aborted requests have no TPOT


def test_failing_step_fails_the_batch_and_the_loop_keeps_serving() -> None:
    engine, backend = make_engine(ScriptedBackend(verify_s=0.01))

    async def go() -> tuple[Any, Any]:
        stream = engine.submit(PROMPT, greedy(200))
        await stream.__anext__()
        backend.fail_next_step = RuntimeError("device on fire")
        failed = await stream.collect()
        again = await engine.submit(PROMPT, greedy(5)).collect()
        return failed, again

    failed, again = run(engine, go)
    assert failed.finish_reason == "error"
    assert failed.error is not None and "device on fire" in failed.error
    assert again.finish_reason == "length" and again.text == DEFAULT_REPLY[:5]
    assert sample(engine, mn.REQUESTS_TOTAL, outcome="error") == 1


def test_failing_prefill_fails_only_that_request() -> None:
    engine, backend = make_engine()

    async def go() -> tuple[Any, Any]:
        backend.fail_next_add = ValueError("bad prompt")
        bad = await engine.submit(PROMPT, greedy(5)).collect()
        good = await engine.submit(PROMPT, greedy(5)).collect()
        return bad, good

    bad, good = run(engine, go)
    assert bad.finish_reason == "error" and "bad prompt" in (bad.error or "")
    assert good.finish_reason == "length"


def test_prompt_too_long_and_empty_are_rejected_with_the_field() -> None:
    engine, _ = make_engine(ScriptedBackend(max_model_len=16))

    async def go() -> None:
        with pytest.raises(InvalidRequestError, match="16 tokens") as e:
            engine.submit([5] * 16, greedy(1))
        assert e.value.param == "prompt"
        with pytest.raises(InvalidRequestError) as e2:
            engine.submit([], greedy(1))
        assert e2.value.param == "prompt"
        # a prompt that fits stops at the context limit with finish_reason "length"
        final = await engine.submit([5] * 10, greedy(100)).collect()
        assert final.finish_reason == "length" and final.completion_tokens == 6

    run(engine, go)


def test_not_started_and_shut_down_engines_refuse_requests() -> None:
    engine, _ = make_engine(start=False)

    async def go() -> None:
        with pytest.raises(EngineUnavailableError):
            engine.submit(PROMPT, greedy(1))

    asyncio.run(go())
    engine.start()
    engine.shutdown(drain_timeout_s=1.0)
    assert not engine.ready
    asyncio.run(go())


def test_shutdown_drains_running_requests() -> None:
    engine, _ = make_engine(ScriptedBackend(verify_s=0.01))

    async def go() -> Any:
        stream = engine.submit(PROMPT, greedy(20))
        await stream.__anext__()
        t = threading.Thread(target=engine.shutdown, kwargs={"drain_timeout_s": 10.0})
        t.start()
        final = await stream.collect()
        await asyncio.to_thread(t.join)
        return final

    final = asyncio.run(asyncio.wait_for(go(), 30))
    assert final.finish_reason == "length" and final.completion_tokens == 20


def test_shutdown_fails_what_it_cannot_drain() -> None:
    engine, _ = make_engine(ScriptedBackend(verify_s=0.02))

    async def go() -> Any:
        stream = engine.submit(PROMPT, greedy(10_000, ignore_eos=True))
        await stream.__anext__()
        await asyncio.to_thread(engine.shutdown, 0.0)
        return await stream.collect()

    final = asyncio.run(asyncio.wait_for(go(), 30))
    assert final.finish_reason == "error"
    assert "shut down" in (final.error or "")


class CrashingBackend(ScriptedBackend):
    """A backend whose batch size lookup blows up inside the loop (outside add/step)."""

    def __init__(self) -> None:
        super().__init__(verify_s=0.01)
        self.crash = False
        self._max_batch = 4

    @property
    def max_batch(self) -> int:
        if self.crash:
            raise MemoryError("simulated")
        return self._max_batch

    @max_batch.setter
    def max_batch(self, v: int) -> None:
        self._max_batch = v


def test_a_crashed_loop_fails_everything_and_reports_not_ready() -> None:
    backend = CrashingBackend()
    engine, _ = make_engine(backend)

    async def go() -> Any:
        stream = engine.submit(PROMPT, greedy(1000))
        await stream.__anext__()
        backend.crash = True
        return await stream.collect()

    final = asyncio.run(asyncio.wait_for(go(), 30))
    assert final.finish_reason == "error" and "MemoryError" in (final.error or "")
    assert not engine.ready and engine.dead_reason is not None
    engine.shutdown(0.0)


def test_policy_changes_apply_at_the_next_step() -> None:
    policy = default_policy(max_draft_tokens=4, tpot_slo_ms=10_000.0, mode="fixed")
    engine, backend = make_engine(ScriptedBackend(verify_s=0.005), policy=policy)

    async def go() -> None:
        stream = engine.submit(PROMPT, greedy(400))
        while backend.steps < 2:
            await asyncio.sleep(0.005)
        proposed = sample(engine, mn.DRAFT_PROPOSED)
        assert proposed > 0
        assert sample(engine, mn.POLICY_MAX_DRAFT) == 3  # fixed K = 3
        off = Policy(generation=9, mode=SpecMode.off, tpot_slo_ms=100.0, tpot_budget_ms=80.0)
        engine.policy_source.set(off)
        deadline = time.monotonic() + 5
        while engine.live_policy is not off and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        before = sample(engine, mn.DRAFT_PROPOSED)
        steps = backend.steps
        while backend.steps < steps + 5:
            await asyncio.sleep(0.01)
        assert sample(engine, mn.DRAFT_PROPOSED) == before  # off: nothing drafted any more
        assert sample(engine, mn.POLICY_GENERATION) == 9
        assert sample(engine, mn.POLICY_MAX_DRAFT) == 0
        assert sample(engine, mn.POLICY_SLO) == pytest.approx(0.1)
        stream.abort()

    run(engine, go)


def test_adaptive_policy_reports_predictions_and_guard() -> None:
    # The CPU prior predicts ~0.25 s plain steps and ~0.36 s with one draft pass: a 300 ms
    # budget is feasible for plain decoding, so the guard must refuse every draft pass.
    tight = default_policy(tpot_slo_ms=300.0, max_draft_tokens=4)
    engine, _ = make_engine(ScriptedBackend(), policy=tight)

    async def go() -> Any:
        return await engine.submit(PROMPT, greedy(30)).collect()

    final = run(engine, go)
    assert final.completion_tokens == 30
    assert sample(engine, mn.POLICY_BUDGET) == pytest.approx(0.3)
    assert sample(engine, mn.SLO_INFEASIBLE) == 0.0
    assert sample(engine, mn.SLO_GUARD_REFUSALS) > 0
    assert sample(engine, mn.DRAFT_PROPOSED) == 0  # the guard refused every draft pass
    assert sample(engine, mn.STEP_PREDICTED + "_count") > 0
    assert sample(engine, mn.STEP_DURATION + "_count") > 0


def test_infeasible_budget_is_reported_and_speculation_still_runs() -> None:
    # 50 ms is below even plain decoding's predicted step: nothing can meet it, so the step is
    # flagged infeasible (the operator scales out) and the guard steps aside.
    impossible = default_policy(tpot_slo_ms=50.0, max_draft_tokens=4)
    engine, _ = make_engine(ScriptedBackend(), policy=impossible)

    async def go() -> Any:
        return await engine.submit(PROMPT, greedy(30)).collect()

    final = run(engine, go)
    assert final.completion_tokens == 30
    assert sample(engine, mn.SLO_INFEASIBLE) == 1.0
    assert sample(engine, mn.SLO_GUARD_REFUSALS) == 0
    assert sample(engine, mn.DRAFT_PROPOSED) > 0


class FlakyCodec(ByteCodec):
    """Detokenization fails once (fault injection)."""

    def __init__(self) -> None:
        self.fail = True

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.fail:
            self.fail = False
            raise UnicodeError("corrupt token")
        return super().decode(token_ids, skip_special_tokens)


def test_output_processing_error_fails_only_that_request() -> None:
    backend = ScriptedBackend()
    engine = LLMEngine(backend, FlakyCodec(), PolicySource(default_policy()))
    engine.start()

    async def go() -> tuple[Any, Any]:
        bad = await engine.submit(PROMPT, greedy(5)).collect()
        good = await engine.submit(PROMPT, greedy(5)).collect()
        return bad, good

    bad, good = run(engine, go)
    assert bad.finish_reason == "error" and "corrupt token" in (bad.error or "")
    assert good.finish_reason == "length" and good.text == DEFAULT_REPLY[:5]
    assert backend.positions == {}
