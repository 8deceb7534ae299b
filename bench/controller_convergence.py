"""Outer-loop convergence: control ticks from an SLO breach until P90 TPOT is back under the SLO.

The controller is the real `specserve.control.step` (the operator's code, fake clock); the
plant is a simulated engine fleet, a model of what the engine's inner loop does with a budget:

  per-replica concurrency c = load / replicas
  plain decoding:        t_plain(c) = a + β·c                         (ms per token)
  free speculation:      t_spec(c)  = t_plain(c) · (s0 + s1·c)        (goodput-optimal K;
                         faster than plain at low load, slower past the crossover c*)
  the SLO guard keeps the *predicted* time per token under the budget b; the time model is
  off by a factor `bias` (true = bias · predicted), and plain decoding is the floor:
      t = t_spec                                   if t_spec ≤ t_plain
      t = max(t_plain, min(t_spec, bias · b))      otherwise
  P90 over requests = t · p90_spread; Prometheus sees it through the rate window, so the
  observation is the mean of the last window/tick ticks (lag) times lognormal(σ) noise;
  the engines' specserve_slo_infeasible gauge = t_plain / bias > b (the guard's own view);
  guard refusals > 0 exactly when the budget binds (t_spec > t_plain and bias·b < t_spec).

Scenarios (each over many seeds):
  bias      — the time model underestimates by 40 %: the budget must come down, no scaling;
  load-step — per-fleet load doubles: tightening is not enough, one replica is added;
  steady    — P90 sits near 0.9×SLO with noise for an hour: counts needless policy changes
              (what hysteresis and dwell prevent), with and without them.

    python bench/controller_convergence.py [--seeds 50] [--tick 15]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from _common import print_table, write_json

from adaspec.contract import Policy
from specserve import control
from specserve.api import SpecServiceSpec

SLO_MS = 50.0


@dataclass
class Plant:
    a: float = 15.0
    beta: float = 1.0
    s0: float = 0.6
    s1: float = 0.03
    bias: float = 1.0
    p90_spread: float = 1.15
    noise: float = 0.04

    def per_token_ms(self, load: float, replicas: int, budget: float) -> tuple[float, bool, bool]:
        """(ms per token, plain decoding breaks the budget, the guard refuses drafts)."""
        c = load / max(1, replicas)
        plain = self.a + self.beta * c
        spec = plain * (self.s0 + self.s1 * c)
        t = spec if spec <= plain else max(plain, min(spec, self.bias * budget))
        infeasible = plain / self.bias > budget
        refusing = spec > plain and self.bias * budget < spec
        return t, infeasible, refusing

    def p90(self, t: float) -> float:
        return t * self.p90_spread


@dataclass
class Scenario:
    name: str
    plant: Plant
    load_before: float
    load_after: float
    replicas: int
    autoscaling: bool
    ticks: int = 40
    cfg: control.ControllerConfig = field(default_factory=control.ControllerConfig)


def spec_for(sc: Scenario) -> SpecServiceSpec:
    return SpecServiceSpec.model_validate(
        {
            "targetModel": {"name": "t"},
            "draftModel": {"name": "d"},
            "slo": {"tpotMs": SLO_MS},
            "speculation": {"maxDraftTokens": 8},
            "replicas": sc.replicas,
            "autoscaling": {"enabled": sc.autoscaling, "minReplicas": 1, "maxReplicas": 6},
        }
    )


class Window:
    """What histogram_quantile over rate(...[window]) sees: the recent ticks pooled."""

    def __init__(self, ticks: int, plant: Plant, rng: random.Random) -> None:
        self.values: deque[float] = deque(maxlen=max(1, ticks))
        self.plant, self.noise, self.rng = plant, plant.noise, rng

    def observe(self, p90: float) -> float:
        self.values.append(p90)
        return statistics.fmean(self.values) * math.exp(self.rng.gauss(0.0, self.noise))


def run(sc: Scenario, seed: int, tick_s: float, window_s: float) -> dict[str, Any]:
    rng = random.Random(seed)
    win = Window(round(window_s / tick_s), sc.plant, rng)
    spec = spec_for(sc)
    policy = Policy(generation=1, tpot_slo_ms=SLO_MS, tpot_budget_ms=SLO_MS, max_draft_tokens=8)
    replicas, memory = sc.replicas, control.Memory()
    now = 0.0
    # warm-up at the old load: the controller settles before the disturbance
    for _ in range(20):
        t, inf, ref = sc.plant.per_token_ms(sc.load_before, replicas, policy.tpot_budget_ms)
        d = control.step(spec=spec, policy=policy, replicas=replicas,
                         obs=_obs(t, inf, ref, win),
                         memory=memory, now=now, cfg=sc.cfg)  # fmt: skip
        policy, memory, replicas = d.policy, d.memory, d.replicas
        now += tick_s
    trace: list[dict[str, Any]] = []
    first_breach = first_under = settled = None
    changes = 0
    for i in range(sc.ticks):
        t, inf, ref = sc.plant.per_token_ms(sc.load_after, replicas, policy.tpot_budget_ms)
        o = _obs(t, inf, ref, win)
        assert o.tpot_ms is not None
        if o.tpot_ms > SLO_MS and first_breach is None:
            first_breach = i
        if first_breach is not None and first_under is None and o.tpot_ms <= SLO_MS:
            first_under = i
        if first_under is not None and settled is None and i >= first_under + 2:
            window = [x["p90"] for x in trace[-2:]] + [o.tpot_ms]
            settled = i - 2 if all(v <= SLO_MS for v in window) else None
        d = control.step(spec=spec, policy=policy, replicas=replicas, obs=o, memory=memory,
                         now=now, cfg=sc.cfg)  # fmt: skip
        changes += int(d.policy_changed) + int(d.replicas != replicas)
        trace.append({"tick": i, "p90": round(o.tpot_ms, 2), "budget": policy.tpot_budget_ms,
                      "k": policy.max_draft_tokens, "replicas": replicas})  # fmt: skip
        policy, memory, replicas = d.policy, d.memory, d.replicas
        now += tick_s
    return {
        "seed": seed,
        "breach_tick": first_breach,
        "ticks_to_under": None
        if first_breach is None or first_under is None
        else first_under - first_breach,
        "ticks_to_settled": None
        if first_breach is None or settled is None
        else settled - first_breach,
        "changes": changes,
        "final": trace[-1],
        "trace": trace if seed == 0 else None,
    }


def _obs(t: float, infeasible: bool, refusing: bool, win: Window) -> control.Observation:
    p90 = win.observe(win.plant.p90(t))
    return control.Observation(
        tpot_ms=p90, tpot_p90_ms=p90, request_rate=5.0, acceptance_rate=0.7,
        mean_draft_length=2.0, infeasible=infeasible, sample_age_s=5.0,
        guard_refusal_rate=3.0 if refusing else 0.0,
    )  # fmt: skip


def scenarios() -> list[Scenario]:
    no_hyst = control.ControllerConfig(
        band_low=0.89, target_ratio=0.9, band_high=0.9, tighten_dwell_s=0.0, relax_dwell_s=0.0
    )
    return [
        Scenario("bias", Plant(bias=1.4), load_before=0.0, load_after=50.0, replicas=2,
                 autoscaling=False),
        Scenario("load-step", Plant(), load_before=40.0, load_after=90.0, replicas=2,
                 autoscaling=True),
        Scenario("steady", Plant(bias=1.0), load_before=50.0, load_after=50.0, replicas=2,
                 autoscaling=False, ticks=240),
        Scenario("steady/no-hysteresis", Plant(bias=1.0), load_before=50.0, load_after=50.0,
                 replicas=2, autoscaling=False, ticks=240, cfg=no_hyst),
    ]  # fmt: skip


def _stat(values: list[int | None]) -> tuple[str, str, int]:
    got = [v for v in values if v is not None]
    if not got:
        return "-", "-", len(values)
    return f"{statistics.median(got):g}", str(max(got)), len(values) - len(got)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--tick", type=float, default=15.0, help="control interval, seconds")
    ap.add_argument(
        "--window", type=float, default=60.0, help="PromQL rate window, seconds (operator: 1m)"
    )
    args = ap.parse_args()
    rows, results = [], {}
    for sc in scenarios():
        runs = [run(sc, seed, args.tick, args.window) for seed in range(args.seeds)]
        under = _stat([r["ticks_to_under"] for r in runs])
        settled = _stat([r["ticks_to_settled"] for r in runs])
        finals = [r["final"] for r in runs]
        changes = [r["changes"] for r in runs]
        rows.append([
            sc.name, under[0], under[1], settled[0], settled[1], under[2],
            f"{statistics.median(changes):g}",
            f"{statistics.median(f['p90'] for f in finals):.1f}",
            f"{statistics.median(f['budget'] for f in finals):.1f}",
            f"{statistics.median(f['k'] for f in finals):g}",
            f"{statistics.median(f['replicas'] for f in finals):g}",
        ])  # fmt: skip
        results[sc.name] = {
            "plant": vars(sc.plant),
            "load_before": sc.load_before,
            "load_after": sc.load_after,
            "ticks": sc.ticks,
            "config": vars(sc.cfg),
            "runs": runs,
        }
    print(f"SLO {SLO_MS:g} ms, control tick {args.tick:g} s, rate window {args.window:g} s, "
          f"{args.seeds} seeds; "
          "ticks counted from the first breached tick")  # fmt: skip
    print_table(
        ["scenario", "to<SLO med", "max", "settled med", "max", "never", "changes",
         "final P90", "budget", "K", "replicas"],
        rows,
    )  # fmt: skip
    path = write_json(
        "controller_convergence",
        {
            "slo_ms": SLO_MS,
            "tick_s": args.tick,
            "window_s": args.window,
            "seeds": args.seeds,
            "scenarios": results,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
