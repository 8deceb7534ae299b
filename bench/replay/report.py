"""Tables, ratios and plots shared by the benchmark scripts."""

from __future__ import annotations

import math
from pathlib import Path

from adaspec.sim.results import Summary

HEADERS = [
    "policy",
    "P90 TPOT ms",
    "mean TPOT ms",
    "SLO att.",
    "goodput tok/s",
    "thruput tok/s",
    "mean spec",
    "accept",
    "good/bestK",
    "good/off",
    "P90/off",
]


def best_static(summaries: dict[str, Summary]) -> str | None:
    """The fixed-K policy with the highest goodput (ties: lower P90 TPOT)."""
    fixed = [k for k in summaries if k.startswith("fixed-")]
    if not fixed:
        return None
    return max(fixed, key=lambda k: (summaries[k].goodput_tok_s, -summaries[k].tpot_p90_ms))


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else float("nan")


def ratios(summaries: dict[str, Summary]) -> dict[str, dict[str, float]]:
    best = best_static(summaries)
    off = summaries.get("off")
    out: dict[str, dict[str, float]] = {}
    for k, s in summaries.items():
        out[k] = {
            "goodput_vs_best_static": _ratio(s.goodput_tok_s, summaries[best].goodput_tok_s)
            if best
            else float("nan"),
            "goodput_vs_off": _ratio(s.goodput_tok_s, off.goodput_tok_s) if off else float("nan"),
            "throughput_vs_off": _ratio(s.throughput_tok_s, off.throughput_tok_s)
            if off
            else float("nan"),
            "p90_tpot_vs_off": _ratio(s.tpot_p90_ms, off.tpot_p90_ms) if off else float("nan"),
        }
    return out


def table_rows(summaries: dict[str, Summary]) -> list[list[object]]:
    r = ratios(summaries)
    rows: list[list[object]] = []
    for k, s in summaries.items():
        rows.append(
            [
                k,
                s.tpot_p90_ms,
                s.tpot_mean_ms,
                s.slo_attainment,
                s.goodput_tok_s,
                s.throughput_tok_s,
                "-" if s.mean_spec_len is None else s.mean_spec_len,
                "-" if s.acceptance is None else s.acceptance,
                r[k]["goodput_vs_best_static"],
                r[k]["goodput_vs_off"],
                r[k]["p90_tpot_vs_off"],
            ]
        )
    return rows


def bar_plot(summaries: dict[str, Summary], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(summaries)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    panels = [
        ("P90 TPOT (ms)", [summaries[k].tpot_p90_ms for k in kinds]),
        ("SLO attainment", [summaries[k].slo_attainment for k in kinds]),
        ("goodput (tok/s)", [summaries[k].goodput_tok_s for k in kinds]),
        ("throughput (tok/s)", [summaries[k].throughput_tok_s for k in kinds]),
    ]
    colors = ["tab:red" if k == "adaptive" else "tab:gray" for k in kinds]
    for ax, (name, vals) in zip(axes, panels, strict=True):
        ax.bar(kinds, vals, color=colors)
        ax.set_title(name)
        ax.tick_params(axis="x", rotation=45)
    slo = next(iter(summaries.values())).tpot_slo_ms
    axes[0].axhline(slo, color="tab:blue", ls="--", lw=1, label=f"SLO {slo:g} ms")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
