"""The profiling grid: which (batch, tokens per row, context) points get timed. Pure."""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class GridPoint:
    batch: int
    q: int
    """Query tokens per row (1 for a draft step; draft length + 1 for a verification)."""
    ctx: int
    """Tokens already in each row's KV cache."""

    @property
    def tokens(self) -> int:
        return self.batch * self.q


@dataclass(frozen=True)
class Grid:
    batch_sizes: tuple[int, ...]
    verify_tokens: tuple[int, ...]
    context_lengths: tuple[int, ...]
    max_step_tokens: int
    """Verification points with batch·q above this are skipped (they dominate the run time on
    CPU and lie far outside the regime the engine runs in)."""
    warmup: int
    """Untimed forwards at the start of each timing phase (first-call allocations, caches)."""
    repeats: int
    """Timed forwards per point; the fastest is kept."""

    def draft_points(self) -> list[GridPoint]:
        return [
            GridPoint(b, 1, c) for b, c in itertools.product(self.batch_sizes, self.context_lengths)
        ]

    def verify_points(self) -> list[GridPoint]:
        return [
            GridPoint(b, q, c)
            for b, q, c in itertools.product(
                self.batch_sizes, self.verify_tokens, self.context_lengths
            )
            if b * q <= self.max_step_tokens
        ]

    @property
    def max_context(self) -> int:
        return max(self.context_lengths) + max(self.verify_tokens)

    @property
    def max_batch(self) -> int:
        return max(self.batch_sizes)


DEFAULT_GRID = Grid(
    batch_sizes=(1, 2, 4, 8),
    verify_tokens=(1, 2, 4, 8),
    context_lengths=(64, 512, 1024, 1536),
    max_step_tokens=24,
    warmup=2,
    repeats=3,
)

QUICK_GRID = Grid(
    batch_sizes=(1, 2, 4),
    verify_tokens=(1, 3),
    context_lengths=(32, 256),
    max_step_tokens=8,
    warmup=1,
    repeats=2,
)


def parse_int_list(text: str, field: str, minimum: int = 1) -> tuple[int, ...]:
    """'1,2,4' → (1, 2, 4); a ValueError that names the flag otherwise."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"{field}: expected a comma-separated list of integers, got {text!r}")
    values = []
    for p in parts:
        try:
            v = int(p)
        except ValueError:
            raise ValueError(f"{field}: {p!r} is not an integer") from None
        if v < minimum:
            raise ValueError(f"{field}: {v} is below the minimum {minimum}")
        values.append(v)
    return tuple(sorted(set(values)))
