"""Request rate from light load to past saturation: where does speculation stop paying, and does
AdaSpec track the best choice at every load?

    python bench/load_sweep.py                                # sim, H200 ESTIMATE profile
    python bench/load_sweep.py --engine real --rates 0.2,0.5,1.0 --requests 6   # short CPU sweep

Arrivals are Poisson at each rate (seeded); (prompt, output) pairs are drawn from `--lengths-from`
(a named trace, with the paper's caps). Sim: every policy plus the oracle static K (best of off
and fixed 1…`--oracle-max-k` at that rate) and the clairvoyant drafter (adaspec.sim.oracle:
told each request's accepted run before every step, it never wastes a draft; the reference for
what drafting could reach, "/clairv." and AdaSpec ÷ clairvoyant). Real: each rate is replayed
against fresh `adaspec serve` processes per policy (same client and scaling as
compare_policies). Prints a table, writes bench/results/load_sweep-<engine>.json and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS, print_table, write_json
from replay.runs import (
    DEFAULT_POLICIES,
    add_prefill_args,
    check_kinds,
    policy_doc,
    real_runs,
    sim_config,
    sim_runs,
)

from adaspec.sim import (
    ScaleSpec,
    Trace,
    TraceError,
    load_builtin_profile,
    load_trace,
    scale_trace,
)
from adaspec.sim.oracle import run_clairvoyant
from adaspec.sim.results import Summary
from adaspec.sim.traces import with_lengths_from

DEFAULT_TOKENIZER = Path.home() / ".cache/specserve/models/qwen2.5-coder-0.5b-instruct"
CLAIRVOYANT = "clairvoyant"


def sweep_trace(source: Trace, rate: float, n: int, seed: int) -> Trace:
    rng = np.random.default_rng([seed, 0x5EE9, int(rate * 1000)])
    arr = np.cumsum(rng.exponential(1.0 / rate, size=n))
    return with_lengths_from(f"poisson-{rate:g}", arr - arr[0], source, seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--engine", choices=("sim", "real"), default="sim")
    p.add_argument("--rates", default="2,5,10,20,40,80,160", help="requests per second")
    p.add_argument("--requests", type=int, default=600, help="requests per rate")
    p.add_argument("--lengths-from", default="azure-conv")
    p.add_argument("--trace-dir", type=Path, default=Path("/work/shared/traces"))
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    p.add_argument("--oracle-max-k", type=int, default=6, help="sim only")
    p.add_argument(
        "--clairvoyant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sim only: also run the clairvoyant drafter (the reference)",
    )
    p.add_argument("--profile", default="h200-7b-0.5b-synthetic")
    p.add_argument("--tpot-slo-ms", type=float, default=40.0)
    p.add_argument("--tpot-budget-ms", type=float, help="default: 0.9 × SLO")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--noise", type=float, default=0.05)
    add_prefill_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cpu-lengths",
        action="store_true",
        help="scale lengths for the CPU pair (prompts ×0.05 in [16,128], outputs ×0.25 in [8,32])",
    )
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="real: or 'words'")
    p.add_argument("--server-arg", action="append", default=[], help="real: extra serve argument")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    try:
        kinds = [k for k in args.policies.split(",") if k]
        check_kinds(kinds)
        rates = [float(r) for r in args.rates.split(",")]
        source = load_trace(args.lengths_from, args.trace_dir, seed=args.seed)
        cfg = sim_config(args, max_batch=args.max_batch, noise_sigma=args.noise, seed=args.seed)
    except (TraceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    budget = args.tpot_budget_ms or 0.9 * args.tpot_slo_ms
    oracle = [f"fixed-{k}" for k in range(1, args.oracle_max_k + 1)] if args.engine == "sim" else []
    all_kinds = list(dict.fromkeys([*kinds, *oracle]))
    static = [k for k in all_kinds if k == "off" or k.startswith("fixed-")]
    out: dict[str, Any] = {}
    rows: list[list[object]] = []
    for rate in rates:
        tr = sweep_trace(source, rate, args.requests, args.seed)
        if args.cpu_lengths or args.engine == "real":
            tr = scale_trace(
                tr,
                ScaleSpec(prompt_scale=0.05, output_scale=0.25, min_prompt=16, max_prompt=128,
                          min_output=8, max_output=32, seed=args.seed),
            )  # fmt: skip
        t0 = time.monotonic()
        if args.engine == "sim":
            profile = load_builtin_profile(args.profile)
            runs = sim_runs(tr, profile, all_kinds, args.tpot_slo_ms, budget, cfg)
        else:
            from replay.prompts import PromptBuilder, load_prompt_set, tokenizer_from

            builder = PromptBuilder(tokenizer_from(args.tokenizer), load_prompt_set(), args.seed)
            runs = real_runs(
                tr, kinds, args.tpot_slo_ms, budget, 1, builder, RESULTS / "logs",
                ["--max-batch", str(args.max_batch), *args.server_arg],
            )  # fmt: skip
        sums = {k: r.summary for k, r in runs.items()}
        ref: Summary | None = None
        if args.engine == "sim" and args.clairvoyant:
            doc = policy_doc("adaptive", args.tpot_slo_ms, budget)
            ref = run_clairvoyant(tr, profile, doc, config=cfg).summary(args.tpot_slo_ms / 1e3)
            sums[CLAIRVOYANT] = ref
        best = max(static, key=lambda k: sums[k].goodput_tok_s) if static else None
        out[f"{rate:g}"] = {
            "rate_req_s": rate,
            "best_static": best,
            "policies": {k: s.model_dump() for k, s in sums.items()},
            "wall_s": time.monotonic() - t0,
        }
        if ref is not None and "adaptive" in sums:
            out[f"{rate:g}"]["adaptive_vs_clairvoyant"] = _vs_reference(sums["adaptive"], ref)
        for k in [*kinds, CLAIRVOYANT] if ref is not None else kinds:
            s = sums[k]
            vs_best = s.goodput_tok_s / sums[best].goodput_tok_s if best else float("nan")
            vs_off = s.goodput_tok_s / sums["off"].goodput_tok_s if "off" in sums else float("nan")
            vs_ref = s.goodput_tok_s / ref.goodput_tok_s if ref is not None else float("nan")
            rows.append(
                [rate, k, s.tpot_p90_ms, s.tpot_mean_ms, s.slo_attainment, s.goodput_tok_s,
                 s.throughput_tok_s, s.mean_spec_len if s.mean_spec_len is not None else "-",
                 vs_best, vs_off, vs_ref]
            )  # fmt: skip
        line = f"rate {rate:g}: best static {best}"
        if "adaptive_vs_clairvoyant" in out[f"{rate:g}"]:
            r = out[f"{rate:g}"]["adaptive_vs_clairvoyant"]
            line += f", AdaSpec/clairvoyant goodput {r['goodput']:.3f} TPOT {r['tpot_mean']:.3f}"
        print(f"{line} ({time.monotonic() - t0:.0f} s)", flush=True)
    print_table(
        ["rate", "policy", "P90 ms", "mean ms", "SLO att.", "goodput", "thruput", "spec",
         "/best static", "/off", "/clairv."],
        rows,
    )  # fmt: skip
    name = f"load_sweep-{args.engine}{args.tag}"
    path = write_json(
        name,
        {"engine": args.engine, "profile": args.profile if args.engine == "sim" else None,
         "tpot_slo_ms": args.tpot_slo_ms, "tpot_budget_ms": budget, "max_batch": args.max_batch,
         "prefill_chunk_tokens": cfg.prefill_chunk_tokens if args.engine == "sim" else None,
         "prefill_min_chunk": cfg.prefill_min_chunk if args.engine == "sim" else None,
         "requests_per_rate": args.requests, "lengths_from": args.lengths_from,
         "noise_sigma": args.noise, "seed": args.seed, "rates": out},
    )  # fmt: skip
    png = _plot(out, kinds, RESULTS / f"{name}.png", args.tpot_slo_ms)
    print(f"wrote {path} and {png}")
    return 0


def _vs_reference(s: Summary, ref: Summary) -> dict[str, float]:
    """How close `s` gets to the clairvoyant reference: goodput and throughput as a share of the
    reference's, TPOT as the reference's over `s`'s (1 = as good, < 1 = slower)."""
    return {
        "goodput": s.goodput_tok_s / ref.goodput_tok_s,
        "throughput": s.throughput_tok_s / ref.throughput_tok_s,
        "tpot_mean": ref.tpot_mean_ms / s.tpot_mean_ms,
        "tpot_p90": ref.tpot_p90_ms / s.tpot_p90_ms,
    }


