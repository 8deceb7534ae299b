"""Run a set of policies on one trace, simulated or against real engine processes.

Real runs are interleaved: the trace is cut into `rounds` consecutive windows and, window by
window, every policy replays the same window (order rotated each round). off, fixed-K and
AdaSpec share one `adaspec serve` process per round whose policy file is rewritten between
windows (hot reload, as the operator does; AdaSpec keeps what it learned within the round);
smartspec and threshold each get a fresh `--spec-policy` server (loading models for 7 separate
servers per round would dominate the CPU budget). Counters are differences around each window.
Machine drift therefore hits all policies equally. Per policy, the windows are laid end to end
(each window's times shifted by the policy's time so far), so throughput and goodput are
tokens over the time that policy actually served.

With a `StepLogIndex`, every server also writes its engine step log (`adaspec serve --step-log`)
to `<log_dir>/steps-r<round>-<group>.jsonl`; the index keeps the files and which policy kind each
Policy generation served (generations are unique across the whole run), so the analysis can
split a shared server's log by policy.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adaspec import metric_names as mn
from adaspec.contract import Policy, Profile, SpecMode
from adaspec.policy.prefill import DEFAULT_MAX_CHUNK, DEFAULT_MIN_CHUNK
from adaspec.sim.acceptance import AcceptanceSource
from adaspec.sim.results import RequestRecord, Summary, summarize
from adaspec.sim.simulator import SimConfig, SimResult, run_policy
from adaspec.sim.traces import Trace

from .client import replay, scrape_metrics
from .prompts import PromptBuilder
from .server import EngineServer

DEFAULT_POLICIES = ("off", "fixed-1", "fixed-3", "fixed-5", "smartspec", "threshold", "adaptive")


def policy_doc(kind: str, slo_ms: float, budget_ms: float, max_draft: int = 8) -> Policy:
    """The Policy document a run of `kind` uses (the engine's --spec-policy picks the kind)."""
    if kind == "off":
        return Policy(generation=1, mode=SpecMode.off, tpot_slo_ms=slo_ms, tpot_budget_ms=budget_ms)
    if kind.startswith("fixed-"):
        k = int(kind.removeprefix("fixed-"))
        return Policy(
            generation=1,
            mode=SpecMode.fixed,
            tpot_slo_ms=slo_ms,
            tpot_budget_ms=budget_ms,
            max_draft_tokens=max(k, max_draft),
            fixed_draft_tokens=k,
        )
    return Policy(
        generation=1, tpot_slo_ms=slo_ms, tpot_budget_ms=budget_ms, max_draft_tokens=max_draft
    )


def check_kinds(kinds: list[str]) -> None:
    """ValueError naming the first policy not in off/smartspec/threshold/adaptive/fixed-K."""
    for k in kinds:
        if k in {"off", "smartspec", "threshold", "adaptive"}:
            continue
        if k.startswith("fixed-") and k.removeprefix("fixed-").isdigit():
            continue
        raise ValueError(
            f"--policies: unknown policy {k!r}; use off, fixed-K, smartspec, threshold, adaptive"
        )


def server_kind(kind: str) -> str:
    return "fixed" if kind.startswith("fixed-") else kind


@dataclass
class PolicyRun:
    kind: str
    summary: Summary
    records: list[RequestRecord]
    counters: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    sim: SimResult | None = None

    def to_json(self, with_requests: bool = False) -> dict[str, object]:
        out: dict[str, object] = {
            "summary": self.summary.model_dump(),
            "counters": self.counters,
            "errors": self.errors[:20],
        }
        if with_requests:
            out["requests"] = [dataclasses.asdict(r) for r in self.records]
        return out


def _shifted(recs: list[RequestRecord], shift: float) -> list[RequestRecord]:
    return [
        dataclasses.replace(
            r,
            arrival_s=r.arrival_s + shift,
            first_token_s=r.first_token_s + shift,
            finish_s=r.finish_s + shift,
        )
        for r in recs
    ]


def add_prefill_args(p: argparse.ArgumentParser) -> None:
    """Chunked-prefill settings (simulator, and `adaspec serve` for real runs), with the
    engine's defaults."""
    p.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=DEFAULT_MAX_CHUNK,
        help="prompt tokens per step across prefilling requests (chunked prefill); "
        "0: whole-prompt prefill that stalls the batch (the old baseline)",
    )
    p.add_argument(
        "--prefill-min-chunk",
        type=int,
        default=DEFAULT_MIN_CHUNK,
        help="prompt tokens the oldest prefilling request gets per step even when the "
        "TPOT budget leaves no room",
    )


