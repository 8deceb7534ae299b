"""`adaspec profile`: time draft and verification steps and prefill passes, fit the time model,
calibrate acceptance, and write the Profile JSON (DESIGN §3).

Progress goes to stderr. `--print-json` prints the compact Profile as the last stdout line, and
`--termination-log` writes it to the pod's terminationMessagePath: the operator reads it from
there, which limits it to 4 KiB.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adaspec.contract import Profile, StepTimeModel
from adaspec.models import ModelError
from adaspec.profile.fit import StepSample
from adaspec.profile.grid import DEFAULT_GRID, QUICK_GRID, Grid, GridPoint, parse_int_list

TERMINATION_MESSAGE_LIMIT = 4096


class ProfileError(RuntimeError):
    """The profile cannot be produced; the message says why (no traceback for the user)."""


class ProfileArgError(ProfileError):
    """A flag has an invalid value (exit status 2, like argparse's own errors)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", default="default-target", help="target model source (built-in, folder, .gguf)"
    )
    parser.add_argument(
        "--draft", default="default-draft", help="draft model source (built-in, folder, .gguf)"
    )
    parser.add_argument("--out", type=Path, help="write the Profile JSON to this file")
    parser.add_argument(
        "--print-json", action="store_true", help="print the compact JSON as the last stdout line"
    )
    parser.add_argument(
        "--termination-log",
        type=Path,
        help="also write the compact JSON here (Kubernetes terminationMessagePath)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny grid and prompt set (tests, CI)")
    parser.add_argument("--batch-sizes", help="comma-separated batch sizes, e.g. 1,2,4,8")
    parser.add_argument(
        "--verify-tokens", help="comma-separated query tokens per row for verification steps"
    )
    parser.add_argument("--context-lengths", help="comma-separated KV context lengths")
    parser.add_argument(
        "--max-step-tokens", type=int, help="skip verification points with batch·tokens above this"
    )
    parser.add_argument(
        "--prefill-tokens",
        help="comma-separated prompt-chunk sizes of the prefill points, e.g. 16,96,256,512",
    )
    parser.add_argument(
        "--prefill-offsets",
        help="comma-separated prompt tokens already cached before a prefill chunk, e.g. 0,768",
    )
    parser.add_argument(
        "--skip-prefill",
        action="store_true",
        help="do not time prefill passes (no timeModel.prefill: the engine then prices prompts "
        "with the verification model, which underestimates them on CPU)",
    )
    parser.add_argument("--repeats", type=int, help="timed runs per grid point (fastest is kept)")
    parser.add_argument("--warmup", type=int, help="untimed runs before each timing phase")
    parser.add_argument(
        "--calib-prompts",
        type=int,
        help="calibration prompts per kind (chat and code; default 6, quick 2)",
    )
    parser.add_argument(
        "--calib-tokens",
        type=int,
        help="tokens generated per calibration prompt (default 40, quick 16)",
    )
    parser.add_argument(
        "--calib-draft-tokens", type=int, default=4, help="draft tokens per calibration step"
    )
    parser.add_argument("--calib-bins", type=int, default=10, help="calibration bins on [0, 1]")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--samples-out",
        type=Path,
        help="write every timing point (measured, predicted, held out?) as JSON lines",
    )
    parser.add_argument(
        "--skip-calibration", action="store_true", help=argparse.SUPPRESS
    )  # debugging aid: timing only (the calibration is then a flat prior)


def _positive(value: int | None, field: str) -> None:
    if value is not None and value < 1:
        raise ProfileArgError(f"{field} must be >= 1, got {value}")


