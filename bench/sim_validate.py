"""Validate the simulator against the real engine, then replay the production traces with a
GPU-class profile as load grows, with the oracle best static K per window (regret).

    python bench/sim_validate.py validate \
        --measured bench/results/compare_policies-real-adaspec-conv.json [--profile P.json]
        # sim vs measured P90 TPOT and throughput (target ±10 %)
    python bench/sim_validate.py production [--loads 1,4,16] [--traces adaspec-conv,...]

`validate` rebuilds the measured run's scaled trace from its JSON (trace, scale, seed, rounds,
max batch, SLO, prefill chunking; runs without `prefill_chunk_tokens` were whole-prompt) and
simulates every measured policy the same way (fresh policy per window).
With `--step-logs [FILE ...]` (the engine's `adaspec serve --step-log` files; none named: those
the measured run lists) it also simulates each policy with the engine overhead the profile misses
(adaspec.sim.step_log), fitted to the step records of the OTHER policies only (leave one policy
out), so the check stays a prediction; errors with and without it side by side, and the JSON
says which records fitted which policy's overhead. `--overhead FILE` uses one fixed
EngineOverhead (e.g. from bench/step_times.py) for every policy instead.
With `--measured-text REPORT.json` (bench/measure_acceptance.py --replay of the same run's
prompts, --report) the drafts are not drawn from the acceptance model but replayed from the
texts the real pair decoded, request by request and position by position (the model fills what
the measurement did not see), so the check compares timing and policy logic, not how hard a
random text happens to be; the result JSON's `acceptance_source` says which was used.
`production` replays the full AdaSpec windows (lengths paired from the source traces with the
paper's caps) with `--profile` (default: the H200 ESTIMATE) at each load factor (arrivals
compressed ×factor), runs every policy plus fixed K = 1…`--oracle-max-k`, and reports AdaSpec's
goodput against the oracle static K (the best of off and fixed 1…K in hindsight) for the whole
window, and on every `--window-s` slice of it (cut at ×1 time) replayed on its own, each against
its own best static K (`--window-s 0`: whole windows only). Prompts are prefilled in chunks as the
engine does (`--prefill-chunk-tokens 0`: whole-prompt stalls).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS, print_table, write_json
from pydantic import ValidationError
from replay.report import best_static
from replay.runs import (
    DEFAULT_POLICIES,
    PolicyRun,
    add_prefill_args,
    policy_doc,
    sim_config,
    sim_runs,
)

from adaspec.contract import Profile, StepTimeModel, TimeModel
from adaspec.policy.prefill import DEFAULT_MIN_CHUNK
from adaspec.sim import (
    AcceptanceSource,
    EngineOverhead,
    ScaleSpec,
    SimConfig,
    Summary,
    Trace,
    TraceError,
    load_acceptance_model,
    load_builtin_profile,
    load_measured_acceptance,
    load_trace,
    rate_scaled,
    scale_trace,
)
from adaspec.sim.measured_text import measured_run_name
from adaspec.sim.oracle import run_clairvoyant
from adaspec.sim.step_log import (
    GROUPS,
    StepLogError,
    check_generations,
    fit_leave_one_policy_out,
    load_step_logs,
)

WINDOWS = ("adaspec-conv", "adaspec-code", "adaspec-mooncake")
GROUP_FIELDS = [f for fields in GROUPS.values() for f in fields]


def scaled_profile(profile: Profile, f: float) -> Profile:
    """The same profile with every time coefficient multiplied by f."""

    def sc(m: StepTimeModel) -> StepTimeModel:
        return m.model_copy(
            update={
                "intercept_ms": m.intercept_ms * f,
                "per_row_ms": m.per_row_ms * f,
                "per_token_ms": m.per_token_ms * f,
                "per_ctx_ktoken_ms": m.per_ctx_ktoken_ms * f,
            }
        )

    tm = profile.time_model
    prefill = sc(tm.prefill) if tm.prefill is not None else None
    return profile.model_copy(
        update={"time_model": TimeModel(draft=sc(tm.draft), verify=sc(tm.verify), prefill=prefill)}
    )


def _err(sim: float, real: float) -> float:
    return sim / real - 1.0 if real else float("nan")


def _overheads(
    args: argparse.Namespace, m: dict[str, Any], profile: Profile, kinds: list[str], cfg: SimConfig
) -> tuple[dict[str, EngineOverhead], dict[str, Any]] | None:
    """Per policy, the engine overhead to simulate it with, and where it came from; None
    without --overhead / --step-logs. From step logs each policy's overhead is fitted to the
    OTHER policies' records only (leave one policy out), against the unscaled profile."""
    if args.overhead:
        try:
            doc = json.loads(Path(args.overhead).read_text(encoding="utf-8"))
            oh = EngineOverhead.model_validate(doc.get("overhead", doc))
        except (json.JSONDecodeError, ValidationError, AttributeError) as e:
            raise ValueError(f"--overhead {args.overhead}: not an EngineOverhead JSON: {e}") from e
        return dict.fromkeys(kinds, oh), {"source": "file", "file": args.overhead}
    if args.step_logs is None:
        return None
    files = list(args.step_logs) or list(m.get("step_logs", {}).get("files", []))
    if not files:
        raise ValueError(
            "--step-logs: no files given and the measured run lists none (run compare_policies "
            "--engine real --step-logs, or name the files)"
        )
    logs = load_step_logs(files)
    for note in logs.notes:
        print(note)
    gens = {int(g): k for g, k in m.get("step_logs", {}).get("generations", {}).items()}
    covered = check_generations(logs.steps, gens)
    fits = fit_leave_one_policy_out(
        logs.steps, profile.time_model, kinds, prefill_draft=cfg.prefill_draft
    )
    logged = sorted({s.kind for s in logs.steps})
    print(f"step logs: {len(logs.steps)} records ({', '.join(logged)}) from {len(files)} files")
    print_table(
        ["policy", "fitted on", *GROUP_FIELDS],
        [[k, ", ".join(f.source.records_by_policy),
          *(getattr(f.overhead, c) for c in GROUP_FIELDS)] for k, f in fits.items()],
    )  # fmt: skip
    source = {
        "source": "step_logs, leave one policy out",
        "files": files,
        "records": len(logs.steps),
        "records_checked_against_generations": covered,
        "logged_policies": logged,
        "fits": {k: f.model_dump() for k, f in fits.items()},
    }
    return {k: f.overhead for k, f in fits.items()}, source