def sim_config(args: argparse.Namespace, **fields: object) -> SimConfig:
    """SimConfig from `fields` plus the prefill flags; a ValueError naming the flag if invalid."""
    if args.prefill_chunk_tokens < 0:
        raise ValueError(f"--prefill-chunk-tokens must be >= 0, got {args.prefill_chunk_tokens}")
    if args.prefill_min_chunk < 1:
        raise ValueError(f"--prefill-min-chunk must be >= 1, got {args.prefill_min_chunk}")
    if 0 < args.prefill_chunk_tokens < args.prefill_min_chunk:
        raise ValueError(
            f"--prefill-min-chunk ({args.prefill_min_chunk}) must not exceed "
            f"--prefill-chunk-tokens ({args.prefill_chunk_tokens})"
        )
    return SimConfig.model_validate(
        {
            **fields,
            "prefill_chunk_tokens": args.prefill_chunk_tokens,
            "prefill_min_chunk": args.prefill_min_chunk,
        }
    )


def sim_runs(
    trace: Trace,
    profile: Profile,
    kinds: list[str],
    slo_ms: float,
    budget_ms: float,
    config: SimConfig,
    acceptance: AcceptanceSource | None = None,
    max_draft: int = 8,
    rounds: int = 1,
) -> dict[str, PolicyRun]:
    """Simulate each policy; with rounds > 1, mimic real_runs (fresh policy per window,
    windows laid end to end) so simulated and measured numbers are computed the same way.
    Each window draws its requests' texts by their index in the whole trace (as real_runs
    builds their prompts), so measured texts (adaspec.sim.MeasuredAcceptance) line up."""
    windows = split_trace(trace, rounds) if rounds > 1 else [trace]
    out: dict[str, PolicyRun] = {}
    for kind in kinds:
        doc = policy_doc(kind, slo_ms, budget_ms, max_draft)
        records: list[RequestRecord] = []
        c = dict.fromkeys(
            ("proposed", "verified", "accepted", "request_steps", "steps", "sim_wall_s"), 0.0
        )
        c["policy_wall_s"] = 0.0
        clock = 0.0
        res: SimResult | None = None
        first = config.request_offset  # global index of the window's first request
        for w, win in enumerate(windows):
            cfg = config.model_copy(
                update={"seed": config.seed + 1000 * w, "request_offset": first}
            )
            first += len(win)
            res = run_policy(kind, win, profile, doc, acceptance, cfg)
            records.extend(_shifted(res.requests, clock))
            clock = max(r.finish_s for r in records)
            c["proposed"] += res.proposed
            c["verified"] += res.verified
            c["accepted"] += res.accepted
            c["request_steps"] += res.request_steps
            c["steps"] += len(res.steps.batch)
            c["sim_wall_s"] += res.sim_wall_s
            c["policy_wall_s"] += res.policy_wall_s
        s = summarize(
            records,
            slo_ms / 1000.0,
            verified=c["verified"],
            accepted=c["accepted"],
            request_steps=c["request_steps"],
            steps=int(c["steps"]),
        )
        out[kind] = PolicyRun(kind, s, records, c, sim=res if len(windows) == 1 else None)
    return out


def split_trace(trace: Trace, rounds: int) -> list[Trace]:
    """`rounds` consecutive windows with (about) equal request counts, arrivals re-based."""
    parts = np.array_split(np.arange(len(trace)), max(1, min(rounds, len(trace))))
    out = []
    for n, idx in enumerate(parts):
        a = trace.arrival_s[idx]
        out.append(
            Trace(
                f"{trace.name}-w{n}",
                a - a[0],
                trace.prompt_len[idx].copy(),
                trace.output_len[idx].copy(),
            )
        )
    return out


_COUNTERS = {
    "proposed": mn.DRAFT_PROPOSED,
    "verified": mn.DRAFT_VERIFIED,
    "accepted": mn.DRAFT_ACCEPTED,
    "request_steps": mn.SPEC_LENGTH + "_count",
    "spec_len_sum": mn.SPEC_LENGTH + "_sum",
    "steps": mn.STEP_DURATION + "_count",
}


HOT_RELOAD = ("off", "adaptive")
"""Kinds a Policy document's mode selects (with fixed-K): one server serves them all by rewriting
its policy file between windows (what the operator does in production); smartspec and threshold
exist only as --spec-policy overrides and get their own server."""


@dataclass
class StepLogIndex:
    """What real_runs' servers wrote with --step-log: the files, and generation → policy kind
    (the benchmark's kind, e.g. "adaptive" or "smartspec", not the engine's policy name)."""

    files: list[str] = field(default_factory=list)
    generations: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "files": list(self.files),
            "generations": {str(g): k for g, k in sorted(self.generations.items())},
        }