def grid_from_args(args: argparse.Namespace) -> Grid:
    """The grid the flags describe (the default or --quick one, with axes overridden)."""
    grid = QUICK_GRID if args.quick else DEFAULT_GRID
    try:
        if args.batch_sizes:
            grid = replace(grid, batch_sizes=parse_int_list(args.batch_sizes, "--batch-sizes"))
        if args.verify_tokens:
            grid = replace(
                grid, verify_tokens=parse_int_list(args.verify_tokens, "--verify-tokens")
            )
        if args.context_lengths:
            grid = replace(
                grid, context_lengths=parse_int_list(args.context_lengths, "--context-lengths")
            )
        if args.prefill_tokens:
            grid = replace(
                grid, prefill_tokens=parse_int_list(args.prefill_tokens, "--prefill-tokens")
            )
        if args.prefill_offsets:
            grid = replace(
                grid,
                prefill_offsets=parse_int_list(args.prefill_offsets, "--prefill-offsets", 0),
            )
    except ValueError as e:
        raise ProfileArgError(str(e)) from None
    _positive(args.max_step_tokens, "--max-step-tokens")
    _positive(args.repeats, "--repeats")
    if args.warmup is not None and args.warmup < 0:
        raise ProfileArgError(f"--warmup must be >= 0, got {args.warmup}")
    if args.max_step_tokens is not None:
        grid = replace(grid, max_step_tokens=args.max_step_tokens)
    if args.repeats is not None:
        grid = replace(grid, repeats=args.repeats)
    if args.warmup is not None:
        grid = replace(grid, warmup=args.warmup)
    if len(grid.draft_points()) < 6:
        raise ProfileArgError(
            "the grid has fewer than 6 draft points (batch sizes × context lengths); "
            "add values to --batch-sizes or --context-lengths"
        )
    if len(grid.verify_points()) < 6:
        raise ProfileArgError(
            "the grid has fewer than 6 verification points within --max-step-tokens; "
            "add values to the axes or raise --max-step-tokens"
        )
    if args.skip_prefill:
        grid = replace(grid, prefill_tokens=(), prefill_pair_tokens=())
    elif len(grid.prefill_points()) < 6:
        raise ProfileArgError(
            "the grid has fewer than 6 prefill points (--prefill-tokens × --prefill-offsets "
            "plus the two-chunk points); add values to them or use --skip-prefill"
        )
    return grid


def _check_calib_args(args: argparse.Namespace) -> None:
    for field in ("calib_prompts", "calib_tokens", "calib_draft_tokens", "calib_bins", "threads"):
        _positive(getattr(args, field), "--" + field.replace("_", "-"))


def compact_json(profile: Profile) -> str:
    text = profile.to_json()
    size = len(text.encode("utf-8"))
    if size > TERMINATION_MESSAGE_LIMIT:
        raise ProfileError(
            f"profile JSON is {size} bytes, over the {TERMINATION_MESSAGE_LIMIT}-byte "
            "termination-message limit (use fewer --calib-bins)"
        )
    return text


def run(args: argparse.Namespace) -> int:
    try:
        grid = grid_from_args(args)
        _check_calib_args(args)
        profile = _profile(args, grid)
        text = compact_json(profile)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(
                profile.model_dump_json(by_alias=True, exclude_none=True, indent=2) + "\n"
            )
        if args.termination_log is not None:
            args.termination_log.parent.mkdir(parents=True, exist_ok=True)
            args.termination_log.write_text(text)
        if args.print_json:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        return 0
    except ProfileArgError as e:
        print(f"adaspec profile: {e}", file=sys.stderr)
        return 2
    except (ProfileError, ModelError, OSError) as e:  # a clear one-line error, no traceback
        print(f"adaspec profile: {e}", file=sys.stderr)
        return 1


