"""Side-by-side policy comparison on one trace: off, fixed K ∈ {1,3,5}, SmartSpec-style,
threshold, AdaSpec — same trace, same seed, same engine build.

    python bench/compare_policies.py --engine sim            # simulator, scaled CPU trace
    python bench/compare_policies.py --engine sim --no-scale --profile h200-7b-0.5b-synthetic \
        --tpot-slo-ms 30 --max-batch 256                       # production scale, GPU estimate
    python bench/compare_policies.py --engine real           # real `adaspec serve` processes

`--engine real` replays the scaled trace interleaved (see bench/replay/runs.py): `--rounds`
windows, each replayed by every policy in a fresh server, order rotated per round. Defaults
are small on purpose (CPU minutes: model load per server start plus ~16 short requests per
policy). Prints a table, writes bench/results/compare_policies-<engine>-<trace>.json and .png.
`--step-logs` (real) also has every server write its engine step log to
bench/results/logs/<tag>/steps-r<round>-<group>.jsonl (server logs go there too, so runs with
different tags keep theirs); the JSON's `step_logs` lists the files and which policy each
Policy generation served.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import RESULTS, print_table, write_json
from replay.args import add_trace_args, scale_spec, trace_from_args
from replay.report import HEADERS, bar_plot, best_static, ratios, table_rows
from replay.runs import (
    DEFAULT_POLICIES,
    PolicyRun,
    StepLogIndex,
    add_prefill_args,
    check_kinds,
    real_runs,
    sim_config,
    sim_runs,
)

from adaspec.sim import TraceError, load_acceptance_model, load_builtin_profile

DEFAULT_TOKENIZER = Path.home() / ".cache/specserve/models/qwen2.5-coder-0.5b-instruct"


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=("sim", "real"), default="sim")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    p.add_argument("--profile", default="cpu-qwen-coder-estimate", help="sim: name or JSON path")
    p.add_argument(
        "--acceptance",
        help="sim: AcceptanceModel JSON (bench/measure_acceptance.py); default: the profile's",
    )
    p.add_argument("--tpot-slo-ms", type=float, default=500.0)
    p.add_argument("--tpot-budget-ms", type=float, help="default: 0.9 × SLO")
    p.add_argument("--max-draft", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--noise", type=float, default=0.05, help="sim: log-normal sd per pass")
    add_prefill_args(p)
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="interleaved windows (real); sim mimics them (fresh policy per window)",
    )
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="real: or 'words'")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="real: extra `adaspec serve` argument (repeat; e.g. --server-arg=--backend=scripted)",
    )
    p.add_argument(
        "--step-logs",
        action="store_true",
        help="real: each server writes `adaspec serve --step-log` to "
        "bench/results/logs/<tag>/steps-r<round>-<group>.jsonl (listed in the JSON's step_logs)",
    )
    p.add_argument("--tag", default="", help="suffix of the output file names")
    add_trace_args(p)


def run_comparison(args: argparse.Namespace) -> tuple[dict[str, PolicyRun], dict[str, object]]:
    kinds = [k.strip() for k in args.policies.split(",") if k.strip()]
    check_kinds(kinds)
    budget = args.tpot_budget_ms or 0.9 * args.tpot_slo_ms
    trace = trace_from_args(args)
    if args.step_logs and args.engine != "real":
        raise ValueError("--step-logs needs --engine real (the simulator has no engine steps)")
    meta: dict[str, object] = {
        "engine": args.engine,
        "trace": args.trace,
        "scale": None if args.no_scale else scale_spec(args).model_dump(),
        "requests": len(trace),
        "span_s": trace.span_s,
        "tpot_slo_ms": args.tpot_slo_ms,
        "tpot_budget_ms": budget,
        "max_batch": args.max_batch,
        "max_draft": args.max_draft,
        "rounds": args.rounds,
        "seed": args.seed,
        "tokenizer": args.tokenizer if args.engine == "real" else None,
    }
    if args.engine == "sim":
        profile = load_builtin_profile(args.profile)
        meta["profile"] = args.profile
        cfg = sim_config(args, max_batch=args.max_batch, noise_sigma=args.noise, seed=args.seed)
        meta["prefill_chunk_tokens"] = cfg.prefill_chunk_tokens
        meta["prefill_min_chunk"] = cfg.prefill_min_chunk
        runs = sim_runs(
            trace,
            profile,
            kinds,
            args.tpot_slo_ms,
            budget,
            cfg,
            acceptance=load_acceptance_model(args.acceptance) if args.acceptance else None,
            max_draft=args.max_draft,
            rounds=args.rounds,
        )
    else:
        from replay.prompts import PromptBuilder, load_prompt_set, tokenizer_from

        builder = PromptBuilder(tokenizer_from(args.tokenizer), load_prompt_set(), args.seed)
        sim_config(args)  # the same checks of the prefill flags
        server_args = [
            "--max-batch",
            str(args.max_batch),
            "--prefill-chunk-tokens",
            str(args.prefill_chunk_tokens),
            "--prefill-min-chunk",
            str(args.prefill_min_chunk),
            *args.server_arg,
        ]
        meta["server_args"] = server_args
        meta["prefill_chunk_tokens"] = args.prefill_chunk_tokens
        meta["prefill_min_chunk"] = args.prefill_min_chunk
        step_logs = StepLogIndex() if args.step_logs else None
        runs = real_runs(
            trace,
            kinds,
            args.tpot_slo_ms,
            budget,
            args.rounds,
            builder,
            RESULTS / "logs" / (args.tag or "untagged"),
            server_args,
            args.max_draft,
            step_logs=step_logs,
        )
        if step_logs is not None:
            meta["step_logs"] = step_logs.to_json()
    return runs, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common(p)
    args = p.parse_args(argv)
    t0 = time.monotonic()
    try:
        runs, meta = run_comparison(args)
    except (TraceError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summaries = {k: r.summary for k, r in runs.items()}
    print(
        f"{args.engine}: {meta['requests']} requests of {args.trace}, "
        f"SLO {args.tpot_slo_ms:g} ms, best static K: {best_static(summaries)}"
    )
    print_table(HEADERS, table_rows(summaries))
    name = f"compare_policies-{args.engine}-{args.trace}{'-' + args.tag if args.tag else ''}"
    png = bar_plot(summaries, name, RESULTS / f"{name}.png")
    path = write_json(
        name,
        {
            **meta,
            "wall_s": time.monotonic() - t0,
            "best_static": best_static(summaries),
            "ratios": ratios(summaries),
            "policies": {
                k: r.to_json(with_requests=args.engine == "real") for k, r in runs.items()
            },
        },
    )
    print(f"wrote {path} and {png} ({time.monotonic() - t0:.0f} s)")
    errors = sum(len(r.errors) for r in runs.values())
    if errors:
        print(f"warning: {errors} requests failed (see the JSON)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
