"""The HTTP server through a real uvicorn on loopback, driven by httpx and the openai client.

The backend is the scripted twin (deterministic, fault injection, slow steps on demand); one
test runs tiny random Qwen2 models through the torch backend end to end.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from adaspec import metric_names as mn
from adaspec.backends.base import SamplingParams, SeqState
from adaspec.contract import MAX_DRAFT_TOKENS_LIMIT, Policy, SpecMode
from adaspec.engine import LLMEngine
from adaspec.policy_source import PolicySource, default_policy
from adaspec.server.app import ServerState, create_app
from adaspec.server.codec import ByteCodec
from adaspec.server.scripted import DEFAULT_REPLY, ScriptedBackend

MODEL = "scripted-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_server(
    backend: Any | None, *, max_waiting: int = 8, policy: Policy | None = None
) -> Iterator[tuple[str, ServerState]]:
    """A real uvicorn server in a thread; backend None = models never loaded."""
    state = ServerState(model_name=MODEL, drain_timeout_s=1.0)
    if backend is not None:
        engine = LLMEngine(
            backend,
            backend.codec if hasattr(backend, "codec") else ByteCodec(),
            PolicySource(policy or default_policy(tpot_slo_ms=10_000.0, max_draft_tokens=4)),
            max_waiting=max_waiting,
            metrics=state.metrics,
        )
        engine.start()
        state.engine, state.codec = engine, ByteCodec()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def metric(base: str, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise AssertionError(f"{name}{labels} not exported")


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


# ----------------------------------------------------------------------------- happy paths


def test_probes_and_model_list() -> None:
    with live_server(ScriptedBackend()) as (base, _):
        assert httpx.get(f"{base}/health").json() == {"status": "ok"}
        r = httpx.get(f"{base}/ready")
        assert r.status_code == 200 and r.json()["status"] == "ready"
        models = client(base).models.list()
        assert [m.id for m in models.data] == [MODEL]


def test_openai_client_completions_and_chat() -> None:
    with live_server(ScriptedBackend()) as (base, _):
        c = client(base)
        r = c.completions.create(model=MODEL, prompt="hi", max_tokens=12, temperature=0)
        assert r.choices[0].text == DEFAULT_REPLY[:12]
        assert r.choices[0].finish_reason == "length"
        assert r.usage is not None and r.usage.completion_tokens == 12
        assert r.usage.prompt_tokens == 2

        chunks = list(
            c.completions.create(model=MODEL, prompt="hi", max_tokens=15, stream=True, seed=1)
        )
        assert "".join(ch.choices[0].text for ch in chunks) == DEFAULT_REPLY[:15]
        assert chunks[-1].choices[0].finish_reason == "length"

        msg: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
        chat = c.chat.completions.create(model=MODEL, messages=msg, max_tokens=9)
        assert chat.choices[0].message.content == DEFAULT_REPLY[:9]
        assert chat.choices[0].message.role == "assistant"

        stream = c.chat.completions.create(
            model=MODEL,
            messages=msg,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
            stop=["scripted"],
        )
        parts = list(stream)
        text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
        assert text == "Hello from the "
        finishes = [p.choices[0].finish_reason for p in parts if p.choices]
        assert finishes[-1] == "stop"
        assert parts[-1].usage is not None and parts[-1].choices == []
        rendered = ByteCodec().render_chat([{"role": "user", "content": "hello"}])
        assert parts[-1].usage.prompt_tokens == len(rendered)


def test_ignore_eos_extra_field_and_max_completion_tokens() -> None:
    with live_server(ScriptedBackend("ab", eos_at_end=True)) as (base, _):
        c = client(base)
        short = c.completions.create(model=MODEL, prompt="x", max_tokens=10)
        assert (short.choices[0].text, short.choices[0].finish_reason) == ("ab", "stop")
        long = c.completions.create(
            model=MODEL, prompt="x", max_tokens=10, extra_body={"ignore_eos": True}
        )
        assert long.choices[0].finish_reason == "length"
        assert long.usage is not None and long.usage.completion_tokens == 10
        chat = c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            max_completion_tokens=1,
        )
        assert chat.choices[0].message.content == "a"


def test_metrics_exposition_tracks_requests() -> None:
    with live_server(ScriptedBackend()) as (base, _):
        c = client(base)
        for n in (5, 7, 9):
            c.completions.create(model=MODEL, prompt="hi", max_tokens=n, temperature=0)
        assert metric(base, mn.REQUEST_TPOT + "_count") == 3
        assert metric(base, mn.REQUESTS_TOTAL, outcome="length") == 3
        assert metric(base, mn.GENERATED_TOKENS) == 21
        assert metric(base, mn.REQUEST_TTFT + "_count") == 3
        assert metric(base, mn.DRAFT_VERIFIED) >= metric(base, mn.DRAFT_ACCEPTED) > 0
        assert metric(base, mn.POLICY_MAX_DRAFT) == 4
        assert metric(base, mn.REQUESTS_RUNNING) == 0


# ----------------------------------------------------------------------------- bad input


MALFORMED: list[tuple[str, Any, str | None]] = [
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": 7}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 3}, "logprobs"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": "x", "stream": "yes please"}, "stream"),
    ("/v1/completions", {"prompt": "x", "seed": "abc"}, "seed"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
    ("/v1/completions", [1, 2, 3], None),
    ("/v1/completions", {"prompt": "x", "max_draft_tokens": -1}, "max_draft_tokens"),
    (
        "/v1/completions",
        {"prompt": "x", "max_draft_tokens": MAX_DRAFT_TOKENS_LIMIT + 1},
        "max_draft_tokens",
    ),
    ("/v1/completions", {"prompt": "x", "max_draft_tokens": "3"}, "max_draft_tokens"),
    ("/v1/completions", {"prompt": "x", "max_draft_tokens": True}, "max_draft_tokens"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_draft_tokens": 2.5},
        "max_draft_tokens",
    ),
]


@pytest.mark.parametrize(("path", "body", "param"), MALFORMED)
def test_malformed_requests_get_400_naming_the_field(
    path: str, body: Any, param: str | None
) -> None:
    with live_server(ScriptedBackend()) as (base, _):
        r = httpx.post(f"{base}{path}", json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error"
        assert err["param"] == param
        if param:
            assert param in err["message"]


def test_invalid_json_unknown_model_and_context_overflow() -> None:
    with live_server(ScriptedBackend(max_model_len=32)) as (base, _):
        r = httpx.post(
            f"{base}/v1/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]

        r = httpx.post(f"{base}/v1/completions", json={"model": "gpt-9", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"

        r = httpx.post(f"{base}/v1/completions", json={"prompt": "x" * 40})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert "context length is 32" in r.json()["error"]["message"]

        r = httpx.post(f"{base}/v1/completions", json={"prompt": "abc", "max_tokens": 30})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"

        r = httpx.post(
            f"{base}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 99},
        )
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "max_completion_tokens"

        with pytest.raises(openai.BadRequestError, match="n=1"):
            client(base).completions.create(model=MODEL, prompt="x", n=3)

        r = httpx.get(f"{base}/v1/nothing")
        assert r.status_code == 404 and "error" in r.json()


class ParamsRecorder(ScriptedBackend):
    """The scripted backend, keeping the SamplingParams of every request it admits."""

    def __init__(self) -> None:
        super().__init__()
        self.params: list[SamplingParams] = []

    def add(self, seq: SeqState) -> int:
        self.params.append(seq.params)
        return super().add(seq)


def test_max_draft_tokens_reaches_the_backend() -> None:
    """The extra field `max_draft_tokens` (completions and chat) becomes
    SamplingParams.max_draft; absent, it stays None (only the Policy's cap applies)."""
    backend = ParamsRecorder()
    with live_server(backend) as (base, _):
        c = client(base)
        c.completions.create(
            model=MODEL, prompt="hi", max_tokens=3, extra_body={"max_draft_tokens": 2}
        )
        c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            extra_body={"max_draft_tokens": 0},
        )
        c.completions.create(model=MODEL, prompt="hi", max_tokens=3)
        c.completions.create(
            model=MODEL,
            prompt="hi",
            max_tokens=3,
            extra_body={"max_draft_tokens": MAX_DRAFT_TOKENS_LIMIT},
        )
    assert [p.max_draft for p in backend.params] == [2, 0, None, MAX_DRAFT_TOKENS_LIMIT]


