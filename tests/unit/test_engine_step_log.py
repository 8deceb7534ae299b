"""The engine's per-step log (`adaspec serve --step-log`): records from the real torch backend
(tiny fp32 Qwen2 pair) are consistent with what the backend did and with each other; the
scripted backend writes empty per-pass detail; a failing log never stops the engine; the flag's
errors; a real scripted server and the replay benchmark's `real_runs` write their logs."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from adaspec.backends.base import PrefillChunks, SamplingParams, SeqState, StepResult, StepStats
from adaspec.backends.torch import TorchBackend
from adaspec.backends.torch.tiny import noisy_copy, tiny_model
from adaspec.contract import Policy, SpecMode
from adaspec.engine import LLMEngine, RequestOutput
from adaspec.metrics import EngineMetrics
from adaspec.policy.base import SpecPolicy
from adaspec.policy_source import PolicySource, default_policy
from adaspec.server import cli as serve_cli
from adaspec.server.launch import ServerProcess
from adaspec.server.scripted import ScriptedBackend
from adaspec.sim.step_log import read_step_log
from adaspec.sim.traces import Trace
from adaspec.step_log import StepLog, StepRecord

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from replay.prompts import PromptBuilder, WordTokenizer, load_prompt_set  # noqa: E402
from replay.runs import StepLogIndex, real_runs  # noqa: E402

EPS = 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair() -> tuple[Any, Any]:
    target = tiny_model("qwen2", seed=0)
    return target, noisy_copy(target, 0.1, seed=7)


class TokenCodec:
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{t}>" for t in token_ids)


class CountingBackend(TorchBackend):
    """The real torch backend; keeps every step's stats and how many tokens it returned."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.stats: list[StepStats] = []
        self.returned: list[int] = []

    def step(
        self,
        seqs: list[SeqState],
        policy: SpecPolicy,
        max_draft: int,
        budget_s: float | None,
        prefill: PrefillChunks | None = None,
    ) -> StepResult:
        res = super().step(seqs, policy, max_draft, budget_s, prefill)
        self.stats.append(res.stats)
        self.returned.append(sum(len(t) for t in res.new_tokens.values()))
        return res


def records(path: Path | str) -> list[StepRecord]:
    """The validated records of one step log (the reader the analysis uses)."""
    return [s.record for s in read_step_log(path).steps]


def torch_engine(
    pair: tuple[Any, Any], policy: Policy, log_path: Path
) -> tuple[LLMEngine, CountingBackend, StepLog]:
    backend = CountingBackend(pair[0], pair[1], max_batch=2, max_model_len=128, dtype=torch.float32)
    step_log = StepLog.open(log_path)
    engine = LLMEngine(
        backend,
        TokenCodec(),
        PolicySource(policy),
        metrics=EngineMetrics(),
        prefill_chunk_tokens=16,
        prefill_min_chunk=4,
        step_log=step_log,
    )
    engine.start()
    return engine, backend, step_log


def prompt(n: int, mul: int) -> list[int]:
    return [(mul * i + 3) % 90 + 3 for i in range(n)]


def check_record(r: StepRecord) -> None:
    """What every record must satisfy on its own (torch backend)."""
    assert r.v == 1
    passes = len(r.draft_rows)
    assert len(r.draft_ctx) == len(r.draft_pass_s) == passes
    assert len(r.context_lens) == len(r.verified) == r.batch
    assert all(0 < n <= r.batch for n in r.draft_rows)
    assert r.draft_rows == sorted(r.draft_rows, reverse=True)  # rows only stop drafting
    for j, (n, c) in enumerate(zip(r.draft_rows, r.draft_ctx, strict=True)):
        lo, hi = sorted(r.context_lens)[:n], sorted(r.context_lens)[-n:]
        assert sum(lo) + j * n <= c <= sum(hi) + j * n
    assert r.proposed == sum(r.draft_rows)
    assert r.accepted <= sum(r.verified) <= r.proposed
    assert all(0 <= v <= passes for v in r.verified)
    assert all(t > 0 for t in r.draft_pass_s)
    assert sum(r.draft_pass_s) <= r.draft_s + EPS
    assert r.draft_s <= r.wall_s + EPS
    # passes, verification and the policy's calls are disjoint intervals of the step
    assert sum(r.draft_pass_s) + r.policy_s + r.verify_s <= r.wall_s + EPS
    assert r.policy_s >= 0.0 and r.verify_s > 0.0
    assert (r.prefill_rows > 0) == (r.prefill_tokens > 0) == (r.prefill_extra_pred_s > 0)
    assert r.prefill_rows <= r.prefill_tokens and r.prefill_ctx_work >= r.prefill_tokens
    assert r.emitted >= r.batch  # each decoding row emits >= 1 token