def _groups(kinds: list[str], rotate: int) -> list[list[str]]:
    reload = [k for k in kinds if k in HOT_RELOAD or k.startswith("fixed-")]
    groups = ([reload] if reload else []) + [[k] for k in kinds if k not in reload]
    groups = [g[rotate % len(g) :] + g[: rotate % len(g)] for g in groups]
    n = rotate % len(groups)
    return groups[n:] + groups[:n]


async def _wait_generation(metrics_url: str, generation: int, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        m = await scrape_metrics(metrics_url)
        if int(m.get(mn.POLICY_GENERATION, -1)) == generation:
            return
        await asyncio.sleep(0.25)
    raise TimeoutError(f"the engine did not apply policy generation {generation}")


def real_runs(
    trace: Trace,
    kinds: list[str],
    slo_ms: float,
    budget_ms: float,
    rounds: int,
    builder: PromptBuilder,
    log_dir: Path,
    server_args: list[str] | None = None,
    max_draft: int = 8,
    token_ids: bool = True,
    step_logs: StepLogIndex | None = None,
) -> dict[str, PolicyRun]:
    """Interleaved real runs. Per round: off/fixed-K/adaptive share one server (policy file
    rewritten between windows, counters taken as differences), smartspec and threshold each get
    a fresh server; the order of servers and of policies within a server rotates per round.
    `step_logs`: give every server --step-log and record the files and generations there."""
    windows = split_trace(trace, rounds)
    records: dict[str, list[RequestRecord]] = {k: [] for k in kinds}
    counters: dict[str, dict[str, float]] = {k: dict.fromkeys(_COUNTERS, 0.0) for k in kinds}
    errors: dict[str, list[str]] = {k: [] for k in kinds}
    clock: dict[str, float] = dict.fromkeys(kinds, 0.0)
    offset = 0
    generation = 0
    with tempfile.TemporaryDirectory(prefix="specserve-bench-") as tmp:
        pfile = Path(tmp) / "policy.json"
        for r, win in enumerate(windows):
            for group in _groups(kinds, r):
                shared = len(group) > 1 or group[0] in HOT_RELOAD or group[0].startswith("fixed-")
                generation += 1
                pfile.write_text(_doc_json(group[0], slo_ms, budget_ms, max_draft, generation))
                name = "reload" if shared else group[0]
                log = log_dir / f"serve-r{r}-{name}.log"
                spec = None if shared else server_kind(group[0])
                extra = list(server_args or [])
                if step_logs is not None:
                    steps = log_dir / f"steps-r{r}-{name}.jsonl"
                    log_dir.mkdir(parents=True, exist_ok=True)
                    extra += ["--step-log", str(steps)]
                    step_logs.files.append(str(steps))
                    step_logs.generations[generation] = group[0]
                with EngineServer(spec, pfile, log, extra=extra) as srv:
                    for n, kind in enumerate(group):
                        if n:
                            generation += 1
                            doc = _doc_json(kind, slo_ms, budget_ms, max_draft, generation)
                            pfile.write_text(doc)
                            if step_logs is not None:
                                step_logs.generations[generation] = kind
                        asyncio.run(_wait_generation(srv.metrics_url, generation))
                        print(f"  round {r}: {kind} ({len(win)} requests)", flush=True)
                        before = asyncio.run(scrape_metrics(srv.metrics_url))
                        res = asyncio.run(
                            replay(
                                srv.base_url, win, builder, index_offset=offset, token_ids=token_ids
                            )
                        )
                        after = asyncio.run(scrape_metrics(srv.metrics_url))
                        for key, name in _COUNTERS.items():
                            counters[kind][key] += after.get(name, 0.0) - before.get(name, 0.0)
                        got = [x.record for x in res if x.record is not None]
                        errors[kind].extend(x.error for x in res if x.error)
                        records[kind].extend(_shifted(got, clock[kind]))
                        if got:
                            clock[kind] = max(x.finish_s for x in records[kind])
            offset += len(win)
    out: dict[str, PolicyRun] = {}
    for kind in kinds:
        c = counters[kind]
        s = summarize(
            records[kind],
            slo_ms / 1000.0,
            n_requests=len(trace),
            verified=c["verified"],
            accepted=c["accepted"],
            request_steps=c["request_steps"],
            steps=int(c["steps"]),
        )
        out[kind] = PolicyRun(kind, s, records[kind], c, errors[kind])
    return out


def _doc_json(kind: str, slo_ms: float, budget_ms: float, max_draft: int, generation: int) -> str:
    doc = policy_doc(kind, slo_ms, budget_ms, max_draft).model_copy(
        update={"generation": generation}
    )
    return json.dumps(doc.model_dump(by_alias=True, mode="json"))
