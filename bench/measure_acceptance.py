"""Measure the real pair's per-request (confidence, accepted) sequences and fit the simulator's
AcceptanceModel (confidence histogram, P(accept | confidence), within-request correlation).

    python bench/measure_acceptance.py [--draft-len 4] [--max-new-tokens 64] [--prompts 16]
    python bench/measure_acceptance.py --tiny        # random tiny pair (seconds; for CI smoke)

Each prompt of bench/replay/prompt_set.json (chat template applied when the tokenizer has one)
is decoded greedily with K=`--draft-len` drafts per step through adaspec.profile.measure
(one request at a time, so observations stay grouped by request). Writes
bench/results/acceptance_model.json (an AcceptanceModel; pass it to the simulator with
`--acceptance`) and prints per-position acceptance.
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
from replay.prompts import load_prompt_set

from adaspec.sim.fit import fit_acceptance


def _pair(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(target model, draft model, tokenizer-or-None)."""
    if args.tiny:
        from adaspec.backends.torch.tiny import noisy_copy, tiny_model

        target = tiny_model(seed=0)
        return target, noisy_copy(target, 0.3), None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaspec.models import resolve_model

    t_dir = resolve_model(args.target)
    d_dir = resolve_model(args.draft)
    target = AutoModelForCausalLM.from_pretrained(str(t_dir), dtype=torch.bfloat16).eval()
    draft = AutoModelForCausalLM.from_pretrained(str(d_dir), dtype=torch.bfloat16).eval()
    return target, draft, AutoTokenizer.from_pretrained(str(t_dir))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default="default-target")
    p.add_argument("--draft", default="default-draft")
    p.add_argument("--draft-len", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--tiny", action="store_true", help="tiny random pair instead of the real one")
    p.add_argument("--out", default=str(RESULTS / "acceptance_model.json"))
    args = p.parse_args(argv)
    if args.draft_len < 1 or args.max_new_tokens < 2 or args.prompts < 1:
        print("error: --draft-len >= 1, --max-new-tokens >= 2, --prompts >= 1", file=sys.stderr)
        return 2
    from adaspec.backends.torch.runner import ModelRunner
    from adaspec.profile.measure import measure_acceptance

    t0 = time.monotonic()
    target, draft, tok = _pair(args)
    texts = load_prompt_set()[: args.prompts]
    if tok is None:
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, 90, size=12).tolist() for _ in texts]
        eos: frozenset[int] = frozenset()
    else:
        prompts = [
            tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
            for t in texts
        ]
        prompts = [list(x["input_ids"]) if isinstance(x, dict) else list(x) for x in prompts]
        eos = frozenset([tok.eos_token_id] if tok.eos_token_id is not None else [])
    max_len = max(len(x) for x in prompts) + args.max_new_tokens + args.draft_len + 4
    t_run = ModelRunner(target, 1, max_len)
    d_run = ModelRunner(draft, 1, max_len)
    per_request: list[tuple[list[float], list[bool]]] = []
    pos_hits = np.zeros(args.draft_len)
    pos_tries = np.zeros(args.draft_len)
    for ids in prompts:
        run = measure_acceptance(
            t_run, d_run, [ids], args.draft_len, args.max_new_tokens, eos_ids=eos
        )
        per_request.append((list(run.confidence), list(run.accepted)))
        # per-position acceptance: observations come per step as accepted..., first rejection
        j = 0
        for a in run.accepted:
            pos_tries[j] += 1
            pos_hits[j] += a
            j = j + 1 if a and j + 1 < args.draft_len else 0
    model = fit_acceptance(per_request, source=f"measured: {args.target} / {args.draft}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(model.model_dump_json(indent=1) + "\n", encoding="utf-8")
    per_pos = (pos_hits / np.maximum(pos_tries, 1)).tolist()
    print_table(
        ["draft position", "P(accept | all before accepted)", "observations"],
        [[j + 1, per_pos[j], int(pos_tries[j])] for j in range(args.draft_len)],
    )
    print(
        f"mean acceptance {model.mean_acceptance:.3f}; request_sigma {model.request_sigma:.2f}, "
        f"local_sigma {model.local_sigma:.2f}; wrote {args.out} ({time.monotonic() - t0:.0f} s)"
    )
    write_json(
        "measure_acceptance" + ("-tiny" if args.tiny else ""),
        {"model": json.loads(model.model_dump_json()), "per_position_accept": per_pos,
         "draft_len": args.draft_len, "max_new_tokens": args.max_new_tokens},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