def check_chain(recs: list[StepRecord]) -> None:
    assert [r.step for r in recs] == list(range(1, len(recs) + 1))
    assert recs[0].gap_s is None
    for prev, r in itertools.pairwise(recs):
        assert r.gap_s is not None and r.gap_s >= 0.0
        assert r.t_start == pytest.approx(prev.t_start + prev.wall_s + r.gap_s, abs=1e-9)


def test_torch_records_match_the_backend_and_the_prompts(
    pair: tuple[Any, Any], tmp_path: Path
) -> None:
    policy = default_policy("fixed", tpot_slo_ms=10_000.0, max_draft_tokens=4, fixed_draft_tokens=3)
    path = tmp_path / "steps.jsonl"
    engine, backend, step_log = torch_engine(pair, policy, path)
    prompts = [prompt(20, 7), prompt(45, 11)]

    async def go() -> list[list[RequestOutput]]:
        async def one(p: list[int], n: int) -> list[RequestOutput]:
            params = SamplingParams(max_tokens=n, ignore_eos=True)
            return [o async for o in engine.submit(p, params)]

        return list(await asyncio.gather(one(prompts[0], 12), one(prompts[1], 10)))

    try:
        outs = asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        engine.shutdown(drain_timeout_s=1.0)
    assert step_log.closed  # the engine closed it when its loop exited
    assert [o[-1].completion_tokens for o in outs] == [12, 10]
    recs = records(path)
    assert len(recs) == len(backend.stats) == engine.steps > 0
    check_chain(recs)
    for r, st, got in zip(recs, backend.stats, backend.returned, strict=True):
        check_record(r)
        assert (r.policy, r.generation) == ("fixed-3", 0)
        assert r.emitted == got
        assert (r.batch, len(r.draft_rows), r.proposed) == (st.batch, st.draft_passes, st.proposed)
        assert (sum(r.verified), r.accepted) == (st.verified, st.accepted)
        assert r.prefill_tokens == st.prefill_tokens
        if r.batch:  # fixed K: every row drafts 3 tokens (the context limit is far)
            assert r.draft_rows == [r.batch] * 3
            assert r.draft_ctx == [sum(r.context_lens) + j * r.batch for j in range(3)]
    # every prompt token rode along with some step; a prompt's attention work does not
    # depend on how it was cut into chunks: Σ chunk_ctx_work = P(P+1)/2
    assert sum(r.prefill_tokens for r in recs) == 20 + 45
    assert sum(r.prefill_ctx_work for r in recs) == pytest.approx(20 * 21 / 2 + 45 * 46 / 2)
    assert sum(r.emitted for r in recs) >= 12 + 10  # the engine truncates at max_tokens