def _plot(out: dict[str, Any], kinds: list[str], path: Path, slo_ms: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [v["rate_req_s"] for v in out.values()]
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.2))
    for k in kinds:
        style = {"lw": 2.8, "color": "black"} if k == "adaptive" else {"lw": 1}
        good = [v["policies"][k]["goodput_tok_s"] for v in out.values()]
        p90 = [v["policies"][k]["tpot_p90_ms"] for v in out.values()]
        off = [v["policies"]["off"]["goodput_tok_s"] if "off" in v["policies"] else np.nan
               for v in out.values()]  # fmt: skip
        axes[0].plot(rates, good, marker="o", label=k, **style)
        axes[1].plot(rates, p90, marker="o", label=k, **style)
        axes[2].plot(rates, np.asarray(good) / np.asarray(off), marker="o", label=k, **style)
    if all(CLAIRVOYANT in v["policies"] for v in out.values()):
        good = [v["policies"][CLAIRVOYANT]["goodput_tok_s"] for v in out.values()]
        p90 = [v["policies"][CLAIRVOYANT]["tpot_p90_ms"] for v in out.values()]
        off = [v["policies"]["off"]["goodput_tok_s"] if "off" in v["policies"] else np.nan
               for v in out.values()]  # fmt: skip
        ref = {"color": "black", "ls": ":", "lw": 2, "label": "clairvoyant (reference)"}
        axes[0].plot(rates, good, **ref)
        axes[1].plot(rates, p90, **ref)
        axes[2].plot(rates, np.asarray(good) / np.asarray(off), **ref)
    if all("adaptive_vs_clairvoyant" in v for v in out.values()):
        vs = [v["adaptive_vs_clairvoyant"] for v in out.values()]
        axes[3].plot(rates, [r["goodput"] for r in vs], marker="o", label="goodput")
        axes[3].plot(rates, [r["tpot_mean"] for r in vs], marker="o", label="mean TPOT (ref/ada)")
        axes[3].plot(rates, [r["tpot_p90"] for r in vs], marker="o", label="P90 TPOT (ref/ada)")
        axes[3].axhline(1.0, color="k", lw=0.8)
        axes[3].legend(fontsize=7)
    axes[3].set_title("AdaSpec ÷ clairvoyant (1: reaches the reference)")
    if all(v["best_static"] for v in out.values()):
        best = [v["policies"][v["best_static"]]["goodput_tok_s"] for v in out.values()]
        axes[0].plot(rates, best, color="gray", ls="--", lw=2, label="best static K")
    axes[1].axhline(slo_ms, color="tab:blue", ls=":", label="SLO")
    axes[2].axhline(1.0, color="k", lw=0.8)
    axes[0].set_title("goodput (tok/s)")
    axes[1].set_title("P90 TPOT (ms)")
    axes[2].set_title("goodput / off (>1: speculation pays)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("request rate (req/s)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