def _acceptance_source(
    args: argparse.Namespace, m: dict[str, Any], measured: Path, trace: Trace
) -> tuple[AcceptanceSource | None, dict[str, Any]]:
    """Where the simulated drafts come from, and what the result JSON says about it. With
    --measured-text: the texts the real pair decoded (adaspec.sim.measured_text), the
    --acceptance model (else the report's own fitted model) filling what was not measured."""
    model = load_acceptance_model(args.acceptance) if args.acceptance else None
    if not args.measured_text:
        return model, {
            "kind": "model",
            "file": args.acceptance,
            "source": model.source if model is not None else "profile calibration",
        }
    try:
        text = load_measured_acceptance(args.measured_text, model)
    except ValueError as e:
        raise ValueError(f"--measured-text: {e}") from None
    cov = text.coverage(trace.output_len)
    run = measured_run_name(text)
    if run is not None and run != measured.name:
        print(
            f"note: --measured-text was measured on the prompts of {run}, not of "
            f"{measured.name}: valid only if both runs replayed the same scaled trace with the "
            "same seed"
        )
    if text.draft_len is not None and text.draft_len < int(m["max_draft"]):
        print(
            f"note: --measured-text drafted {text.draft_len} per step, fewer than the run's "
            f"max draft {m['max_draft']}: deeper off-path drafts come from the fallback"
        )
    print(
        f"measured text: {cov['requests_measured']:.0f} of {cov['requests']:.0f} requests; "
        f"decoded positions measured on path {cov['on_path_share']:.1%}, off path "
        f"{cov['off_path_share']:.1%}; the rest from {text.fallback.source}"
    )
    return text, {
        "kind": "measured_text",
        "report": args.measured_text,
        "source": text.source,
        "draft_len": text.draft_len,
        "fallback_file": args.acceptance,
        "fallback_source": text.fallback.source,
        "coverage": cov,
    }


