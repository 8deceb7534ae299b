"""Where real engine step time goes, against the Profile's time model, and the engine overhead
the simulator misses, fitted from the step logs.

    python bench/step_times.py --step-log bench/results/logs/steps-r0-reload.jsonl \
        --profile bench/results/cpu-profile-quiet-s3.json [--exclude-policy adaptive]

Reads `adaspec serve --step-log` files (format: adaspec.sim.step_log.StepRecord), prices every
logged pass as the simulator does and prints, per policy and overall, measured vs predicted
time per component (draft_pass, verify, chunk_step, prefill_pass, policy, in_step, gap, total;
see adaspec.sim.step_log) and the EngineOverhead fitted to the residuals by non-negative least
squares, then writes both to bench/results/step_times-<first log's name>.json (or --out).
`--exclude-policy` (repeat) leaves a policy's records out of the table and the fit, e.g. the
policy a later `sim_validate.py validate` should predict rather than fit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from _common import print_table, write_json

from adaspec.contract import ContractError
from adaspec.sim import load_builtin_profile
from adaspec.sim.step_log import (
    COMPONENTS,
    Comparison,
    ComponentSummary,
    OverheadFit,
    StepLogError,
    bench_kind,
    compare,
    fit_overhead,
    load_step_logs,
)


def _cell(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def component_rows(comps: dict[str, ComponentSummary]) -> list[list[object]]:
    rows: list[list[object]] = []
    for c in COMPONENTS:
        s = comps[c]
        if not s.n:
            continue
        rows.append(
            [c, s.n, f"{s.measured_s:.2f}", f"{s.predicted_s:.2f}", _cell(s.ratio, ".3f"),
             _cell(s.mape, ".1%"), _cell(s.mean_residual_ms, ".2f"),
             _cell(s.ratio_with_overhead, ".3f")]
        )  # fmt: skip
    return rows


HEADERS = ["component", "n", "meas s", "pred s", "meas/pred", "MAPE", "resid ms", "w/ overhead"]


def print_comparison(cmp: Comparison) -> None:
    for kind, comps in [*cmp.policies.items(), ("all", cmp.overall)]:
        print(f"\n{kind}:")
        print_table(HEADERS, component_rows(comps))
    if cmp.undetailed_records:
        print(f"left out {cmp.undetailed_records} records without per-pass detail")
    for f in cmp.gap_files_left_out:
        print(f"gaps left out of {f}: no chunked prefill (its gaps hold whole-prompt prefills)")


def print_fit(fit: OverheadFit) -> None:
    print("\nengine overhead (ms), non-negative least squares on the residuals:")
    rows: list[list[object]] = []
    for g, gf in fit.groups.items():
        for f, c in gf.coef_ms.items():
            se = gf.stderr_ms[f]
            rows.append(
                [g, gf.n, f, f"{c:.3f}", "-" if se is None else f"±{se:.3f}",
                 _cell(gf.rmse_before_ms, ".2f"), _cell(gf.rmse_after_ms, ".2f"), gf.note or ""]
            )  # fmt: skip
    print_table(
        ["component", "n", "coefficient", "ms", "stderr", "rmse before", "rmse after", "note"],
        rows,
    )
    used = ", ".join(f"{k} {n}" for k, n in fit.source.records_by_policy.items())
    print(f"fitted on records of: {used}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--step-log", nargs="+", required=True, type=Path, help="step log files")
    p.add_argument("--profile", required=True, help="Profile JSON path or a shipped name")
    p.add_argument(
        "--exclude-policy",
        action="append",
        default=[],
        help="leave this policy's records out (repeat; bench kind or engine name)",
    )
    p.add_argument(
        "--no-prefill-draft",
        action="store_true",
        help="the engine ran without a draft model (prompt chunks fill the target cache only)",
    )
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/step_times-*.json)")
    args = p.parse_args(argv)
    try:
        profile = load_builtin_profile(args.profile)
        logs = load_step_logs(args.step_log)
    except (StepLogError, FileNotFoundError, ContractError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    excluded = sorted({bench_kind(k) for k in args.exclude_policy})
    steps = [s for s in logs.steps if s.kind not in excluded]
    logged = sorted({s.kind for s in logs.steps})
    unknown = [k for k in excluded if k not in logged]
    if unknown:
        print(
            f"error: --exclude-policy {', '.join(unknown)}: not in the logs "
            f"(logged: {', '.join(logged)})",
            file=sys.stderr,
        )
        return 2
    if not steps:
        print("error: --exclude-policy left no records", file=sys.stderr)
        return 2
    for note in logs.notes:
        print(note)
    prefill_draft = not args.no_prefill_draft
    fit = fit_overhead(steps, profile.time_model, prefill_draft=prefill_draft)
    cmp = compare(steps, profile.time_model, prefill_draft=prefill_draft, overhead=fit.overhead)
    print(
        f"{len(steps)} step records from {len(args.step_log)} logs vs {args.profile}; "
        "meas/pred > 1: the engine is slower than the profile says; 'w/ overhead': with the "
        "fitted overhead added as the simulator adds it (in-sample)"
    )
    print_comparison(cmp)
    print_fit(fit)
    payload: dict[str, Any] = {
        "step_logs": [str(f) for f in args.step_log],
        "profile": args.profile,
        "excluded_policies": excluded,
        "prefill_draft": prefill_draft,
        "notes": logs.notes,
        "comparison": cmp.model_dump(),
        "overhead": fit.overhead.model_dump(),
        "fit": fit.model_dump(),
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"benchmark": "step_times", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
               time.gmtime()), **payload}  # fmt: skip
        args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        out = args.out
    else:
        out = write_json(f"step_times-{args.step_log[0].stem}", payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
