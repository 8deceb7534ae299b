"""`adaspec serve --step-log` with the real Qwen2.5-Coder 1.5B/0.5B pair as a real process: the
step log agrees with the server's own Prometheus counters and with what the clients got, and its
timings nest (draft passes inside drafting, drafting inside the step).

Two concurrent requests under fixed K = 3 (deep drafting, the case the simulator misses), then a
policy reload to adaptive and one more request, so records carry both policies' generations.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adaspec import metric_names as mn
from adaspec.server.launch import ServerProcess
from adaspec.sim.step_log import read_step_log
from adaspec.step_log import StepRecord

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = float(os.environ.get("SPECSERVE_READY_TIMEOUT", "900"))
MAX_TOKENS = 16
K = 3


def records(path: Path | str) -> list[StepRecord]:
    """The validated records of one step log (the reader the analysis uses)."""
    return [s.record for s in read_step_log(path).steps]


EPS = 1e-6


def policy(generation: int, mode: str) -> str:
    return json.dumps(
        {
            "generation": generation,
            "mode": mode,
            "tpotSloMs": 5000.0,
            "tpotBudgetMs": 5000.0,
            "maxDraftTokens": 4,
            "fixedDraftTokens": K,
        }
    )


def scrape(base: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for s in fam.samples:
            if not s.labels:
                out[s.name] = float(s.value)
    return out


def complete(base: str, prompt: str) -> dict[str, int]:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return dict(r.json()["usage"])


def test_step_log_agrees_with_metrics_and_clients(tmp_path: Path) -> None:
    pf = tmp_path / "policy.json"
    pf.write_text(policy(1, "fixed"))
    path = tmp_path / "steps.jsonl"
    args = ["--max-batch", "2", "--max-model-len", "1024", "--policy-file", str(pf)]
    args += ["--step-log", str(path)]
    prompts = [
        "def fibonacci(n):\n    ",
        "# Sort a list of numbers in Python\nnumbers = [5, 3, 8]\n",
        "class Stack:\n    def __init__(self):\n        ",
    ]
    usages: list[dict[str, int]] = []
    with ServerProcess(args, tmp_path / "server.log", ready_timeout_s=READY_TIMEOUT_S) as srv:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            usages += pool.map(lambda p: complete(srv.base, p), prompts[:2])
        pf.write_text(policy(2, "adaptive"))
        deadline = time.monotonic() + 30
        while scrape(srv.base).get(mn.POLICY_GENERATION) != 2:
            assert time.monotonic() < deadline, "policy generation 2 was not applied"
            time.sleep(0.2)
        usages.append(complete(srv.base, prompts[2]))
        m = scrape(srv.base)
        assert srv.stop() in (0, -signal.SIGTERM)
    recs = records(path)
    assert path.read_text().endswith("\n")
    assert len(recs) == m[mn.STEP_DURATION + "_count"] > 0

    # the log and the server's counters saw the same steps
    assert sum(sum(r.verified) for r in recs) == m[mn.DRAFT_VERIFIED]
    assert sum(r.proposed for r in recs) == m[mn.DRAFT_PROPOSED]
    assert sum(r.accepted for r in recs) == m[mn.DRAFT_ACCEPTED]
    assert sum(r.wall_s for r in recs) == pytest.approx(m[mn.STEP_DURATION + "_sum"], rel=1e-6)
    # chunked prefill: every prompt token and every first token went through a step
    assert sum(r.prefill_tokens for r in recs) == sum(u["prompt_tokens"] for u in usages)
    got = sum(u["completion_tokens"] for u in usages)
    assert got == MAX_TOKENS * len(prompts)
    emitted = sum(r.emitted for r in recs)
    assert got <= emitted <= got + K * len(prompts)  # the last step may run past max_tokens

    assert {(r.policy, r.generation) for r in recs} == {("fixed-3", 1), ("adaspec", 2)}
    assert [r.step for r in recs] == list(range(1, len(recs) + 1))
    for r in recs:
        assert len(r.draft_rows) == len(r.draft_ctx) == len(r.draft_pass_s)
        assert len(r.context_lens) == len(r.verified) == r.batch
        assert sum(r.draft_pass_s) <= r.draft_s + EPS and r.draft_s <= r.wall_s + EPS
        assert sum(r.draft_pass_s) + r.policy_s + r.verify_s <= r.wall_s + EPS
        assert r.accepted <= sum(r.verified) <= r.proposed == sum(r.draft_rows)
        if r.policy == "fixed-3" and r.batch:
            assert r.draft_rows == [r.batch] * K
            assert r.draft_ctx == [sum(r.context_lens) + j * r.batch for j in range(K)]
    decoding = [r for r in recs if r.batch and r.draft_rows]
    assert decoding, "no step drafted"
    example = max(decoding, key=lambda r: len(r.draft_rows))
    print("example record:", example.model_dump_json())