def validate(args: argparse.Namespace) -> int:
    path = Path(args.measured)
    if not path.exists():
        print(f"error: --measured {path} does not exist (run compare_policies --engine real)")
        return 2
    m: dict[str, Any] = json.loads(path.read_text())
    trace = load_trace(m["trace"], args.trace_dir, seed=m["seed"])
    if m.get("scale"):
        trace = scale_trace(trace, ScaleSpec(**m["scale"]))
    profile = load_builtin_profile(args.profile)
    kinds = list(m["policies"])
    # the measured run's prefill: runs that predate chunked prefill do not record it and were
    # whole-prompt admissions (0)
    cfg = SimConfig(
        max_batch=m["max_batch"],
        noise_sigma=args.noise,
        seed=m["seed"],
        prefill_chunk_tokens=int(m.get("prefill_chunk_tokens", 0)),
        prefill_min_chunk=int(m.get("prefill_min_chunk", DEFAULT_MIN_CHUNK)),
    )
    acceptance, acceptance_source = _acceptance_source(args, m, path, trace)
    rounds = args.rounds or int(m.get("rounds", 1))
    overheads = _overheads(args, m, profile, kinds, cfg)

    def simulate(prof: Profile, kind: str, oh: EngineOverhead | None) -> PolicyRun:
        c = cfg if oh is None else cfg.model_copy(update={"overhead": oh})
        return sim_runs(
            trace, prof, [kind], m["tpot_slo_ms"], m["tpot_budget_ms"], c,
            acceptance=acceptance, max_draft=m["max_draft"], rounds=rounds,
        )[kind]  # fmt: skip

    def calibrated(oh: EngineOverhead | None) -> tuple[Profile, float]:
        # one-point calibration: scale the whole time model so that the calibration policy's
        # simulated mean TPOT matches the measured one (a few fixed-point iterations; queueing
        # makes TPOT slightly non-linear in the scale). The other policies are predictions.
        if not args.calibrate_on:
            return profile, 1.0
        ref = m["policies"][args.calibrate_on]["summary"]["tpot_mean_ms"]
        scale = 1.0
        for _ in range(4):
            got = simulate(scaled_profile(profile, scale), args.calibrate_on, oh)
            scale *= ref / got.summary.tpot_mean_ms
        return scaled_profile(profile, scale), scale

    prof, scale = calibrated(None)
    if args.calibrate_on:
        print(f"time model scaled ×{scale:.3f} to match {args.calibrate_on}'s mean TPOT")
    runs = {k: simulate(prof, k, None) for k in kinds}
    oh_runs: dict[str, PolicyRun] = {}
    scale_oh = None
    if overheads is not None:
        oh_for = overheads[0]
        prof_oh, scale_oh = calibrated(oh_for.get(args.calibrate_on or "", None))
        if args.calibrate_on:
            print(f"with overhead: time model scaled ×{scale_oh:.3f} to match {args.calibrate_on}")
        oh_runs = {k: simulate(prof_oh, k, oh_for[k]) for k in kinds}
    rows, out = [], {}
    for k in kinds:
        real = m["policies"][k]["summary"]
        out[k] = _errors(real, runs[k].summary)
        e = out[k]
        row = [k, real["tpot_p90_ms"], e["simulated"]["tpot_p90_ms"], e["p90_tpot_error"],
               real["throughput_tok_s"], e["simulated"]["throughput_tok_s"],
               e["throughput_error"], e["mean_tpot_error"]]  # fmt: skip
        if overheads is not None:
            w = _errors(real, oh_runs[k].summary)
            w["overhead"] = overheads[0][k].model_dump()
            out[k]["with_overhead"] = w
            row += [w["p90_tpot_error"], w["throughput_error"], w["mean_tpot_error"]]
        rows.append(row)
    print(
        f"simulated ({args.profile}, prefill chunks {cfg.prefill_chunk_tokens or 'off'}, "
        f"drafts: {'measured text' if args.measured_text else 'acceptance model'}) vs "
        f"measured ({path.name}); target |error| ≤ 10 %"
    )
    headers = ["policy", "P90 meas", "P90 sim", "P90 err", "thr meas", "thr sim", "thr err",
               "mean err"]  # fmt: skip
    if overheads is not None:
        headers += ["P90 err+oh", "thr err+oh", "mean err+oh"]
    print_table(headers, rows)
    worst_p90 = max(abs(v["p90_tpot_error"]) for v in out.values())
    worst_thr = max(abs(v["throughput_error"]) for v in out.values())
    print(f"worst |error|: P90 TPOT {worst_p90:.1%}, throughput {worst_thr:.1%}")
    payload: dict[str, Any] = {
        "measured_file": str(path), "profile": args.profile, "acceptance": args.acceptance,
        "acceptance_source": acceptance_source, "calibrated_on": args.calibrate_on,
        "time_scale": scale,
        "prefill_chunk_tokens": cfg.prefill_chunk_tokens,
        "prefill_min_chunk": cfg.prefill_min_chunk, "policies": out,
        "worst_p90_tpot_error": worst_p90, "worst_throughput_error": worst_thr,
    }  # fmt: skip
    if overheads is not None:
        w_p90 = max(abs(v["with_overhead"]["p90_tpot_error"]) for v in out.values())
        w_thr = max(abs(v["with_overhead"]["throughput_error"]) for v in out.values())
        print(f"with engine overhead: worst |error|: P90 TPOT {w_p90:.1%}, throughput {w_thr:.1%}")
        payload |= {
            "overhead": overheads[1],
            "time_scale_with_overhead": scale_oh,
            "worst_p90_tpot_error_with_overhead": w_p90,
            "worst_throughput_error_with_overhead": w_thr,
        }
    if args.out:
        p = Path(args.out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"benchmark": "sim_validate", **payload}, indent=2) + "\n")
    else:
        p = write_json(f"sim_validate-{m['trace']}", payload)
    print(f"wrote {p}")
    return 0