def _profile(args: argparse.Namespace, grid: Grid) -> Profile:
    # Heavy imports only here, so argument errors answer instantly.
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from adaspec.contract import Hardware, ModelIdentity, TimeModel
    from adaspec.models import RichProgress, model_sha256, resolve_model
    from adaspec.profile.calibration import calibrate
    from adaspec.profile.fit import fit_step_time
    from adaspec.profile.measure import (
        measure_acceptance,
        retime_slow_prefill_points,
        time_grid,
        time_prefill_grid,
    )
    from adaspec.profile.prompts import encode_prompts

    console = Console(stderr=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    target_dir = resolve_model(args.target, RichProgress())
    draft_dir = resolve_model(args.draft, RichProgress())
    console.print(f"[dim]adaspec profile:[/dim] target {target_dir}\n  draft {draft_dir}")
    target_model, tokenizer = _load(target_dir, torch.bfloat16, with_tokenizer=True)
    draft_model, _ = _load(draft_dir, torch.bfloat16, with_tokenizer=False)

    n_prompts = args.calib_prompts or (2 if args.quick else 6)
    calib_tokens = args.calib_tokens or (16 if args.quick else 40)
    prompts = encode_prompts(tokenizer, n_prompts, n_prompts)
    calib_len = max(len(p) for p in prompts) + calib_tokens + 2 * args.calib_draft_tokens + 4
    max_len = max(grid.max_context + 2, calib_len)
    slots = max(grid.max_batch, len(prompts))

    from adaspec.backends.torch.runner import ModelRunner

    try:
        target = ModelRunner(target_model, slots, max_len)
        draft = ModelRunner(draft_model, slots, max_len)
    except ValueError as e:
        raise ProfileError(f"cannot run these models: {e}") from None
    if draft.vocab_size > target.vocab_size:
        raise ProfileError(
            f"draft vocabulary ({draft.vocab_size}) is larger than the target's "
            f"({target.vocab_size}); the pair must share a tokenizer"
        )

    d_points = grid.draft_points()
    v_points = grid.verify_points()
    p_points = grid.prefill_points()
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    with bar:
        bar.console.print(f"timing {len(d_points)} draft points × {grid.repeats} runs")
        task = bar.add_task("time draft steps", total=len(d_points))
        d_samples = time_grid(
            draft, d_points, grid.warmup, grid.repeats, lambda n: bar.advance(task, n)
        )
        bar.console.print(f"timing {len(v_points)} verification points")
        task = bar.add_task("time verification steps", total=len(v_points))
        v_samples = time_grid(
            target, v_points, grid.warmup, grid.repeats, lambda n: bar.advance(task, n)
        )
        d_samples = _refine(bar, draft, d_points, d_samples, grid.repeats, "draft")
        v_samples = _refine(bar, target, v_points, v_samples, grid.repeats, "verification")
        p_samples: list[StepSample] = []
        if p_points:
            sizes = sorted({p.n for p in p_points})
            bar.console.print(
                f"timing {len(p_points)} prefill points (target + draft over prompt chunks of "
                f"{sizes[0]}–{sizes[-1]} tokens) × {grid.prefill_repeats} runs"
            )
            task = bar.add_task("time prefill passes", total=len(p_points))
            p_samples = time_prefill_grid(
                target,
                draft,
                p_points,
                min(grid.warmup, 1),
                grid.prefill_repeats,
                lambda n: bar.advance(task, n),
            )
            p_samples = _refine_with(
                bar,
                p_samples,
                "prefill",
                lambda predicted, tick: retime_slow_prefill_points(
                    target, draft, p_points, p_samples, predicted, grid.prefill_repeats, tick=tick
                ),
            )
        calib = None
        if not args.skip_calibration:
            bar.console.print(f"calibrating on {len(prompts)} prompts × {calib_tokens} tokens")
            task = bar.add_task("calibrate acceptance (tokens)", total=len(prompts) * calib_tokens)
            acc = measure_acceptance(
                target,
                draft,
                prompts,
                args.calib_draft_tokens,
                calib_tokens,
                _eos_ids(target_model, tokenizer),
                lambda n: bar.advance(task, n),
            )
            calib = calibrate(acc.confidence, acc.accepted, bins=args.calib_bins)
    try:
        draft_fit = fit_step_time(d_samples)
        verify_fit = fit_step_time(v_samples)
        prefill_fit = fit_step_time(p_samples) if p_samples else None
        if args.samples_out is not None:
            kinds = {"draft": (d_samples, draft_fit), "verify": (v_samples, verify_fit)}
            if prefill_fit is not None:
                kinds["prefill"] = (p_samples, prefill_fit)
            _write_samples(args.samples_out, kinds)
    except ValueError as e:
        raise ProfileError(f"cannot fit the time model: {e}") from None
    if calib is None:
        from adaspec.contract import AcceptanceCalibration

        calib = AcceptanceCalibration(bin_edges=[0.0, 1.0], accept_prob=[0.5])
    profile = Profile(
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        hardware=Hardware(device="cpu", threads=torch.get_num_threads(), backend="torch"),
        target=ModelIdentity(name=args.target, sha256=model_sha256(target_dir)),
        draft=ModelIdentity(name=args.draft, sha256=model_sha256(draft_dir)),
        time_model=TimeModel(draft=draft_fit, verify=verify_fit, prefill=prefill_fit),
        calibration=calib,
    )
    _summary(console, profile, time.monotonic() - started)
    return profile


def _load(folder: Path, dtype: Any, with_tokenizer: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(folder)) if with_tokenizer else None
    except (OSError, ValueError) as e:
        raise ProfileError(f"cannot load the model in {folder}: {e}") from None
    model.eval()
    return model, tok


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for val in (
        getattr(model.generation_config, "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(val, int):
            ids.add(val)
        elif isinstance(val, list | tuple):
            ids.update(int(v) for v in val)
    return frozenset(ids)


def _refine(
    bar: Any,
    runner: Any,
    points: list[GridPoint],
    samples: list[StepSample],
    repeats: int,
    label: str,
) -> list[StepSample]:
    """Measure again the points a first fit says were slowed down by other load."""
    from adaspec.profile.measure import retime_slow_points

    return _refine_with(
        bar,
        samples,
        label,
        lambda predicted, tick: retime_slow_points(
            runner, points, samples, predicted, repeats, tick=tick
        ),
    )


def _refine_with(
    bar: Any,
    samples: list[StepSample],
    label: str,
    retime: Callable[[list[float], Callable[[int], None]], tuple[list[StepSample], int]],
) -> list[StepSample]:
    """`retime(predicted, tick)` measures again the points slower than a first fit predicts."""
    from adaspec.profile.fit import features, fit_coefficients

    predicted = (features(samples) @ fit_coefficients(samples)).tolist()
    task = bar.add_task(f"re-time slow {label} points", total=None)
    out, n = retime(predicted, lambda k: bar.advance(task, k))
    bar.update(task, total=n, completed=n)
    return out


def _write_samples(path: Path, kinds: dict[str, tuple[list[StepSample], StepTimeModel]]) -> None:
    """Diagnostics: the raw timing points beside what the final model predicts for them."""
    from adaspec.profile.fit import holdout_mask, predict

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for kind, (samples, model) in kinds.items():
            held = holdout_mask(len(samples))
            for s, pred, h in zip(samples, predict(model, samples), held, strict=True):
                row = {
                    "kind": kind,
                    "batch": s.rows,
                    "q": s.q_lens[0],
                    "ctx": s.ctx_lens[0],
                    "timeMs": round(s.time_ms, 3),
                    "predictedMs": round(float(pred), 3),
                    "heldOut": bool(h),
                }
                f.write(json.dumps(row) + "\n")


def _summary(console: Any, profile: Profile, elapsed_s: float) -> None:
    tm = profile.time_model
    kinds = [("draft", tm.draft), ("verify", tm.verify)]
    if tm.prefill is not None:
        kinds.append(("prefill", tm.prefill))
    for name, m in kinds:
        fit = m.fit
        quality = f"R² {fit.r2:.3f}, MAPE {fit.mape:.1%} on {fit.n_test} held-out" if fit else ""
        console.print(
            f"{name:>6}: {m.intercept_ms:.1f} ms + {m.per_row_ms:.2f}/row + "
            f"{m.per_token_ms:.2f}/token + {m.per_ctx_ktoken_ms:.3f}/ctx-ktoken  ({quality})"
        )
    cal = profile.calibration
    console.print(
        f"calibration: {sum(cal.counts or [])} drafted tokens, AUC {cal.auc}, Brier {cal.brier}"
    )
    console.print(f"profile done in {elapsed_s:.0f} s")