def test_torch_context_lengths_follow_the_emitted_tokens_and_policy_changes(
    pair: tuple[Any, Any], tmp_path: Path
) -> None:
    path = tmp_path / "steps.jsonl"
    engine, _, _ = torch_engine(pair, default_policy(tpot_slo_ms=10_000.0), path)
    off = Policy(generation=5, mode=SpecMode.off, tpot_slo_ms=10_000.0, tpot_budget_ms=10_000.0)

    async def go() -> list[RequestOutput]:
        stream = engine.submit(prompt(20, 7), SamplingParams(max_tokens=60, ignore_eos=True))
        outs = []
        async for o in stream:
            outs.append(o)
            if engine.steps >= 6 and engine.live_policy is not off:
                engine.policy_source.set(off)
        return outs

    try:
        outs = asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        engine.shutdown(drain_timeout_s=1.0)
    assert outs[-1].completion_tokens == 60
    recs = records(path)
    check_chain(recs)
    for r in recs:
        check_record(r)
    decoding = [r for r in recs if r.batch]
    # one request: its target context starts at the prompt and grows by what each step emitted
    assert decoding[0].context_lens == [20]
    for prev, r in itertools.pairwise(decoding):
        assert r.context_lens == [prev.context_lens[0] + prev.emitted]
    kinds = [(r.policy, r.generation) for r in recs]
    assert kinds[0] == ("adaspec", 0) and kinds[-1] == ("off", 5)
    n_first = kinds.index(("off", 5))
    assert set(kinds[:n_first]) == {("adaspec", 0)} and set(kinds[n_first:]) == {("off", 5)}
    for r in recs[n_first:]:  # plain decoding: no pass, no draft token
        assert r.draft_rows == [] and r.proposed == 0 and r.verified == [0]
        assert r.emitted == 1


def scripted_engine(step_log: StepLog, **kw: Any) -> tuple[LLMEngine, ScriptedBackend]:
    backend = ScriptedBackend(**kw)
    engine = LLMEngine(
        backend,
        backend.codec,
        PolicySource(default_policy(max_draft_tokens=4, tpot_slo_ms=10_000.0)),
        metrics=EngineMetrics(),
        step_log=step_log,
    )
    engine.start()
    return engine, backend


def test_scripted_backend_writes_counts_and_no_per_pass_detail(tmp_path: Path) -> None:
    path = tmp_path / "steps.jsonl"
    engine, backend = scripted_engine(StepLog.open(path))

    async def go() -> list[RequestOutput]:
        return [o async for o in engine.submit([104, 105], SamplingParams(max_tokens=20))]

    try:
        outs = asyncio.run(asyncio.wait_for(go(), 30))
    finally:
        engine.shutdown(drain_timeout_s=1.0)
    recs = records(path)
    assert len(recs) == backend.steps == engine.steps
    check_chain(recs)
    assert sum(r.proposed for r in recs) > 0  # it did speculate
    for r in recs:
        assert (r.policy, r.batch) == ("adaspec", 1)
        assert (r.context_lens, r.draft_rows, r.draft_ctx, r.draft_pass_s) == ([], [], [], [])
        assert r.policy_s == 0.0 and r.prefill_rows == 0 and r.prefill_ctx_work == 0.0
        assert r.emitted == r.accepted + 1 and len(r.verified) == 1
    # the first token comes from `add` (no chunked prefill here), not from a step
    assert sum(r.emitted for r in recs) >= outs[-1].completion_tokens - 1 == 19


class BrokenStream:
    """A file whose writes fail (disk full)."""

    def write(self, s: str) -> int:
        raise OSError(28, "No space left on device")

    def flush(self) -> None: ...

    def close(self) -> None: ...


def test_a_failing_step_log_stops_logging_but_never_the_engine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    step_log = StepLog(tmp_path / "full.jsonl", BrokenStream())  # type: ignore[arg-type]
    engine, _ = scripted_engine(step_log)

    async def go() -> list[RequestOutput]:
        return [o async for o in engine.submit([104], SamplingParams(max_tokens=10))]

    try:
        outs = asyncio.run(asyncio.wait_for(go(), 30))
    finally:
        engine.shutdown(drain_timeout_s=1.0)
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 10
    assert step_log.closed and step_log.written == 0
    assert "No space left on device" in caplog.text