def _errors(real: dict[str, Any], sim: Summary) -> dict[str, Any]:
    return {
        "measured": real,
        "simulated": sim.model_dump(),
        "p90_tpot_error": _err(sim.tpot_p90_ms, real["tpot_p90_ms"]),
        "throughput_error": _err(sim.throughput_tok_s, real["throughput_tok_s"]),
        "mean_tpot_error": _err(sim.tpot_mean_ms, real["tpot_mean_ms"]),
    }


def production(args: argparse.Namespace) -> int:
    profile = load_builtin_profile(args.profile)
    acceptance = load_acceptance_model(args.acceptance) if args.acceptance else None
    loads = [float(x) for x in args.loads.split(",")]
    kinds = [k for k in args.policies.split(",") if k]
    oracle_ks = [f"fixed-{k}" for k in range(1, args.oracle_max_k + 1)]
    all_kinds = list(dict.fromkeys(kinds + oracle_ks))
    budget = args.tpot_budget_ms or 0.9 * args.tpot_slo_ms
    cfg = sim_config(args, max_batch=args.max_batch, noise_sigma=args.noise, seed=args.seed)
    slo_s = args.tpot_slo_ms / 1000.0
    results: dict[str, Any] = {}
    table: list[list[object]] = []
    for name in args.traces.split(","):
        base = load_trace(name, args.trace_dir, seed=args.seed)
        if args.max_requests:
            base = scale_trace(base, ScaleSpec(max_requests=args.max_requests))
        results[name] = {}
        for f in loads:
            tr = rate_scaled(base, f)
            t0 = time.monotonic()
            runs = sim_runs(tr, profile, all_kinds, args.tpot_slo_ms, budget, cfg, acceptance)
            sums = {k: r.summary for k, r in runs.items()}
            if args.clairvoyant:  # the reference: knows every accepted run (adaspec.sim.oracle)
                doc = policy_doc("adaptive", args.tpot_slo_ms, budget)
                ref = run_clairvoyant(tr, profile, doc, acceptance, cfg)
                sums["clairvoyant"] = ref.summary(slo_s)
            static = ["off", *oracle_ks]
            oracle_k = max(static, key=lambda k: sums[k].goodput_tok_s)
            ada = sums.get("adaptive")
            res: dict[str, Any] = {
                "rate_req_s": tr.mean_rate,
                "policies": {k: s.model_dump() for k, s in sums.items()},
                "oracle_static": oracle_k,
                "best_static_k_1_5": best_static({k: sums[k] for k in sums if k in kinds}),
            }
            if ada is not None and args.window_s > 0:
                res["slices"] = slice_regret(
                    base, f, profile, static, budget, cfg, acceptance, args
                )
            res["wall_s"] = time.monotonic() - t0
            best_p90 = min(static, key=lambda k: sums[k].tpot_p90_ms)
            res["best_static_p90"] = best_p90
            if ada is not None:
                res["adaptive_vs_oracle"] = ada.goodput_tok_s / sums[oracle_k].goodput_tok_s
                res["adaptive_p90_vs_best_static_p90"] = (
                    ada.tpot_p90_ms / sums[best_p90].tpot_p90_ms
                )
                if "off" in sums:
                    res["adaptive_goodput_vs_off"] = ada.goodput_tok_s / sums["off"].goodput_tok_s
                    res["adaptive_p90_vs_off"] = ada.tpot_p90_ms / sums["off"].tpot_p90_ms
                if "clairvoyant" in sums:
                    cv = sums["clairvoyant"]
                    res["adaptive_vs_clairvoyant"] = {
                        "goodput": ada.goodput_tok_s / cv.goodput_tok_s,
                        "tpot_mean": cv.tpot_mean_ms / ada.tpot_mean_ms,
                        "tpot_p90": cv.tpot_p90_ms / ada.tpot_p90_ms,
                    }
            if "off" in sums:
                # how much faster than plain decoding (the "× off" targets), per policy
                res["off_mean_tpot_over"] = {
                    k: sums["off"].tpot_mean_ms / s.tpot_mean_ms for k, s in sums.items()
                }
            results[name][f"x{f:g}"] = res
            for k in [*kinds, "clairvoyant"] if "clairvoyant" in sums else kinds:
                s = sums[k]
                table.append(
                    [name, f"x{f:g}", k, s.tpot_p90_ms, s.tpot_mean_ms, s.slo_attainment,
                     s.goodput_tok_s, s.throughput_tok_s,
                     s.mean_spec_len if s.mean_spec_len is not None else "-",
                     s.acceptance if s.acceptance is not None else "-",
                     s.goodput_tok_s / sums[oracle_k].goodput_tok_s,
                     s.tpot_p90_ms / sums[best_p90].tpot_p90_ms]
                )  # fmt: skip
            sl = res.get("slices")
            per_slice = (
                f", {sl['adaptive_vs_best_min']:.3f} worst / "
                f"{sl['adaptive_vs_best_mean']:.3f} mean over {len(sl['slices'])} slices "
                f"of {args.window_s:g} s replayed alone"
                if sl
                else ""
            )
            print(
                f"{name} x{f:g}: {tr.mean_rate:.1f} req/s, oracle static {oracle_k} (lowest P90: "
                f"{best_p90}), AdaSpec/oracle {res.get('adaptive_vs_oracle', float('nan')):.3f} "
                f"(whole window){per_slice}; {res['wall_s']:.0f} s",
                flush=True,
            )
    print_table(
        [
            "trace",
            "load",
            "policy",
            "P90 ms",
            "mean ms",
            "SLO att.",
            "goodput",
            "thruput",
            "spec",
            "accept",
            "good/oracle",
            "P90/bestP90",
        ],
        table,
    )
    tag = args.tag
    p = write_json(
        f"sim_production{tag}",
        {"profile": args.profile, "tpot_slo_ms": args.tpot_slo_ms, "tpot_budget_ms": budget,
         "max_batch": args.max_batch, "prefill_chunk_tokens": cfg.prefill_chunk_tokens,
         "prefill_min_chunk": cfg.prefill_min_chunk, "loads": loads, "window_s": args.window_s,
         "seed": args.seed, "traces": results},
    )  # fmt: skip
    png = _plot(results, kinds, RESULTS / f"sim_production{tag}.png", args.tpot_slo_ms)
    print(f"wrote {p} and {png}")
    return 0


