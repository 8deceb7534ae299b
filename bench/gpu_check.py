"""GPU check: the torch backend on CUDA with random-weight 7B/0.5B Qwen2-shaped models.

Why: the lent GPU machine has torch/transformers but no vLLM and no real weights (≤ 64 MiB can be
carried), so this measures what the *shapes* decide — step times, the fitted time model and how
off / fixed K / AdaSpec trade tokens per target forward against step time — while the *content*
(whether a draft token is accepted) comes from a synthetic-acceptance model of the real pair.

Synthetic acceptance (documented model, reused from `adaspec.sim.acceptance`): random weights give
meaningless confidences, so each drafted token's confidence is replaced by a draw from the real
CPU pair's measured distribution (MODELS.md: ~85 % greedy acceptance on chat prompts; confidence
≥ 0.7 → ~98 % accepted, < 0.5 → ~47 %), see `cpu_pair_acceptance()`. Draws are keyed by (request,
output position) with within-request correlation, exactly as the simulator does, so every policy
replays the same "text" (common random numbers). A token is accepted with P(accept | confidence
bin); the first rejected position ends the accepted run, the target's own token follows it.
The draft and target forwards still run for real: only the accept decision and the confidence
the policy sees are synthetic. Not lossless; for timing studies only.

Phases (each prints a timestamp; a time limit skips what no longer fits):
  1. build models (`AutoModelForCausalLM.from_config` on the device, weight init skipped, then
     one fast normal fill), 2. profile the time model over a small grid with
     `adaspec.profile.measure.time_grid` + `adaspec.profile.fit.fit_step_time` (R², MAPE),
  3. closed-loop comparison of off, fixed K and AdaSpec at several batch sizes,
  4. write `profile.json` (adaspec.contract.Profile, loadable by the simulator) and
     `results.json` under --out (default $OUT, else ./gpu_check_out).

Usage: python bench/gpu_check.py --device cuda            (the H200 run, < 8 minutes)
       python bench/gpu_check.py --device cpu --tiny      (tiny shapes; the unit test runs this)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "engine") not in sys.path:  # runnable from a bare checkout (the GPU machine)
    sys.path.insert(0, str(ROOT / "engine"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from adaspec.backends.base import (  # noqa: E402
    PrefillChunks,
    SamplingParams,
    SeqState,
    StepResult,
)
from adaspec.backends.torch.backend import TorchBackend  # noqa: E402
from adaspec.contract import (  # noqa: E402
    AcceptanceCalibration,
    Hardware,
    ModelIdentity,
    Policy,
    Profile,
    SpecMode,
    TimeModel,
)
from adaspec.policy.base import SpecPolicy  # noqa: E402
from adaspec.policy.factory import limits_for, make_policy  # noqa: E402
from adaspec.profile.calibration import calibrate  # noqa: E402
from adaspec.profile.fit import StepSample, features, fit_coefficients, fit_step_time  # noqa: E402
from adaspec.profile.grid import Grid  # noqa: E402
from adaspec.profile.measure import retime_slow_points, time_grid  # noqa: E402
from adaspec.sim.acceptance import (  # noqa: E402
    AcceptanceModel,
    AcceptanceSampler,
    cpu_pair_acceptance,
)

# ----------------------------------------------------------------------------- shapes

TARGET_7B: dict[str, int] = {
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "intermediate_size": 18944,
    "vocab_size": 152064,
}
DRAFT_05B: dict[str, int] = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 152064,
}
TINY_TARGET: dict[str, int] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
}
TINY_DRAFT: dict[str, int] = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 64,
    "vocab_size": 512,
}

FULL_GRID = Grid(
    batch_sizes=(1, 4, 8, 16, 32),
    verify_tokens=(1, 2, 4, 6),
    context_lengths=(128, 512, 1024),
    max_step_tokens=192,
    warmup=3,
    repeats=3,
)
TINY_GRID = Grid(
    batch_sizes=(1, 2),
    verify_tokens=(1, 3),
    context_lengths=(8, 24, 40),
    max_step_tokens=6,
    warmup=1,
    repeats=2,
)


# ----------------------------------------------------------------------------- progress


class Clock:
    """Timestamps relative to the start, and the overall time limit."""

    def __init__(self, limit_s: float) -> None:
        self.t0 = time.monotonic()
        self.limit_s = limit_s

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.limit_s - self.elapsed

    def log(self, msg: str) -> None:
        stamp = datetime.now(UTC).strftime("%H:%M:%S")
        print(f"[gpu_check {stamp} +{self.elapsed:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- models


def build_model(shape: dict[str, int], device: str, dtype: torch.dtype, seed: int) -> Any:
    """A random-weight Qwen2 causal LM built directly on `device`.

    Weight init through transformers is skipped (per-module Python init is the slow part), then
    every parameter gets one fast N(0, 0.02²) fill and the norm weights are set to 1, so the
    activations stay finite (uninitialised memory could hold NaN/inf).
    """
    from transformers import AutoModelForCausalLM, Qwen2Config

    kw: dict[str, Any] = {
        **shape,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    cfg = Qwen2Config(**kw)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: plain init (slower, same result for timing)
        from contextlib import nullcontext as no_init_weights  # type: ignore[assignment]
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


# ----------------------------------------------------------------------------- synthetic backend


@dataclass
class _Synth:
    on: np.ndarray
    """On-path confidence per output position."""
    acc: np.ndarray
    """Whether the target accepts the on-path draft at that position."""
    off: np.ndarray
    """Confidence of a draft token sitting after a rejection (never accepted)."""


class SyntheticBackend(TorchBackend):
    """TorchBackend whose draft confidences and accept decisions come from an AcceptanceModel.

    Uses the backend's public hooks: `confidence_override` replaces the recorded confidence
    after the real draft forward (so timing stays real), `acceptance_override` the decision.
    """

    def __init__(self, target: Any, draft: Any, accept: AcceptanceModel, seed: int, **kw: Any):
        super().__init__(
            target,
            draft,
            acceptance_override=self._forced,
            confidence_override=self._confidences,
            seed=seed,
            **kw,
        )
        self._sampler = AcceptanceSampler(accept, seed)
        self._synth: dict[str, _Synth] = {}
        self._pos: dict[str, int] = {}
        self._order: list[str] = []

    def register(self, seq_id: str, request_index: int, n: int) -> None:
        on, acc, off = self._sampler.draw(request_index, n)
        self._synth[seq_id] = _Synth(on, acc, off)

    def remove(self, seq_id: str) -> None:
        super().remove(seq_id)
        self._synth.pop(seq_id, None)
        self._pos.pop(seq_id, None)

    def step(
        self,
        seqs: list[SeqState],
        policy: SpecPolicy,
        max_draft: int,
        budget_s: float | None,
        prefill: PrefillChunks | None = None,
    ) -> StepResult:
        # Output position of the step's first draft token, per request (the key of the draws).
        self._order = [s.seq_id for s in seqs]
        self._pos = {s.seq_id: len(s.output_ids) for s in seqs}
        return super().step(seqs, policy, max_draft, budget_s, prefill)

    def _confidences(self, seq_ids: list[str], j: int, real: np.ndarray) -> np.ndarray:
        """The synthetic confidence of draft position `j` for each drafting request: its
        on-path draw while every earlier draft of the step was accepted, else an off-path one."""
        out = np.empty(len(seq_ids), dtype=np.float64)
        for n, sid in enumerate(seq_ids):
            s, p0 = self._synth[sid], self._pos[sid]
            p = min(p0 + j, len(s.on) - 1)
            on_path = bool(s.acc[p0:p].all())
            out[n] = s.on[p] if on_path else s.off[p]
        return out

    def _forced(self, conf: np.ndarray, verify: np.ndarray) -> np.ndarray:
        out = np.zeros(len(self._order), dtype=np.int64)
        for i, sid in enumerate(self._order):
            s, p0, v = self._synth[sid], self._pos[sid], int(verify[i])
            window = s.acc[p0 : p0 + v]
            rejected = np.flatnonzero(~window)
            out[i] = int(rejected[0]) if rejected.size else len(window)
        return out


# ----------------------------------------------------------------------------- phases


def profile_phase(
    backend: TorchBackend, grid: Grid, clock: Clock
) -> tuple[TimeModel, dict[str, Any]]:
    """Time draft and verification forwards over `grid`, re-time outliers, fit, report."""
    assert backend.draft is not None
    fits = {}
    report: dict[str, Any] = {}
    for kind, runner, points in (
        ("draft", backend.draft, grid.draft_points()),
        ("verify", backend.target, grid.verify_points()),
    ):
        samples = time_grid(runner, points, grid.warmup, grid.repeats)
        predicted = (features(samples) @ fit_coefficients(samples)).tolist()
        samples, n_again = retime_slow_points(runner, points, samples, predicted, grid.repeats)
        model = fit_step_time(samples)
        fits[kind] = model
        assert model.fit is not None
        report[kind] = {
            "points": len(points),
            "retimed": n_again,
            "model": model.model_dump(by_alias=True, exclude_none=True),
            "samples": [_sample_row(s) for s in samples],
        }
        clock.log(
            f"{kind:>6}: {model.intercept_ms:.2f} ms + {model.per_row_ms:.3f}/row + "
            f"{model.per_token_ms:.4f}/token + {model.per_ctx_ktoken_ms:.4f}/ctx-ktoken  "
            f"(R² {model.fit.r2:.3f}, MAPE {model.fit.mape:.1%} on {model.fit.n_test} held out; "
            f"{len(points)} points, {n_again} re-timed)"
        )
    return TimeModel(draft=fits["draft"], verify=fits["verify"]), report


def _sample_row(s: StepSample) -> dict[str, Any]:
    return {"batch": s.rows, "q": s.q_lens[0], "ctx": s.ctx_lens[0], "ms": round(s.time_ms, 3)}


def synthetic_calibration(accept: AcceptanceModel, seed: int) -> AcceptanceCalibration:
    """The calibration a profiler would measure on the synthetic model (on-path draws)."""
    sampler = AcceptanceSampler(accept, seed + 7919)
    confs, accs = [], []
    for r in range(200):
        on, acc, _ = sampler.draw(r, 64)
        confs.append(on)
        accs.append(acc)
    return calibrate(np.concatenate(confs).tolist(), np.concatenate(accs).tolist(), bins=10)


@dataclass
class RunResult:
    policy: str
    batch: int
    requests: int = 0
    steps: int = 0
    request_steps: int = 0
    decode_tokens: int = 0
    decode_wall_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    verified: int = 0
    accepted: int = 0
    tpot_s: list[float] = field(default_factory=list)
    skipped: str | None = None

    def row(self) -> dict[str, Any]:
        tpot = np.asarray(self.tpot_s) if self.tpot_s else np.asarray([np.nan])
        tok = max(self.decode_tokens, 1)
        return {
            "policy": self.policy,
            "batch": self.batch,
            "requests": self.requests,
            "steps": self.steps,
            "tokensPerTargetForward": round(self.decode_tokens / max(self.request_steps, 1), 3),
            "wallMsPerToken": round(1000.0 * self.decode_wall_s / tok, 4),
            "tpotMsMean": round(1000.0 * float(np.mean(tpot)), 3),
            "tpotMsP90": round(1000.0 * float(np.quantile(tpot, 0.9)), 3),
            "meanVerifiedK": round(self.verified / max(self.request_steps, 1), 3),
            "acceptRate": round(self.accepted / self.verified, 3) if self.verified else None,
            "draftShare": round(self.draft_s / max(self.draft_s + self.verify_s, 1e-12), 3),
            "skipped": self.skipped,
        }


@dataclass(frozen=True)
class LoopSpec:
    batch: int
    requests: int
    prompt_len: int
    output_len: int
    max_k: int


def closed_loop(
    backend: SyntheticBackend,
    kind: str,
    k: int,
    policy_doc: Policy,
    profile: Profile,
    spec: LoopSpec,
    vocab: int,
    seed: int,
) -> RunResult:
    """B requests in flight; a finished one is replaced until `requests` have run.

    TPOT per request = (finish − first token) / (output_len − 1), wall clock (so the prefills of
    replacements count, as they would in a server). Wall per token counts step time only.
    """
    name = kind if kind != "fixed" else f"fixed-{k}"
    policy = make_policy(kind, profile, fixed_k=k)
    doc = policy_doc.model_copy(
        update={
            "mode": {"off": SpecMode.off, "fixed": SpecMode.fixed}.get(kind, SpecMode.adaptive),
            "fixed_draft_tokens": k if kind == "fixed" else policy_doc.fixed_draft_tokens,
        }
    )
    limits = limits_for(doc, kind)
    res = RunResult(name, spec.batch)
    params = SamplingParams(max_tokens=spec.output_len, ignore_eos=True)
    running: list[SeqState] = []
    first_at: dict[str, float] = {}
    nxt = 0
    while running or nxt < spec.requests:
        while len(running) < spec.batch and nxt < spec.requests:
            rng = np.random.default_rng([seed, 0x9C, nxt])
            prompt = rng.integers(2, vocab, size=spec.prompt_len).tolist()
            s = SeqState(f"r{nxt}", prompt, params)
            backend.register(s.seq_id, nxt, spec.output_len + spec.max_k + 2)
            s.output_ids.append(backend.add(s))
            first_at[s.seq_id] = time.perf_counter()
            running.append(s)
            nxt += 1
        t0 = time.perf_counter()
        out = backend.step(running, policy, limits.max_draft, limits.budget_s)
        res.decode_wall_s += time.perf_counter() - t0
        res.steps += 1
        res.request_steps += len(running)
        res.draft_s += out.stats.draft_time_s
        res.verify_s += out.stats.verify_time_s
        res.verified += out.stats.verified
        res.accepted += out.stats.accepted
        still = []
        for s in running:
            room = spec.output_len - len(s.output_ids)
            new = out.new_tokens[s.seq_id][:room]
            s.output_ids.extend(new)
            res.decode_tokens += len(new)
            if len(s.output_ids) >= spec.output_len:
                done = time.perf_counter()
                res.tpot_s.append((done - first_at.pop(s.seq_id)) / max(spec.output_len - 1, 1))
                res.requests += 1
                backend.remove(s.seq_id)
            else:
                still.append(s)
        running = still
    return res


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = [
        ("policy", "policy"),
        ("B", "batch"),
        ("tok/fwd", "tokensPerTargetForward"),
        ("ms/tok", "wallMsPerToken"),
        ("TPOT ms", "tpotMsMean"),
        ("TPOT p90", "tpotMsP90"),
        ("K verified", "meanVerifiedK"),
        ("accept", "acceptRate"),
        ("draft share", "draftShare"),
    ]
    cells = [[h for h, _ in cols]]
    for r in rows:
        if r.get("skipped"):
            cells.append([str(r["policy"]), str(r["batch"]), f"skipped: {r['skipped']}"] + [""] * 6)
            continue
        cells.append([_fmt(r[k]) for _, k in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for n, c in enumerate(cells):
        print("  ".join(x.rjust(w) for x, w in zip(c, widths, strict=True)), flush=True)
        if n == 0:
            print("  ".join("-" * w for w in widths), flush=True)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="torch device: cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and grid (CPU smoke test)")
    p.add_argument("--out", type=Path, help="output folder (default $OUT, else ./gpu_check_out)")
    p.add_argument("--batch-sizes", default=None, help="comma list (default 1,8,32; tiny 1,2)")
    p.add_argument("--ks", default=None, help="fixed K values to compare (default 1,3,5; tiny 2)")
    p.add_argument("--max-draft", type=int, default=8, help="AdaSpec maxDraftTokens")
    p.add_argument("--prompt-len", type=int, default=None, help="default 256 (tiny 16)")
    p.add_argument("--output-len", type=int, default=None, help="default 96 (tiny 10)")
    p.add_argument(
        "--waves", type=int, default=None, help="requests per run = waves × batch (2; tiny 1)"
    )
    p.add_argument(
        "--tpot-slo-ms",
        type=float,
        default=None,
        help="TPOT SLO for AdaSpec's guard (default: 1.5 × the profiled plain-decode step at "
        "the largest batch, so the guard matters at high load only)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit-s", type=float, default=420.0, help="skip runs past this")
    args = p.parse_args(argv)
    args.waves = args.waves if args.waves is not None else (1 if args.tiny else 2)
    for name in ("max_draft", "waves"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        args.batch_list = _ints(args.batch_sizes or ("1,2" if args.tiny else "1,8,32"))
        args.k_list = _ints(args.ks or ("2" if args.tiny else "1,3,5"))
    except ValueError as e:
        p.error(str(e))
    if max(args.k_list) > args.max_draft:
        p.error(f"--ks: {max(args.k_list)} exceeds --max-draft {args.max_draft}")
    args.prompt_len = args.prompt_len or (12 if args.tiny else 256)
    args.output_len = args.output_len or (10 if args.tiny else 96)
    if args.prompt_len < 1 or args.output_len < 2:
        p.error("--prompt-len must be >= 1 and --output-len >= 2")
    if args.out is None:
        args.out = Path(os.environ.get("OUT") or "gpu_check_out")
    return args


def _ints(text: str) -> list[int]:
    vals = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"expected positive integers, got {part!r} in {text!r}")
        vals.append(int(part))
    if not vals:
        raise ValueError(f"empty list {text!r}")
    return sorted(set(vals))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock = Clock(args.time_limit_s)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16
    grid = TINY_GRID if args.tiny else FULL_GRID
    t_shape, d_shape = (TINY_TARGET, TINY_DRAFT) if args.tiny else (TARGET_7B, DRAFT_05B)
    dev_name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor()
    clock.log(f"device {device} ({dev_name}), torch {torch.__version__}, tiny={args.tiny}")
    torch.manual_seed(args.seed)

    # 1. models + backend
    max_batch = max([*args.batch_list, grid.max_batch])
    max_len = max(grid.max_context + 2, args.prompt_len + args.output_len + args.max_draft + 4)
    target = build_model(t_shape, device, dtype, args.seed)
    draft = build_model(d_shape, device, dtype, args.seed + 1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    n_t = sum(p.numel() for p in target.parameters()) / 1e9
    n_d = sum(p.numel() for p in draft.parameters()) / 1e9
    clock.log(f"built target {n_t:.2f} B params, draft {n_d:.3f} B params (bf16, random)")
    accept = cpu_pair_acceptance()
    backend = SyntheticBackend(
        target,
        draft,
        accept,
        args.seed,
        max_batch=max_batch,
        max_model_len=max_len,
        device=device,
        dtype=dtype,
    )
    clock.log(f"backend ready: max_batch {max_batch}, max_model_len {max_len}")

    # 2. profile
    time_model, prof_report = profile_phase(backend, grid, clock)
    profile = Profile(
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        hardware=Hardware(
            device=f"{device}:{dev_name}" if device.startswith("cuda") else "cpu",
            threads=torch.get_num_threads(),
            backend="torch",
        ),
        target=ModelIdentity(name=f"random-qwen2-{'tiny' if args.tiny else '7b'} (synthetic)"),
        draft=ModelIdentity(name=f"random-qwen2-{'tiny' if args.tiny else '0.5b'} (synthetic)"),
        time_model=time_model,
        calibration=synthetic_calibration(accept, args.seed),
    )
    prof_path = args.out / "profile.json"
    prof_path.write_text(profile.model_dump_json(by_alias=True, exclude_none=True, indent=2) + "\n")
    clock.log(f"wrote {prof_path}")

    # TPOT SLO: default 1.5 × plain decoding's step at the largest batch and mid context.
    if args.tpot_slo_ms is None:
        b = max(args.batch_list)
        ctx = args.prompt_len + args.output_len // 2
        v = time_model.verify
        step = v.intercept_ms + v.per_row_ms * b + v.per_token_ms * b
        step += v.per_ctx_ktoken_ms * b * ctx / 1000.0
        args.tpot_slo_ms = round(1.5 * step, 3)
    policy_doc = Policy(
        generation=1,
        tpot_slo_ms=args.tpot_slo_ms,
        tpot_budget_ms=round(0.9 * args.tpot_slo_ms, 3),
        max_draft_tokens=args.max_draft,
    )
    clock.log(f"TPOT SLO {policy_doc.tpot_slo_ms} ms (budget {policy_doc.tpot_budget_ms} ms)")

    # 3. comparison
    plan: list[tuple[str, int]] = [("off", 0), *(("fixed", k) for k in args.k_list)]
    plan.append(("adaptive", 0))
    vocab = t_shape["vocab_size"]
    warm = LoopSpec(max(args.batch_list), max(args.batch_list), args.prompt_len, 4, args.max_draft)
    closed_loop(backend, "fixed", max(args.k_list), policy_doc, profile, warm, vocab, args.seed + 1)
    clock.log("warm-up run done")
    rows: list[dict[str, Any]] = []
    last_run_s = 0.0
    for b in args.batch_list:
        spec = LoopSpec(b, args.waves * b, args.prompt_len, args.output_len, args.max_draft)
        for kind, k in plan:
            name = kind if kind != "fixed" else f"fixed-{k}"
            # A run at this batch size takes about as long as the previous one (or longer).
            if clock.left() < max(5.0, 1.5 * last_run_s):
                rows.append(RunResult(name, b, skipped="time limit").row())
                clock.log(f"skip {name} B={b}: time limit")
                continue
            t_run = time.monotonic()
            r = closed_loop(backend, kind, k, policy_doc, profile, spec, vocab, args.seed)
            last_run_s = time.monotonic() - t_run
            rows.append(r.row())
            clock.log(
                f"{name:>9} B={b:<3} tok/fwd {rows[-1]['tokensPerTargetForward']:.2f}  "
                f"ms/tok {rows[-1]['wallMsPerToken']:.3f}  TPOT {rows[-1]['tpotMsMean']:.2f} ms"
            )
    print_table(rows)

    # 4. results
    results = {
        "benchmark": "gpu_check",
        "created": profile.created_at,
        "device": device,
        "deviceName": dev_name,
        "torch": torch.__version__,
        "tiny": args.tiny,
        "shapes": {"target": t_shape, "draft": d_shape},
        "acceptanceModel": accept.model_dump(),
        "loop": {
            "batchSizes": args.batch_list,
            "ks": args.k_list,
            "maxDraft": args.max_draft,
            "promptLen": args.prompt_len,
            "outputLen": args.output_len,
            "waves": args.waves,
        },
        "policy": policy_doc.model_dump(by_alias=True),
        "profiling": prof_report,
        "rows": rows,
        "elapsedS": round(clock.elapsed, 1),
    }
    res_path = args.out / "results.json"
    res_path.write_text(json.dumps(results, indent=2) + "\n")
    clock.log(f"wrote {res_path}; done in {clock.elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
