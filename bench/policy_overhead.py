"""Policy decision time per decoding step at batch 1, 16, 64, 256 (goal: ≤ 100 µs at 256).

A "step decision" is everything the backend asks the policy in one step: start(), one
keep_drafting() after each draft pass, verify_lengths() and observe(). Confidences are drawn
from a Beta mix resembling the real pair (MODELS.md: most tokens sure, a tail unsure).

The cost is a few dozen numpy calls per step whatever the batch, so it moves with the machine's
load: the 1-minute load average before and after the run is printed and kept in the JSON.

    python bench/policy_overhead.py [--steps 400] [--max-draft 8]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from _common import print_table, write_json

from adaspec.policy import (
    AcceptanceCalibrator,
    AdaSpecPolicy,
    FixedKPolicy,
    SmartSpecPolicy,
    StepContext,
    StepOutcome,
    StepTimePredictor,
    ThresholdPolicy,
)
from adaspec.policy.base import SpecPolicy
from adaspec.policy.time_model import default_cpu_time_model


def one_step(
    policy: SpecPolicy, ctx: StepContext, src: np.ndarray, acc: np.ndarray
) -> tuple[float, int]:
    """Seconds spent inside policy calls for one step (the backend's own bookkeeping, e.g.
    writing confidences into the matrix, is not the policy's cost and is not counted), and
    the number of draft passes the policy asked for."""
    clock = time.perf_counter
    b = ctx.batch
    conf = np.zeros((b, ctx.max_draft))
    lens = np.zeros(b, dtype=np.int64)
    t0 = clock()
    drafting = policy.start(ctx)
    spent = clock() - t0
    passes = 0
    for j in range(ctx.max_draft):
        if not drafting.any():
            break
        passes += 1
        conf[drafting, j] = src[drafting, j]
        lens[drafting] += 1
        t0 = clock()
        keep = policy.keep_drafting(ctx, conf, lens, drafting)
        spent += clock() - t0
        drafting = drafting & keep
    t0 = clock()
    d = policy.verify_lengths(ctx, conf, lens)
    spent += clock() - t0
    outcome = StepOutcome(
        conf=conf,
        verified_lens=d.lens,
        accepted=np.minimum(acc, d.lens),
        context_lens=ctx.context_lens,
        drafted_lens=lens,
        draft_time_s=0.01,
        verify_time_s=0.02,
    )
    t0 = clock()
    policy.observe(outcome)
    return spent + clock() - t0, passes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--max-draft", type=int, default=8)
    ap.add_argument("--batches", default="1,16,64,256")
    args = ap.parse_args()
    if args.steps < 5:
        ap.error("--steps must be at least 5")
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()[0]
    batches = [int(x) for x in args.batches.split(",")]
    rows, results = [], []
    # a GPU-like time model (draft pass ≪ verification) so AdaSpec really drafts deep
    gpu = default_cpu_time_model().model_copy(
        update={
            "draft": default_cpu_time_model().draft.model_copy(
                update={"intercept_ms": 2.0, "per_row_ms": 0.01, "per_ctx_ktoken_ms": 0.002}
            ),
            "verify": default_cpu_time_model().verify.model_copy(
                update={
                    "intercept_ms": 20.0,
                    "per_row_ms": 0.05,
                    "per_token_ms": 0.02,
                    "per_ctx_ktoken_ms": 0.004,
                }
            ),
        }
    )
    for b in batches:
        policies: dict[str, SpecPolicy] = {
            "adaspec": AdaSpecPolicy(StepTimePredictor(gpu), AcceptanceCalibrator.identity()),
            "adaspec+guard": AdaSpecPolicy(StepTimePredictor(gpu), AcceptanceCalibrator.identity()),
            "fixed-3": FixedKPolicy(3),
            "smartspec": SmartSpecPolicy(StepTimePredictor(gpu)),
            "threshold": ThresholdPolicy(0.6),
        }
        for name, pol in policies.items():
            budget = 0.05 if name == "adaspec+guard" else None
            times, passes = [], []
            for _ in range(args.steps):
                ctx_lens = rng.integers(64, 2048, size=b).astype(np.int64)
                ctx = StepContext(ctx_lens, args.max_draft, budget)
                src = np.where(
                    rng.random((b, args.max_draft)) < 0.8,
                    rng.beta(8, 1, (b, args.max_draft)),
                    rng.beta(1, 2, (b, args.max_draft)),
                )
                acc = rng.geometric(0.2, size=b) - 1
                spent, n = one_step(pol, ctx, src, acc)
                times.append(spent)
                passes.append(n)
            warm = min(20, args.steps // 5)  # first steps warm caches and the calibrator
            t = np.array(times[warm:]) * 1e6
            mean_passes = float(np.mean(passes))
            rows.append([b, name, float(np.median(t)), float(np.percentile(t, 90)), mean_passes])
            results.append(
                {
                    "batch": b,
                    "policy": name,
                    "median_us": float(np.median(t)),
                    "p90_us": float(np.percentile(t, 90)),
                    "draft_passes": mean_passes,
                }
            )
    load_after = os.getloadavg()[0]
    print_table(["batch", "policy", "median µs/step", "p90 µs/step", "draft passes"], rows)
    print(f"\nload average (1 min): {load_before:.2f} before, {load_after:.2f} after")
    path = write_json(
        "policy_overhead",
        {
            "steps": args.steps,
            "max_draft": args.max_draft,
            "load_avg_1min": {"before": load_before, "after": load_after},
            "results": results,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
