"""Real pair (Qwen2.5-Coder 1.5B target / 0.5B draft), torch backend: off vs fixed K vs adaptive.

For batch 1 and a batch of concurrent requests, every mode decodes the same prompts (greedy,
so all modes emit the same text up to bf16 near-ties); modes are interleaved within each repeat
(order rotated per repeat) so machine-load drift hits them alike. Reported per (batch, mode):
- tokens per target forward: decode tokens ÷ (steps × rows in the step), i.e. what one
  verification pass yields per request (1.0 for plain decoding);
- ms per token: each request's decode wall time ÷ its decode tokens, averaged over requests
  (prefill / first token excluded); tok/s: all decode tokens ÷ wall time of the step loop;
- acceptance (accepted ÷ verified draft tokens) and mean verified draft length per row-step;
- verify ms/step: the target pass's mean time, a load gauge (it does the same work in every
  speculative mode, so large differences between modes mean the machine's load changed).

    python bench/spec_pair.py [--tokens 48] [--repeats 3] [--batches 1 4] [--profile P.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import print_table, write_json

PROMPTS = (
    "Write a Python class implementing an LRU cache with get and put methods.",
    "Write a C function that reverses a string in place, with comments.",
    "Explain how TCP congestion control works, step by step.",
    "Write a Go HTTP handler that returns the current time as JSON.",
    "Write a Python script that finds duplicate files in a directory by hash.",
    "Describe the CAP theorem and give an example for each trade-off.",
    "Write a Rust function that parses a comma-separated list of integers.",
    "Write unit tests with pytest for a function that merges two sorted lists.",
    "Write a TypeScript interface and a function that validates a user object.",
    "Explain the difference between optimistic and pessimistic locking.",
    "Write a Dockerfile for a small Flask application, then explain each line.",
    "Implement binary search in Java and explain its complexity.",
)
MODES = ("off", "fixed", "adaptive")


@dataclass
class RunStats:
    batch: int
    mode: str
    repeat: int
    wall_s: float = 0.0
    steps: int = 0
    draft_passes: int = 0
    row_steps: int = 0
    tokens: int = 0
    verified: int = 0
    accepted: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    tpot_ms: list[float] = field(default_factory=list)


def encode(tok: Any, text: str) -> list[int]:
    chat = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return list(tok.encode(chat, add_special_tokens=False))


def run_once(
    backend: Any,
    policy: Any,
    max_draft: int,
    budget_s: float | None,
    prompts: list[list[int]],
    n_tokens: int,
    stats: RunStats,
) -> list[list[int]]:
    from adaspec.backends.base import SamplingParams, SeqState

    seqs = [
        SeqState(f"b{i}", p, SamplingParams(max_tokens=n_tokens)) for i, p in enumerate(prompts)
    ]
    for s in seqs:
        s.output_ids.append(backend.add(s))
    live = [s for s in seqs if s.output_ids[-1] not in backend.eos_token_ids]
    start = time.perf_counter()
    while live:
        res = backend.step(live, policy, max_draft, budget_s)
        now = time.perf_counter()
        stats.steps += 1
        stats.draft_passes += res.stats.draft_passes
        stats.row_steps += len(live)
        stats.verified += res.stats.verified
        stats.accepted += res.stats.accepted
        stats.draft_s += res.stats.draft_time_s
        stats.verify_s += res.stats.verify_time_s
        for s in list(live):
            for t in res.new_tokens[s.seq_id]:
                if len(s.output_ids) >= n_tokens:
                    break
                s.output_ids.append(t)
                stats.tokens += 1
                if t in backend.eos_token_ids:
                    break
            if len(s.output_ids) >= n_tokens or s.output_ids[-1] in backend.eos_token_ids:
                decode_tokens = len(s.output_ids) - 1
                if decode_tokens > 0:
                    stats.tpot_ms.append((now - start) * 1000.0 / decode_tokens)
                live.remove(s)
    stats.wall_s = time.perf_counter() - start
    for s in seqs:
        backend.remove(s.seq_id)
    return [s.output_ids for s in seqs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48, help="tokens generated per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--fixed-k", type=int, default=3)
    ap.add_argument("--max-draft", type=int, default=8, help="adaptive mode's maxDraftTokens")
    ap.add_argument("--budget-ms", type=float, default=10_000.0, help="TPOT budget (adaptive)")
    ap.add_argument("--profile", help="Profile JSON from `adaspec profile` (default: CPU prior)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaspec.backends.torch import TorchBackend
    from adaspec.contract import Policy, SpecMode, load_profile
    from adaspec.models import RichProgress, resolve_model
    from adaspec.policy.factory import PolicySelector

    profile = load_profile(Path(args.profile)) if args.profile else None  # fail fast
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    progress = RichProgress()
    target_dir = resolve_model(args.target, progress)
    draft_dir = resolve_model(args.draft, progress)
    tok = AutoTokenizer.from_pretrained(str(target_dir))
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=dtype).eval()
    draft = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=dtype).eval()
    max_prompt = max(len(encode(tok, p)) for p in PROMPTS)
    backend = TorchBackend(
        target,
        draft,
        max_batch=max(args.batches),
        max_model_len=max_prompt + args.tokens + args.max_draft + 8,
        dtype=dtype,
    )
    selector = PolicySelector(profile)
    docs = {
        "off": Policy(generation=1, mode=SpecMode.off, tpot_slo_ms=1e4, tpot_budget_ms=1e4),
        "fixed": Policy(
            generation=1,
            mode=SpecMode.fixed,
            tpot_slo_ms=args.budget_ms,
            tpot_budget_ms=args.budget_ms,
            max_draft_tokens=max(args.fixed_k, args.max_draft),
            fixed_draft_tokens=args.fixed_k,
        ),
        "adaptive": Policy(
            generation=1,
            mode=SpecMode.adaptive,
            tpot_slo_ms=args.budget_ms,
            tpot_budget_ms=args.budget_ms,
            max_draft_tokens=args.max_draft,
        ),
    }
    policies = {m: selector.select(d) for m, d in docs.items()}
    encoded = [encode(tok, p) for p in PROMPTS]
    load_before = os.getloadavg()

    print(f"threads={torch.get_num_threads()} dtype={args.dtype} load={load_before}")
    for b in args.batches:  # warm-up (kernels, the adaptive policy's online correction)
        for m in MODES:
            pol, lim = policies[m]
            run_once(backend, pol, lim.max_draft, lim.budget_s, encoded[:b], 8, RunStats(b, m, -1))

    runs: list[RunStats] = []
    mismatches = 0
    for r in range(args.repeats):
        for b in args.batches:
            prompts = [encoded[(r * b + i) % len(encoded)] for i in range(b)]
            order = MODES[r % 3 :] + MODES[: r % 3]
            outputs: dict[str, list[list[int]]] = {}
            for m in order:
                pol, lim = policies[m]
                st = RunStats(b, m, r)
                outputs[m] = run_once(
                    backend, pol, lim.max_draft, lim.budget_s, prompts, args.tokens, st
                )
                runs.append(st)
                print(
                    f"repeat {r} batch {b} {m:8s} {st.wall_s:6.1f}s "
                    f"{st.tokens / st.row_steps:.2f} tok/fwd"
                )
            mismatches += sum(
                outputs[m] != outputs["off"] for m in MODES if m != "off"
            )  # bf16 near-ties can flip a token: counted, not asserted

    rows = []
    summary = []
    off_ms: dict[int, float] = {}
    for b in args.batches:
        for m in MODES:
            rs = [x for x in runs if x.batch == b and x.mode == m]
            tokens = sum(x.tokens for x in rs)
            wall = sum(x.wall_s for x in rs)
            ms_tok = statistics.mean(t for x in rs for t in x.tpot_ms)
            if m == "off":
                off_ms[b] = ms_tok
            verified = sum(x.verified for x in rs)
            item = {
                "batch": b,
                "mode": m,
                "policy": policies[m][0].name,
                "tokens_per_target_forward": tokens / sum(x.row_steps for x in rs),
                "ms_per_token": ms_tok,
                "tokens_per_s": tokens / wall,
                "speedup_vs_off": off_ms[b] / ms_tok,
                "acceptance": (sum(x.accepted for x in rs) / verified) if verified else None,
                "mean_verified_len": verified / sum(x.row_steps for x in rs),
                "draft_share": sum(x.draft_s for x in rs)
                / max(1e-9, sum(x.draft_s + x.verify_s for x in rs)),
                "decode_tokens": tokens,
                "steps": sum(x.steps for x in rs),
                "draft_passes": sum(x.draft_passes for x in rs),
                "target_verify_ms_per_step": 1000.0
                * sum(x.verify_s for x in rs)
                / max(1, sum(x.steps for x in rs)),
            }
            summary.append(item)
            acc = item["acceptance"]
            rows.append(
                [
                    b,
                    m,
                    item["tokens_per_target_forward"],
                    ms_tok,
                    item["tokens_per_s"],
                    item["speedup_vs_off"],
                    "-" if acc is None else f"{acc:.0%}",
                    item["mean_verified_len"],
                    f"{item['draft_share']:.0%}",
                    item["target_verify_ms_per_step"],
                ]
            )
    print()
    print_table(
        [
            "batch",
            "mode",
            "tok/target fwd",
            "ms/token",
            "tok/s",
            "speedup",
            "accept",
            "mean len",
            "draft time",
            "verify ms/step",
        ],
        rows,
    )
    load_after = os.getloadavg()
    print(f"\noutputs differing from plain decoding (bf16 near-ties): {mismatches}")
    print(f"load average before {load_before}, after {load_after} (2 cores shared)")
    path = write_json(
        "spec_pair",
        {
            "config": {
                "tokens": args.tokens,
                "repeats": args.repeats,
                "batches": args.batches,
                "fixed_k": args.fixed_k,
                "max_draft": args.max_draft,
                "budget_ms": args.budget_ms,
                "profile": args.profile,
                "threads": torch.get_num_threads(),
                "dtype": args.dtype,
                "target": args.target,
                "draft": args.draft,
            },
            "load_average": {"before": load_before, "after": load_after},
            "output_mismatches_vs_off": mismatches,
            "summary": summary,
            "runs": [
                {
                    "batch": x.batch,
                    "mode": x.mode,
                    "repeat": x.repeat,
                    "wall_s": x.wall_s,
                    "steps": x.steps,
                    "draft_passes": x.draft_passes,
                    "row_steps": x.row_steps,
                    "tokens": x.tokens,
                    "verified": x.verified,
                    "accepted": x.accepted,
                    "draft_s": x.draft_s,
                    "verify_s": x.verify_s,
                    "tpot_ms": x.tpot_ms,
                }
                for x in runs
            ],
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