# ----------------------------------------------------------------------------- overload, faults


def test_overload_answers_429_with_a_clear_body() -> None:
    backend = ScriptedBackend(max_batch=1, verify_s=0.02)
    with live_server(backend, max_waiting=1) as (base, state):
        assert state.engine is not None
        engine = state.engine

        async def go() -> httpx.Response:
            async with httpx.AsyncClient(base_url=base, timeout=30) as ac:
                body = {"prompt": "x", "max_tokens": 60}
                first = asyncio.create_task(ac.post("/v1/completions", json=body))
                while engine.counts()[0] < 1:
                    await asyncio.sleep(0.01)
                second = asyncio.create_task(ac.post("/v1/completions", json=body))
                while engine.counts()[1] < 1:
                    await asyncio.sleep(0.01)
                third = await ac.post("/v1/completions", json=body)
                assert (await first).status_code == 200
                assert (await second).status_code == 200
                return third

        r = asyncio.run(asyncio.wait_for(go(), 60))
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and "overloaded" in err["message"]
        assert metric(base, mn.REQUESTS_TOTAL, outcome="rejected") == 1


def test_stream_disconnect_aborts_and_frees_the_slot() -> None:
    backend = ScriptedBackend(verify_s=0.02)
    with live_server(backend) as (base, _):
        body = {"prompt": "x", "max_tokens": 450, "stream": True, "ignore_eos": True}
        with (
            httpx.Client(timeout=10) as c,
            c.stream("POST", f"{base}/v1/completions", json=body) as r,
        ):
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["text"]
            assert len(backend.positions) == 1
        # the connection is closed: the engine must drop the request and free its slot
        assert wait_for(lambda: backend.positions == {}), backend.positions
        assert wait_for(lambda: metric(base, mn.REQUESTS_TOTAL, outcome="abort") == 1)
        assert metric(base, mn.REQUESTS_RUNNING) == 0