def test_read_step_log_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "steps.jsonl"
    full = StepRecord(
        step=1, t_start=1.0, wall_s=0.5, gap_s=None, policy="off", generation=1, batch=1,
        context_lens=[9], draft_rows=[], draft_ctx=[], draft_pass_s=[], draft_s=0.0,
        policy_s=0.0, verify_s=0.4, verified=[0], proposed=0, accepted=0, prefill_rows=0,
        prefill_tokens=0, prefill_ctx_work=0.0, prefill_extra_pred_s=0.0, emitted=1,
    )  # fmt: skip
    line = full.model_dump_json()
    assert list(json.loads(line)) == list(StepRecord.model_fields)  # keys in format order
    path.write_text(line + "\n" + line[: len(line) // 2])
    assert records(path) == [full]
    assert "torn last line" in read_step_log(path).notes[0]


def parse_serve(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_step_log_flag_errors_exit_2_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse_serve([]).step_log is None  # off by default
    for target, why in (
        (tmp_path / "missing" / "steps.jsonl", "No such file or directory"),
        (tmp_path, "Is a directory"),
    ):
        args = parse_serve(["--backend", "scripted", "--step-log", str(target)])
        assert serve_cli.run(args) == 2
        err = capsys.readouterr().err
        assert f"--step-log: cannot write {target}: {why}" in err
    problem = serve_cli.check_args(parse_serve(["--backend", "vllm", "--step-log", "x.jsonl"]))
    assert problem is not None and problem.startswith("--step-log needs --backend torch")


def test_scripted_server_writes_every_step_until_sigterm(tmp_path: Path) -> None:
    path = tmp_path / "steps.jsonl"
    srv = ServerProcess(
        ["--backend", "scripted", "--step-log", str(path)], tmp_path / "log", ready_timeout_s=60
    )
    got = 0
    with srv:
        for n in (7, 13):
            body = {"model": "scripted", "prompt": "hi", "max_tokens": n}
            r = httpx.post(f"{srv.base}/v1/completions", json=body, timeout=30)
            got += r.json()["usage"]["completion_tokens"]
        # SIGTERM → graceful shutdown (uvicorn re-raises the signal after its shutdown)
        assert srv.stop() in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in srv.log_tail(20_000)
    assert got == 20
    text = path.read_text()
    assert text.endswith("\n")
    recs = records(path)
    check_chain(recs)
    # each request's first token comes from its prefill (`add`), not from a step
    assert got - 2 <= sum(r.emitted for r in recs) <= got - 2 + 2 * 8  # K <= 8 overshoot


def test_real_runs_give_each_server_a_step_log_and_map_generations(tmp_path: Path) -> None:
    trace = Trace("tiny", np.array([0.0, 0.05]), np.array([5, 9]), np.array([6, 4]))
    builder = PromptBuilder(WordTokenizer(), load_prompt_set(), seed=0)
    index = StepLogIndex()
    runs = real_runs(
        trace,
        ["off", "fixed-1", "smartspec"],
        500.0,
        450.0,
        1,
        builder,
        tmp_path,
        ["--backend", "scripted", "--max-batch", "2"],
        step_logs=index,
    )
    assert all(not r.errors for r in runs.values())
    assert sorted(Path(f).name for f in index.files) == [
        "steps-r0-reload.jsonl",
        "steps-r0-smartspec.jsonl",
    ]
    assert sorted(index.generations.values()) == ["fixed-1", "off", "smartspec"]
    engine_name = {"off": "off", "fixed-1": "fixed-1", "smartspec": "smartspec"}
    seen = set()
    for f in index.files:
        for r in records(f):
            assert r.generation is not None
            kind = index.generations[r.generation]
            assert r.policy == engine_name[kind]
            seen.add(kind)
    assert seen == {"off", "fixed-1", "smartspec"}
    assert json.loads(json.dumps(index.to_json()))["generations"] == {
        str(g): k for g, k in index.generations.items()
    }
