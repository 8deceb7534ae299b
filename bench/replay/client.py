"""Replay a trace against an OpenAI-compatible server with the official `openai` client.

Each request is sent at its (scaled) arrival time as a streaming /v1/completions call with
temperature 0, `max_tokens` = its output length and `ignore_eos` (so every policy generates
exactly the same tokens), and `stream_options.include_usage` (the server's token counts).
Per request we record arrival, first token, finish (monotonic clock, relative to the replay's
start) and tokens; `adaspec.sim.results.summarize` turns them into TTFT/TPOT/goodput, exactly as
for a simulated run.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

import httpx
from openai import AsyncOpenAI

from adaspec.sim.results import RequestRecord
from adaspec.sim.traces import Trace

from .prompts import PromptBuilder


@dataclass(frozen=True)
class ReplayRequestResult:
    record: RequestRecord | None
    """None when the request failed (counted as an SLO miss)."""
    prompt_tokens: int | None
    error: str | None = None


async def _one(
    client: AsyncOpenAI,
    model: str,
    index: int,
    prompt: str | list[int],
    prompt_len: int,
    max_tokens: int,
    t0: float,
) -> ReplayRequestResult:
    sent = time.monotonic() - t0
    first: float | None = None
    chunks = 0
    usage_out: int | None = None
    usage_in: int | None = None
    try:
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                chunks += 1
                if first is None:
                    first = time.monotonic() - t0
            if chunk.usage is not None:
                usage_out = chunk.usage.completion_tokens
                usage_in = chunk.usage.prompt_tokens
    except Exception as e:  # a failed request is a result, not a crash of the replay
        return ReplayRequestResult(None, None, f"{type(e).__name__}: {e}")
    end = time.monotonic() - t0
    if first is None:
        return ReplayRequestResult(None, usage_in, "no token received")
    tokens = usage_out if usage_out is not None else chunks
    rec = RequestRecord(
        index=index,
        arrival_s=sent,
        first_token_s=first,
        finish_s=end,
        prompt_len=prompt_len if usage_in is None else usage_in,
        output_len=max(tokens, 1),
    )
    return ReplayRequestResult(rec, usage_in)


async def replay(
    base_url: str,
    trace: Trace,
    prompts: PromptBuilder,
    model: str | None = None,
    index_offset: int = 0,
    timeout_s: float = 600.0,
    token_ids: bool = True,
) -> list[ReplayRequestResult]:
    """Send every request of `trace` at its arrival time; wait for all of them.

    `token_ids` sends the prompt as token ids (exact lengths; needs the server's tokenizer),
    otherwise as decoded text. `model` None asks the server (/v1/models) for its model id."""
    client = AsyncOpenAI(base_url=base_url, api_key="unused", timeout=timeout_s, max_retries=0)
    if model is None:
        model = (await client.models.list()).data[0].id
    make = prompts.token_ids if token_ids else prompts.prompt
    texts = [make(index_offset + i, int(p)) for i, p in enumerate(trace.prompt_len.tolist())]
    t0 = time.monotonic()
    tasks = []
    for i, (arr, p, o) in enumerate(trace.rows()):
        delay = arr - (time.monotonic() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(client, model, index_offset + i, texts[i], p, o, t0)))
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        await client.close()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum of each metric's samples over labels (enough for counters)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


async def scrape_metrics(metrics_url: str) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=10.0) as c:
        r = await c.get(metrics_url)
        r.raise_for_status()
        return parse_prometheus(r.text)
