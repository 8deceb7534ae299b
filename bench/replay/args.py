"""Command-line options shared by the replay tool and the benchmark scripts."""

from __future__ import annotations

import argparse
from pathlib import Path

from adaspec.sim.traces import (
    KNOWN_TRACES,
    TRACE_DIR_DEFAULT,
    ScaleSpec,
    Trace,
    load_trace,
    scale_trace,
)

# Defaults sized for the 2-core CPU pair (~3.5 tokens/s per request at batch 1) and a real
# comparison of 7 policies in a few minutes: the first minute of the trace, thinned to 5 %,
# time-compressed ×0.3 (keeps the burst shape), prompts ×0.05 and outputs ×0.25 clipped to
# [16, 128] and [8, 32] tokens, at most 8 requests.
CPU_SCALE = ScaleSpec(
    window_s=60.0,
    keep_fraction=0.05,
    time_scale=0.3,
    prompt_scale=0.05,
    output_scale=0.25,
    min_prompt=16,
    max_prompt=128,
    min_output=8,
    max_output=32,
    max_requests=8,
)


def add_trace_args(p: argparse.ArgumentParser, default_trace: str = "adaspec-conv") -> None:
    g = p.add_argument_group("trace and scaling (deterministic; see adaspec.sim.traces.ScaleSpec)")
    g.add_argument(
        "--trace", default=default_trace, help=f"one of {', '.join(KNOWN_TRACES)} or a file"
    )
    g.add_argument("--trace-dir", type=Path, default=TRACE_DIR_DEFAULT)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-scale", action="store_true", help="replay at production scale (sim)")
    for name in ScaleSpec.model_fields:
        if name == "seed":
            continue
        default = getattr(CPU_SCALE, name)
        kind = _opt_float if name in _FLOAT_FIELDS else _opt_int
        g.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=default, help=f"default {default}"
        )


_FLOAT_FIELDS = {
    "start_s",
    "window_s",
    "keep_fraction",
    "time_scale",
    "prompt_scale",
    "output_scale",
}


def _opt_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _opt_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def scale_spec(args: argparse.Namespace) -> ScaleSpec:
    fields = {n: getattr(args, n) for n in ScaleSpec.model_fields if n != "seed"}
    return ScaleSpec(seed=args.seed, **fields)


def trace_from_args(args: argparse.Namespace) -> Trace:
    tr = load_trace(args.trace, args.trace_dir, seed=args.seed)
    return tr if args.no_scale else scale_trace(tr, scale_spec(args))
