"""The real model pair behind `adaspec serve` (a real process), driven by the official client."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import openai
import pytest

from adaspec.server.launch import ServerProcess

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = float(os.environ.get("SPECSERVE_READY_TIMEOUT", "900"))


POLICY = {
    "generation": 1,
    "mode": "adaptive",
    "tpotSloMs": 2000.0,
    "tpotBudgetMs": 2000.0,
    "maxDraftTokens": 4,
    "reason": "integration test",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "policy.json").write_text(json.dumps(POLICY))
    args = [
        "--max-batch",
        "2",
        "--max-model-len",
        "1024",
        "--policy-file",
        str(tmp / "policy.json"),
    ]
    with ServerProcess(args, tmp / "server.log", ready_timeout_s=READY_TIMEOUT_S) as srv:
        yield srv.base


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=600)


def model_id(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_model_list_names_the_target(client: openai.OpenAI) -> None:
    assert model_id(client) == "qwen2.5-coder-1.5b-instruct"


def test_completion_non_stream_and_stream(client: openai.OpenAI) -> None:
    model = model_id(client)
    r = client.completions.create(
        model=model, prompt="def fibonacci(n):", max_tokens=10, temperature=0
    )
    choice = r.choices[0]
    assert choice.text.strip()
    assert r.usage is not None and r.usage.prompt_tokens > 0
    assert r.usage.completion_tokens == 10 or choice.finish_reason == "stop"

    chunks = list(
        client.completions.create(
            model=model, prompt="import numpy as", max_tokens=6, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.startswith(" np")  # the model's obvious greedy continuation
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_chat_non_stream_answers(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=model_id(client),
        messages=[{"role": "user", "content": "What is 2+2? Reply with just the number."}],
        max_tokens=8,
        temperature=0,
    )
    assert "4" in (r.choices[0].message.content or "")
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=model_id(client),
        messages=[{"role": "user", "content": "Write a Python hello world program."}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals: list[float] = []
    content: list[str] = []
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                content.append(c.delta.content)
                arrivals.append(time.monotonic())
    assert len(content) > 1  # streamed incrementally, not one blob
    assert arrivals[-1] > arrivals[0]
    assert usage is not None and usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