def slice_regret(
    base: Trace,
    factor: float,
    profile: Profile,
    static: list[str],
    budget_ms: float,
    cfg: SimConfig,
    acceptance: AcceptanceSource | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """AdaSpec against the best static K of each `--window-s` slice of the trace, every slice
    replayed on its own from an idle engine (so the per-slice oracle is a real run, not a mix of
    pieces of different runs). Slices are cut at ×1 time, so each load has the same slices."""
    arrivals = base.arrival_s - base.arrival_s[0]
    rows: list[dict[str, Any]] = []
    start = 0.0
    while start <= base.span_s:
        first = int(np.searchsorted(arrivals, start))
        try:
            piece = scale_trace(base, ScaleSpec(start_s=start, window_s=args.window_s))
        except TraceError:  # an empty slice (a gap in the trace)
            start += args.window_s
            continue
        tr = rate_scaled(piece, factor)
        c = cfg.model_copy(update={"request_offset": cfg.request_offset + first})
        runs = sim_runs(tr, profile, [*static, "adaptive"], args.tpot_slo_ms, budget_ms, c,
                        acceptance)  # fmt: skip
        best = max(static, key=lambda k: runs[k].summary.goodput_tok_s)
        rows.append(
            {
                "start_s": start,
                "requests": len(tr),
                "best_static": best,
                "adaptive_vs_best": runs["adaptive"].summary.goodput_tok_s
                / runs[best].summary.goodput_tok_s,
            }
        )
        start += args.window_s
    ratios = np.array([r["adaptive_vs_best"] for r in rows])
    return {
        "window_s": args.window_s,
        "slices": rows,
        "adaptive_vs_best_min": float(ratios.min()),
        "adaptive_vs_best_mean": float(ratios.mean()),
    }


def _plot(results: dict[str, Any], kinds: list[str], path: Path, slo_ms: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(5 * len(names), 7), squeeze=False)
    for c, name in enumerate(names):
        loads = list(results[name])
        rate = [results[name][x]["rate_req_s"] for x in loads]
        for k in kinds:
            good = [results[name][x]["policies"][k]["goodput_tok_s"] for x in loads]
            p90 = [results[name][x]["policies"][k]["tpot_p90_ms"] for x in loads]
            style = {"lw": 2.8, "color": "black"} if k == "adaptive" else {"lw": 1}
            axes[0][c].plot(rate, good, marker="o", label=k, **style)
            axes[1][c].plot(rate, p90, marker="o", label=k, **style)
        oracle = [
            results[name][x]["policies"][results[name][x]["oracle_static"]]["goodput_tok_s"]
            for x in loads
        ]
        axes[0][c].plot(rate, oracle, color="gray", ls="--", lw=2, label="oracle static K")
        axes[1][c].axhline(slo_ms, color="tab:blue", ls=":", label="SLO")
        axes[0][c].set_title(f"{name}: goodput (tok/s)")
        axes[1][c].set_title("P90 TPOT (ms)")
        for ax in axes[:, c]:
            ax.set_xscale("log")
            ax.set_xlabel("request rate (req/s)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trace-dir", type=Path, default=Path("/work/shared/traces"))
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--acceptance", help="AcceptanceModel JSON; default: the profile's calibration")
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate")
    v.add_argument("--measured", required=True)
    v.add_argument("--profile", default="cpu-qwen-coder-estimate")
    v.add_argument("--rounds", type=int, help="default: the measured run's")
    src = v.add_mutually_exclusive_group()
    src.add_argument(
        "--step-logs",
        nargs="*",
        help="engine step logs (adaspec serve --step-log; none named: the measured run's): "
        "each policy is also simulated with the engine overhead fitted to the OTHER policies' "
        "step records (leave one policy out), errors side by side",
    )
    src.add_argument(
        "--overhead",
        help="EngineOverhead JSON (or bench/step_times.py output) to also simulate every policy "
        "with",
    )
    v.add_argument("--out", help="result JSON path (default bench/results/sim_validate-*.json)")
    v.add_argument(
        "--measured-text",
        metavar="REPORT_JSON",
        help="bench/measure_acceptance.py --replay report of the same run's prompts: simulate "
        "the drafts the real pair made on the very texts the engine decoded "
        "(adaspec.sim.measured_text) instead of drawing them from the acceptance model; "
        "--acceptance (default: the report's fitted model) fills what was not measured",
    )
    v.add_argument(
        "--calibrate-on",
        help="policy (e.g. off) whose measured mean TPOT sets one scale factor for the time "
        "model (the machine's current speed); the other policies are then predictions",
    )
    q = sub.add_parser("production")
    q.add_argument("--profile", default="h200-7b-0.5b-synthetic")
    q.add_argument("--traces", default=",".join(WINDOWS))
    q.add_argument("--loads", default="1,4,16")
    q.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    q.add_argument("--oracle-max-k", type=int, default=6)
    q.add_argument("--tpot-slo-ms", type=float, default=40.0)
    q.add_argument("--tpot-budget-ms", type=float, help="default: 0.9 × SLO")
    q.add_argument("--max-batch", type=int, default=256)
    q.add_argument(
        "--window-s",
        type=float,
        default=60.0,
        help="slice length (s at ×1) for the per-slice oracle static K; 0: none",
    )
    q.add_argument("--max-requests", type=int, help="first N requests only (smoke runs)")
    q.add_argument("--tag", default="")
    q.add_argument(
        "--clairvoyant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the clairvoyant drafter (adaspec.sim.oracle), the reference for what "
        "any drafting policy could reach",
    )
    add_prefill_args(q)
    args = p.parse_args(argv)
    try:
        return validate(args) if args.cmd == "validate" else production(args)
    except (TraceError, StepLogError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
