"""`adaspec serve` with the real pair as a real process: metrics, policy hot reload, bad input,
overload and client disconnect. One server with one running slot and one waiting slot, so
overload is reachable with three requests."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adaspec import metric_names as mn
from adaspec.server.launch import ServerProcess

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = float(os.environ.get("SPECSERVE_READY_TIMEOUT", "900"))


def policy(generation: int, **kw: Any) -> str:
    doc: dict[str, Any] = {
        "generation": generation,
        "mode": "adaptive",
        "tpotSloMs": 2000.0,
        "tpotBudgetMs": 2000.0,
        "maxDraftTokens": 4,
        "reason": f"test generation {generation}",
    }
    doc.update(kw)
    return json.dumps(doc)


@dataclass
class Server:
    base: str
    policy_file: Path
    proc: ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve")
    pf = tmp / "policy.json"
    pf.write_text(policy(1))
    args = [
        "--max-batch",
        "1",
        "--max-waiting",
        "1",
        "--max-model-len",
        "1024",
        "--policy-file",
        str(pf),
    ]
    with ServerProcess(args, tmp / "server.log", ready_timeout_s=READY_TIMEOUT_S) as srv:
        yield Server(srv.base, pf, srv)


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def value(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **lb: str) -> float:
    return m.get((name, tuple(sorted(lb.items()))), 0.0)


def wait_for(cond: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return cond()


def test_probes(server: Server) -> None:
    assert httpx.get(f"{server.base}/health").status_code == 200
    assert httpx.get(f"{server.base}/ready").json()["status"] == "ready"


def test_metrics_move_with_requests(server: Server) -> None:
    before = scrape(server.base)
    c = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0, timeout=600)
    model = c.models.list().data[0].id
    tokens = 0
    for prompt in ("def add(a, b):", "class Stack:"):
        r = c.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert r.usage is not None and r.usage.completion_tokens == 8
        tokens += r.usage.completion_tokens
    after = scrape(server.base)

    def delta(name: str, **lb: str) -> float:
        return value(after, name, **lb) - value(before, name, **lb)

    assert delta(mn.REQUESTS_TOTAL + "", outcome="length") == 2
    finished = value(after, mn.REQUESTS_TOTAL, outcome="length") + value(
        after, mn.REQUESTS_TOTAL, outcome="stop"
    )
    assert value(after, mn.REQUEST_TPOT + "_count") == finished
    assert delta(mn.REQUEST_TTFT + "_count") == 2
    assert delta(mn.GENERATED_TOKENS) == tokens
    assert delta(mn.TARGET_FORWARDS) >= 2  # at least the two prefills
    # speculation accounting is consistent
    assert value(after, mn.DRAFT_PROPOSED) >= value(after, mn.DRAFT_VERIFIED)
    assert value(after, mn.DRAFT_VERIFIED) >= value(after, mn.DRAFT_ACCEPTED)
    # every step emits ≥ 1 token per sequence: tokens after prefill ≥ step forwards
    assert delta(mn.GENERATED_TOKENS) - 2 >= delta(mn.TARGET_FORWARDS) - 2
    assert value(after, mn.STEP_DURATION + "_count") > 0
    assert value(after, mn.POLICY_GENERATION) >= 1


def test_max_draft_tokens_caps_one_request(server: Server) -> None:
    """The extra field `max_draft_tokens` through the official client (`extra_body`): the one
    running request's verified drafts per step (spec-length histogram) stay within its cap,
    0 never speculates, and greedy text is the same with or without a cap."""
    c = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0, timeout=600)
    model = c.models.list().data[0].id

    def run(cap: int | None) -> tuple[str, dict[str, float]]:
        extra: dict[str, Any] = {"ignore_eos": True}
        if cap is not None:
            extra["max_draft_tokens"] = cap
        before = scrape(server.base)
        r = c.completions.create(
            model=model, prompt="def add(a, b):", max_tokens=12, temperature=0, extra_body=extra
        )
        after = scrape(server.base)
        names = {
            "count": (mn.SPEC_LENGTH + "_count", {}),
            "le0": (mn.SPEC_LENGTH + "_bucket", {"le": "0.0"}),
            "le1": (mn.SPEC_LENGTH + "_bucket", {"le": "1.0"}),
            "proposed": (mn.DRAFT_PROPOSED, {}),
            "verified": (mn.DRAFT_VERIFIED, {}),
        }
        d = {k: value(after, n, **lb) - value(before, n, **lb) for k, (n, lb) in names.items()}
        return r.choices[0].text, d

    free_text, free = run(None)
    zero_text, zero = run(0)
    one_text, one = run(1)
    assert zero_text == free_text == one_text
    assert free["verified"] > 0  # uncapped, the real pair does speculate here
    assert zero["count"] > 0 and zero["le0"] == zero["count"] and zero["proposed"] == 0
    assert one["count"] > 0 and one["le1"] == one["count"]
    assert one["le0"] < one["count"]  # capped at 1, it still drafts

    r = httpx.post(
        f"{server.base}/v1/completions", json={"prompt": "x", "max_draft_tokens": -1}, timeout=60
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_draft_tokens"


def test_policy_file_hot_reload(server: Server) -> None:
    pid = server.proc.proc.pid if server.proc.proc else None
    errors0 = value(scrape(server.base), mn.POLICY_RELOAD_ERRORS)

    server.policy_file.write_text(policy(42, maxDraftTokens=3, tpotBudgetMs=1500.0))
    assert wait_for(lambda: value(scrape(server.base), mn.POLICY_GENERATION) == 42)
    m = scrape(server.base)
    assert value(m, mn.POLICY_MAX_DRAFT) == 3
    assert value(m, mn.POLICY_BUDGET) == pytest.approx(1.5)
    assert value(m, mn.POLICY_INVALID) == 0

    server.policy_file.write_text(policy(43, maxDraftTokens=99))  # out of range: rejected
    assert wait_for(lambda: value(scrape(server.base), mn.POLICY_INVALID) == 1)
    m = scrape(server.base)
    assert value(m, mn.POLICY_RELOAD_ERRORS) == errors0 + 1
    assert value(m, mn.POLICY_GENERATION) == 42  # last good policy kept
    assert value(m, mn.POLICY_MAX_DRAFT) == 3
    assert "maxDraftTokens" in server.proc.log_tail(20_000)  # the log line names the field

    server.policy_file.write_text(policy(44))
    assert wait_for(lambda: value(scrape(server.base), mn.POLICY_GENERATION) == 44)
    assert value(scrape(server.base), mn.POLICY_INVALID) == 0
    assert server.proc.proc is not None and server.proc.proc.pid == pid  # no restart


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages.0.role"),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, "max_tokens"),
        ("/v1/completions", {"prompt": "word " * 1100}, "prompt"),
    ],
)
def test_malformed_requests_get_400(server: Server, path: str, body: Any, param: str) -> None:
    r = httpx.post(f"{server.base}{path}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_overload_429_and_disconnect_frees_the_slot(server: Server) -> None:
    base = server.base

    async def ready_counts(ac: httpx.AsyncClient) -> tuple[int, int]:
        j = (await ac.get("/ready")).json()
        return int(j["running"]), int(j["waiting"])

    async def go() -> tuple[int, str, int]:
        async with httpx.AsyncClient(base_url=base, timeout=600) as ac:
            long_body = {"prompt": "def main():", "max_tokens": 500, "stream": True}
            long_body["ignore_eos"] = True
            async with ac.stream("POST", "/v1/completions", json=long_body) as first:
                assert first.status_code == 200
                async for line in first.aiter_lines():
                    if line.startswith("data: "):
                        break  # running and streaming
                queued = asyncio.create_task(
                    ac.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 2})
                )
                while (await ready_counts(ac))[1] < 1:
                    await asyncio.sleep(0.1)
                third = await ac.post("/v1/completions", json={"prompt": "y", "max_tokens": 2})
            # leaving the block closed the stream: the engine aborts it and admits `queued`
            second = await queued
            return third.status_code, third.text, second.status_code

    status, text, second_status = asyncio.run(asyncio.wait_for(go(), 900))
    assert status == 429, text
    assert "overloaded" in json.loads(text)["error"]["message"]
    assert second_status == 200
    m = scrape(base)
    assert value(m, mn.REQUESTS_TOTAL, outcome="rejected") >= 1
    assert value(m, mn.REQUESTS_TOTAL, outcome="abort") >= 1
    assert wait_for(lambda: value(scrape(base), mn.REQUESTS_RUNNING) == 0)
