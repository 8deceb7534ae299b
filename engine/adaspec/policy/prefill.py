"""SLO-aware chunked prefill: how many prompt tokens ride along with this step's verification.

An unchunked admission runs a whole prompt through the target between two steps, and every
running request waits for it: one long prompt can break the TPOT budget of the whole batch
however well the drafts were chosen. Chunking spreads the prompt over several steps, each chunk
riding along with the verification forward (the weights are read once). The chunk is sized so
the step with it still fits the budget when the batch decodes plainly; the speculative policy
then sees the chunk's predicted cost in `StepContext.prefill_extra_s` and drafts only what
still fits. Prompts always move by at least `min_chunk` tokens per step, so time to first token
stays bounded even when the budget leaves no room (the step is then reported infeasible).

Pure: numpy and the time model only; the torch backend and the simulator share it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from adaspec.policy.time_model import StepTimePredictor

DEFAULT_MAX_CHUNK = 512
"""Prompt tokens per step across all prefilling requests; bounds memory and TTFT jitter."""
DEFAULT_MIN_CHUNK = 32
"""Progress a prompt makes per step even when the budget leaves no room for it."""


@dataclass(frozen=True)
class PrefillPlan:
    chunks: tuple[int, ...]
    """Prompt tokens per prefilling request this step, in admission order (0: waits)."""
    extra_s: float
    """Predicted time the chunks add to the step's verification forward."""


def chunk_ctx_work(done: int, n: int) -> float:
    """Attention work of prompt tokens done+1 … done+n (each attends to all before it)."""
    return float(n) * done + n * (n + 1) / 2.0


def plain_step_s(
    times: StepTimePredictor, decode_rows: int, ctx_tokens: float, has_draft: bool
) -> float:
    """The step the chunks are sized against: a plain verification of the decoding rows (their
    KV contexts summing to `ctx_tokens`), plus, with a draft model, the draft forward that puts
    the chunks into the draft cache when nobody drafts. 0 with no decoding rows. The engine and
    the simulator both plan with it, so they size chunks alike."""
    if decode_rows <= 0:
        return 0.0
    t = times.verify(decode_rows, decode_rows, float(ctx_tokens))
    return t + times.draft_forward_fixed_s if has_draft else t


def plan_prefill(
    times: StepTimePredictor,
    remaining: Sequence[int],
    done: Sequence[int],
    *,
    decode_rows: int,
    plain_step_s: float,
    budget_s: float | None,
    max_chunk: int = DEFAULT_MAX_CHUNK,
    min_chunk: int = DEFAULT_MIN_CHUNK,
) -> PrefillPlan:
    """Chunks for the prefilling requests (FIFO) this step.

    `remaining[i]` / `done[i]`: prompt tokens request i still has to prefill / has prefilled.
    `plain_step_s`: predicted time of the step when the decoding rows decode plainly (the
    engine adds the fixed cost of the draft forward such a step runs over the chunks,
    `StepTimePredictor.draft_forward_fixed_s`, when the backend has a draft model).
    With no decoding rows nobody waits, so prompts get `max_chunk` tokens; with no budget the
    chunk is `max_chunk` too (chunking alone already bounds the stall).
    """
    _check_args(remaining, done, decode_rows, plain_step_s, budget_s, max_chunk, min_chunk)
    chunks: list[int] = []
    extra = 0.0
    left = max_chunk
    allowance = float("inf") if decode_rows == 0 or budget_s is None else budget_s - plain_step_s
    for rem, d in zip(remaining, done, strict=True):
        rem = max(0, int(rem))
        n = min(rem, left)
        if n > 0 and allowance != float("inf"):
            n = _largest_fitting(times, int(d), n, allowance)
            if not chunks or not any(chunks):  # the oldest prompt always progresses
                n = max(n, min(rem, min_chunk, left))
        chunks.append(n)
        if n > 0:
            cost = times.prefill_extra(1, n, chunk_ctx_work(int(d), n))
            extra += cost
            allowance -= cost
            left -= n
    return PrefillPlan(tuple(chunks), extra)


def _check_args(
    remaining: Sequence[int],
    done: Sequence[int],
    decode_rows: int,
    plain_step_s: float,
    budget_s: float | None,
    max_chunk: int,
    min_chunk: int,
) -> None:
    """Bad input is a caller's bug: say which argument, never plan around it silently."""
    if len(remaining) != len(done):
        raise ValueError(
            f"remaining and done must have the same length, got {len(remaining)} and {len(done)}"
        )
    if any(int(r) < 0 for r in remaining):
        raise ValueError(f"remaining must be >= 0 per request, got {list(remaining)}")
    if any(int(d) < 0 for d in done):
        raise ValueError(f"done must be >= 0 per request, got {list(done)}")
    if decode_rows < 0:
        raise ValueError(f"decode_rows must be >= 0, got {decode_rows}")
    if not (math.isfinite(plain_step_s) and plain_step_s >= 0.0):
        raise ValueError(f"plain_step_s must be a finite time >= 0, got {plain_step_s}")
    if budget_s is not None and not (math.isfinite(budget_s) and budget_s > 0.0):
        raise ValueError(f"budget_s must be None or a finite time > 0, got {budget_s}")
    if max_chunk < 1:
        raise ValueError(f"max_chunk must be >= 1, got {max_chunk}")
    if not 1 <= min_chunk <= max_chunk:
        raise ValueError(f"min_chunk must be within [1, max_chunk={max_chunk}], got {min_chunk}")


def _largest_fitting(times: StepTimePredictor, done: int, upto: int, allowance: float) -> int:
    """Largest n ≤ upto whose added time fits `allowance` (0 if none); cost is increasing in n."""
    if allowance <= 0:
        return 0
    n = np.arange(1, upto + 1, dtype=np.float64)
    cost = times.prefill_extra_vec(n, n * done + n * (n + 1) / 2.0)
    fits = np.flatnonzero(cost <= allowance)
    return int(fits[-1]) + 1 if fits.size else 0