def test_non_stream_disconnect_aborts_and_frees_the_slot() -> None:
    backend = ScriptedBackend(verify_s=0.02)
    with live_server(backend) as (base, _):
        body = {"prompt": "x", "max_tokens": 450, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/completions", json=body, timeout=0.5)
        assert wait_for(lambda: backend.positions == {}), backend.positions
        assert wait_for(lambda: metric(base, mn.REQUESTS_TOTAL, outcome="abort") == 1)


def test_engine_error_mid_stream_reaches_the_client() -> None:
    backend = ScriptedBackend(verify_s=0.02)
    with live_server(backend) as (base, _):
        c = client(base)
        stream = c.completions.create(model=MODEL, prompt="x", max_tokens=500, stream=True)
        got = []
        with pytest.raises(openai.APIError, match="boom"):
            for chunk in stream:
                got.append(chunk.choices[0].text)
                if len(got) == 1:
                    backend.fail_next_step = RuntimeError("boom")
        assert got  # some text arrived before the failure
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 4})
        assert r.status_code == 200  # the server keeps serving
        backend.fail_next_step = RuntimeError("kaboom")
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 40})
        assert r.status_code == 500 and "kaboom" in r.json()["error"]["message"]
        assert metric(base, mn.REQUESTS_TOTAL, outcome="error") == 2


def test_not_ready_answers_503_but_is_alive() -> None:
    with live_server(None) as (base, _):
        assert httpx.get(f"{base}/health").status_code == 200
        r = httpx.get(f"{base}/ready")
        assert r.status_code == 503 and "loading" in r.json()["reason"]
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"
        assert httpx.get(f"{base}/metrics").status_code == 200


def test_shutdown_engine_answers_503() -> None:
    with live_server(ScriptedBackend()) as (base, state):
        assert state.engine is not None
        state.engine.shutdown(drain_timeout_s=0.0)
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503
        assert httpx.get(f"{base}/ready").status_code == 503


