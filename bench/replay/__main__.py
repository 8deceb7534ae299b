"""Replay a (scaled) trace against a running OpenAI-compatible engine and write JSON.

    python -m bench.replay --base-url http://127.0.0.1:8000/v1 --trace adaspec-conv \
        --tokenizer ~/.cache/specserve/models/qwen2.5-coder-0.5b-instruct [scaling options]

Prints the summary table; writes bench/results/replay-<trace>.json (per-request records and the
summary). `--dry-run` only prints the scaled trace (no server needed).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path

from adaspec import metric_names as mn
from adaspec.sim.results import summarize
from adaspec.sim.traces import TraceError

from .args import add_trace_args, trace_from_args
from .client import replay, scrape_metrics
from .prompts import PromptBuilder, load_prompt_set, tokenizer_from

DEFAULT_TOKENIZER = Path.home() / ".cache/specserve/models/qwen2.5-coder-0.5b-instruct"


def _try_scrape(url: str) -> dict[str, float]:
    """The engine's counters, or {} when the server has no /metrics (another engine)."""
    try:
        return asyncio.run(scrape_metrics(url))
    except Exception:
        return {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="model id (default: ask the server)")
    p.add_argument(
        "--prompt-format",
        choices=("ids", "text"),
        default="ids",
        help="send token ids (exact lengths) or decoded text (default: ids)",
    )
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="folder/file, or 'words'")
    p.add_argument("--tpot-slo-ms", type=float, default=600.0)
    p.add_argument("--dry-run", action="store_true")
    add_trace_args(p)
    args = p.parse_args(argv)
    try:
        trace = trace_from_args(args)
    except TraceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{trace.name}: {len(trace)} requests over {trace.span_s:.1f} s; prompt mean "
        f"{trace.prompt_len.mean():.0f}, output mean {trace.output_len.mean():.0f} tokens"
    )
    if args.dry_run:
        for a, pl, o in trace.rows():
            print(f"{a:9.2f}s  prompt {pl:5d}  output {o:5d}")
        return 0
    builder = PromptBuilder(tokenizer_from(args.tokenizer), load_prompt_set(), seed=args.seed)
    metrics_url = args.base_url.rstrip("/").removesuffix("/v1") + "/metrics"
    before = _try_scrape(metrics_url)
    results = asyncio.run(
        replay(
            args.base_url,
            trace,
            builder,
            model=args.model,
            token_ids=args.prompt_format == "ids",
        )
    )
    records = [r.record for r in results if r.record is not None]
    errors = [r.error for r in results if r.error]
    after = _try_scrape(metrics_url)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after} if after else {}
    s = summarize(
        records,
        args.tpot_slo_ms / 1000.0,
        n_requests=len(trace),
        verified=delta.get(mn.DRAFT_VERIFIED),
        accepted=delta.get(mn.DRAFT_ACCEPTED),
        request_steps=delta.get(mn.SPEC_LENGTH + "_count"),
        steps=int(delta[mn.STEP_DURATION + "_count"]) if delta else None,
    )

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _common import print_table, write_json

    print_table(["metric", "value"], [[k, v] for k, v in s.model_dump().items()])
    path = write_json(
        f"replay-{args.trace}",
        {
            "trace": args.trace,
            "summary": s.model_dump(),
            "errors": errors,
            "requests": [dataclasses.asdict(r) for r in records],
        },
    )
    print(f"wrote {path}")
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
