"""Measure the real pair's per-request (confidence, accepted) sequences and fit the simulator's
AcceptanceModel (confidence histogram, P(accept | confidence), within-request correlation, and
the off-path shift: how sure the draft stays after its first rejected token in a step).

    python bench/measure_acceptance.py [--draft-len 8] [--max-new-tokens 64] [--prompts 16]
    python bench/measure_acceptance.py --tiny        # random tiny pair (seconds; for CI smoke)
    python bench/measure_acceptance.py --replay bench/results/compare_policies-real-X.json
    python bench/measure_acceptance.py --refit bench/results/measure_acceptance.json  # no models

`--replay` measures on the prompts a real comparison run sent: the same scaled trace (rebuilt
from the run's JSON), the same seeded corpus windows sent as raw token ids (no chat template)
and the same output lengths, request i for i < `--prompts` (cycling the trace's lengths past
its end). Raw corpus windows are harder for the draft than chat prompts, so a simulator
validated against such a run needs this model, not the chat-prompt one.

Each prompt of bench/replay/prompt_set.json (chat template applied when the tokenizer has one)
is decoded greedily with K=`--draft-len` drafts per step through adaspec.profile.measure
(one request at a time, so observations stay grouped by request). Every step drafts
`--draft-len` tokens, so the drafts after a rejection (off-path, up to that depth) are recorded
too: measure with the largest draft length the policies use (max_draft) so that the off-path
shift is fitted where a policy would meet it. Writes `--out` (an AcceptanceModel; pass it to the
simulator with `--acceptance`) and a report (`--report`: the raw per-step observations, so
`--refit` can fit again without the models), and prints per-position acceptance and what a
confidence-threshold policy would see along a step, measured vs drawn by the fitted model
(adaspec.sim.fit.step_statistics; the model side replays the same measurement on 64 copies of
the requests).
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

from adaspec.sim.fit import (
    ObservedStep,
    fit_acceptance,
    fit_acceptance_steps,
    sampled_steps,
    step_statistics,
)
from adaspec.sim.traces import TRACE_DIR_DEFAULT as _TRACE_DIR

_TOKENIZER = str(Path.home() / ".cache/specserve/models/qwen2.5-coder-0.5b-instruct")


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


def _replay_prompts(run_json: Path, n: int) -> tuple[list[list[int]], list[int], frozenset[int]]:
    """The token-id prompts and output lengths request 0..n-1 of a real run got. The replay
    sends ignore_eos, so no EOS stops these (the empty EOS set)."""
    from replay.prompts import PromptBuilder, load_prompt_set, tokenizer_from

    from adaspec.sim import ScaleSpec, load_trace, scale_trace

    m: dict[str, Any] = json.loads(run_json.read_text(encoding="utf-8"))
    if m.get("engine") != "real":
        raise ValueError("not a compare_policies --engine real result")
    trace = load_trace(m["trace"], Path(m.get("trace_dir") or _TRACE_DIR), seed=m["seed"])
    if m.get("scale"):
        trace = scale_trace(trace, ScaleSpec(**m["scale"]))
    tokenizer = tokenizer_from(m.get("tokenizer") or _TOKENIZER)
    builder = PromptBuilder(tokenizer, load_prompt_set(), m["seed"])
    k = len(trace)
    prompts = [builder.token_ids(i, int(trace.prompt_len[i % k])) for i in range(n)]
    return prompts, [int(trace.output_len[i % k]) for i in range(n)], frozenset()


def _measure(args: argparse.Namespace) -> list[list[ObservedStep]] | str:
    """Per request, the steps of a fixed-K greedy run of the pair; a string is an error."""
    from adaspec.backends.torch.runner import ModelRunner
    from adaspec.profile.measure import measure_acceptance

    target, draft, tok = _pair(args)
    texts = load_prompt_set()[: args.prompts]
    out_lens = [args.max_new_tokens] * args.prompts
    eos: frozenset[int] = frozenset()
    if args.replay:
        if tok is None:
            return "--replay needs the real pair (not --tiny)"
        try:
            prompts, out_lens, eos = _replay_prompts(Path(args.replay), args.prompts)
        except (OSError, ValueError, KeyError) as e:
            return f"--replay {args.replay}: {e}"
    elif tok is None:
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, 90, size=12).tolist() for _ in texts]
    else:
        prompts = [
            tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
            for t in texts
        ]
        prompts = [list(x["input_ids"]) if isinstance(x, dict) else list(x) for x in prompts]
        eos = frozenset([tok.eos_token_id] if tok.eos_token_id is not None else [])
    max_len = max(len(x) for x in prompts) + max(out_lens) + args.draft_len + 4
    t_run = ModelRunner(target, 1, max_len)
    d_run = ModelRunner(draft, 1, max_len)
    out: list[list[ObservedStep]] = []
    for n, (ids, n_out) in enumerate(zip(prompts, out_lens, strict=True)):
        print(f"  prompt {n + 1}/{len(prompts)}: {len(ids)} tokens, {n_out} new", flush=True)
        run = measure_acceptance(t_run, d_run, [ids], args.draft_len, n_out, eos_ids=eos)
        out.append(
            [ObservedStep(st.on_confidence, st.on_accepted, st.off_confidence) for st in run.steps]
        )
    return out


def _load_steps(report: Path) -> tuple[list[list[ObservedStep]], str]:
    """The steps of an earlier report and what they were measured on."""
    r: dict[str, Any] = json.loads(report.read_text(encoding="utf-8"))
    if "steps" not in r:
        raise ValueError("no 'steps' (a report of this script from before off-path recording?)")
    steps = [
        [ObservedStep(st["on_conf"], [bool(a) for a in st["on_acc"]], st["off_conf"]) for st in req]
        for req in r["steps"]
    ]
    return steps, f"{r.get('measured_on', 'measured')}, refitted from {report.name}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default="default-target")
    p.add_argument("--draft", default="default-draft")
    p.add_argument("--draft-len", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--tiny", action="store_true", help="tiny random pair instead of the real one")
    p.add_argument(
        "--replay",
        metavar="RUN_JSON",
        help="measure on the prompts of this compare_policies --engine real run (see above)",
    )
    p.add_argument(
        "--refit",
        metavar="REPORT_JSON",
        help="fit again from the steps of an earlier --report (no models are loaded)",
    )
    p.add_argument("--out", default=str(RESULTS / "acceptance_model.json"))
    p.add_argument(
        "--report",
        help="where the raw per-step observations + summary go "
        "(default: bench/results/measure_acceptance[-tiny].json)",
    )
    args = p.parse_args(argv)
    if args.draft_len < 1 or args.max_new_tokens < 2 or args.prompts < 1:
        print("error: --draft-len >= 1, --max-new-tokens >= 2, --prompts >= 1", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    if args.refit:
        try:
            steps, source = _load_steps(Path(args.refit))
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: --refit {args.refit}: {e}", file=sys.stderr)
            return 2
    else:
        got = _measure(args)
        if isinstance(got, str):
            print(f"error: {got}", file=sys.stderr)
            return 2
        steps = got
        source = f"measured: {args.target} / {args.draft}"
        if args.replay:
            source += f" on the replayed prompts of {Path(args.replay).name}"
    draft_len = max(len(st.on_confidence) + len(st.off_confidence) for req in steps for st in req)
    try:
        if any(st.off_confidence for req in steps for st in req):
            model = fit_acceptance_steps(steps, source=source)
        else:
            print("note: no off-path drafts (draft length 1?): offpath_shift keeps its default")
            on_path = [
                ([c for st in req for c in st.on_confidence],
                 [bool(a) for st in req for a in st.on_accepted])
                for req in steps
            ]  # fmt: skip
            model = fit_acceptance(on_path, source=source)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(model.model_dump_json(indent=1) + "\n", encoding="utf-8")

    pos_hits, pos_tries = np.zeros(draft_len), np.zeros(draft_len)
    for req in steps:
        for st in req:
            for j, a in enumerate(st.on_accepted):
                pos_tries[j] += 1
                pos_hits[j] += a
    per_pos = (pos_hits / np.maximum(pos_tries, 1)).tolist()
    print_table(
        ["draft position", "P(accept | all before accepted)", "observations"],
        [[j + 1, per_pos[j], int(pos_tries[j])] for j in range(draft_len)],
    )
    n_outs = [sum(sum(st.on_accepted) + 1 for st in req) for req in steps]
    measured = step_statistics(steps)
    drawn = step_statistics(sampled_steps(model, n_outs, draft_len, replicas=64))
    print_table(
        ["along a step (threshold 0.6)", "measured", "fitted model"],
        [[k, measured[k], drawn[k]] for k in measured],
    )
    print(
        f"mean acceptance {model.mean_acceptance:.3f}; request_sigma {model.request_sigma:.2f}, "
        f"local_sigma {model.local_sigma:.2f}, local_len {model.local_len:.1f}, offpath_shift "
        f"{model.offpath_shift:.2f}; wrote {args.out} ({time.monotonic() - t0:.0f} s)"
    )
    raw = [
        [
            {"on_conf": list(st.on_confidence), "on_acc": [bool(a) for a in st.on_accepted],
             "off_conf": list(st.off_confidence)}
            for st in req
        ]
        for req in steps
    ]  # fmt: skip
    report = {"measured_on": source.split(", refitted from")[0],
              "model": json.loads(model.model_dump_json()), "per_position_accept": per_pos,
              "draft_len": draft_len, "max_new_tokens": args.max_new_tokens,
              "step_statistics": {"measured": measured, "fitted_model": drawn},
              "steps": raw}  # fmt: skip
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report) + "\n", encoding="utf-8")
    else:
        write_json("measure_acceptance" + ("-tiny" if args.tiny else ""), report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