# ----------------------------------------------------------------------------- real models


def test_tiny_torch_models_are_lossless_through_http() -> None:
    """Greedy text is identical under off, fixed and adaptive policies (fp32 tiny Qwen2 pair)."""
    import torch

    from adaspec.backends.torch.backend import TorchBackend
    from adaspec.backends.torch.tiny import noisy_copy, tiny_model

    torch.manual_seed(0)
    target = tiny_model(vocab_size=ByteCodec.VOCAB, seed=3)
    draft = noisy_copy(target, 0.05, seed=4)
    backend = TorchBackend(
        target, draft, max_batch=4, max_model_len=256, dtype=torch.float32, seed=0
    )
    with live_server(backend) as (base, state):
        assert state.engine is not None
        c = client(base)
        texts: dict[str, str] = {}
        for mode in ("off", "fixed", "adaptive"):
            gen = {"off": 1, "fixed": 2, "adaptive": 3}[mode]
            state.engine.policy_source.set(
                Policy(
                    generation=gen,
                    mode=SpecMode(mode),
                    tpot_slo_ms=10_000.0,
                    tpot_budget_ms=10_000.0,
                    max_draft_tokens=4,
                )
            )
            r = c.completions.create(
                model=MODEL,
                prompt="def f(x):",
                max_tokens=24,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            assert r.usage is not None and r.usage.completion_tokens == 24
            texts[mode] = r.choices[0].text
            assert metric(base, mn.POLICY_GENERATION) == gen
        assert texts["off"] == texts["fixed"] == texts["adaptive"]
        assert metric(base, mn.DRAFT_ACCEPTED) > 0  # the noisy draft does agree sometimes
        assert backend.running == 0


def test_tiny_torch_models_honour_max_draft_tokens_through_http() -> None:
    """Fixed K=4 policy; each request's `max_draft_tokens` caps its verified draft tokens per
    step (the spec-length histogram), 0 never speculates, and greedy text never changes."""
    import torch

    from adaspec.backends.torch.backend import TorchBackend
    from adaspec.backends.torch.tiny import noisy_copy, tiny_model

    target = tiny_model(vocab_size=ByteCodec.VOCAB, seed=3)
    backend = TorchBackend(
        target,
        noisy_copy(target, 0.05, seed=4),
        max_batch=2,
        max_model_len=256,
        dtype=torch.float32,
        seed=0,
    )
    fixed = Policy(
        generation=1,
        mode=SpecMode.fixed,
        tpot_slo_ms=10_000.0,
        tpot_budget_ms=10_000.0,
        max_draft_tokens=4,
        fixed_draft_tokens=4,
    )
    with live_server(backend, policy=fixed) as (base, _):
        c = client(base)

        def spec_hist() -> dict[str, float]:
            out = {"count": metric(base, mn.SPEC_LENGTH + "_count")}
            for k in range(5):
                out[str(k)] = metric(base, mn.SPEC_LENGTH + "_bucket", le=f"{k}.0")
            out["proposed"] = metric(base, mn.DRAFT_PROPOSED)
            return out

        texts: dict[int | None, str] = {}
        for cap in (None, 0, 1, 2):
            before = spec_hist()
            extra: dict[str, Any] = {"ignore_eos": True}
            if cap is not None:
                extra["max_draft_tokens"] = cap
            r = c.completions.create(
                model=MODEL, prompt="def f(x):", max_tokens=20, temperature=0, extra_body=extra
            )
            texts[cap] = r.choices[0].text
            after = spec_hist()
            d = {k: after[k] - before[k] for k in after}
            assert d["count"] > 0
            if cap is None:
                assert d["3"] < d["count"]  # the uncapped request verifies 4 drafts per step
            elif cap == 0:
                assert d["proposed"] == 0 and d["0"] == d["count"]
            else:
                assert d[str(cap)] == d["count"]  # never more than the cap...
                assert d[str(cap - 1)] < d["count"]  # ...and the cap itself is reached
        assert texts[0] == texts[1] == texts[2] == texts[None]
        assert backend.running == 0
