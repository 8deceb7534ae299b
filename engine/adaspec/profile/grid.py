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
class PrefillPoint:
    """`batch` rows each get a prompt chunk of `n` tokens on top of `offset` cached prompt
    tokens, fed through the target and then the draft (what prefilling a prompt costs)."""

    batch: int
    n: int
    offset: int

    @property
    def tokens(self) -> int:
        return self.batch * self.n


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
    prefill_tokens: tuple[int, ...] = ()
    """Chunk sizes of the one-chunk prefill points (each at every offset); () skips prefill.
    A prefill is compute-bound: its per-token cost is ~100× a verification's on CPU, so it
    needs points of its own, spanning the chunk sizes the engine feeds (up to 512)."""
    prefill_offsets: tuple[int, ...] = (0,)
    """Prompt tokens already cached before the chunk (0: the first chunk of a prompt)."""
    prefill_pair_tokens: tuple[int, ...] = ()
    """Chunk sizes of two-chunk points (two prompts prefilled in one pass), taking the offsets
    in turn: they separate the per-chunk cost from the pass's fixed cost."""
    prefill_repeats: int = 2
    """Timed passes per prefill point (fastest kept). Fewer than the step grid's: a pass takes
    0.3–2 s on CPU, long enough that scheduler noise averages out within it."""

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

    def prefill_points(self) -> list[PrefillPoint]:
        if not self.prefill_tokens:
            return []
        ones = [
            PrefillPoint(1, n, d)
            for n, d in itertools.product(self.prefill_tokens, self.prefill_offsets)
        ]
        offsets = self.prefill_offsets
        pairs = [
            PrefillPoint(2, n, offsets[i % len(offsets)])
            for i, n in enumerate(self.prefill_pair_tokens)
        ]
        return ones + pairs

    @property
    def max_context(self) -> int:
        steps = max(self.context_lengths) + max(self.verify_tokens)
        prefill = [p.offset + p.n for p in self.prefill_points()]
        return max([steps, *prefill])

    @property
    def max_batch(self) -> int:
        return max([*self.batch_sizes, *(p.batch for p in self.prefill_points())])


DEFAULT_GRID = Grid(
    batch_sizes=(1, 2, 4, 8),
    verify_tokens=(1, 2, 4, 8),
    context_lengths=(64, 512, 1024, 1536),
    max_step_tokens=24,
    warmup=2,
    repeats=3,
    # 10 prefill points, ~2,100 prompt tokens per round: ~9 s per round on the 2-core CPU pair.
    prefill_tokens=(16, 96, 256, 512),
    prefill_offsets=(0, 768),
    prefill_pair_tokens=(32, 128),
)

QUICK_GRID = Grid(
    batch_sizes=(1, 2, 4),
    verify_tokens=(1, 3),
    context_lengths=(32, 256),
    max_step_tokens=8,
    warmup=1,
    repeats=2,
    prefill_tokens=(8, 32, 96),
    prefill_offsets=(0, 64),
    prefill_pair_tokens=(16,),
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
