"""A slot KV cache: one preallocated K and V tensor per layer, one length per slot.

Each running sequence owns a slot. New tokens of a slot are written right after its current
length, so rolling back rejected draft tokens is only `truncate` (the stale entries beyond the
length are overwritten by the next write and never attended to). Nothing is copied per step.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """Per-layer K/V tensors shaped [max_slots, kv_heads, max_len, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        max_slots: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        shape = (max_slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_slots = max_slots
        self.max_len = max_len
        self._lengths = [0] * max_slots
        self._free = list(range(max_slots - 1, -1, -1))
        self._used: set[int] = set()

    # ------------------------------------------------------------------ slot bookkeeping

    def alloc(self) -> int:
        """Take a free slot (its length starts at 0)."""
        if not self._free:
            raise RuntimeError(f"no free KV slot (max_slots={self.max_slots})")
        slot = self._free.pop()
        self._used.add(slot)
        self._lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        self._check(slot)
        self._used.discard(slot)
        self._lengths[slot] = 0
        self._free.append(slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def length(self, slot: int) -> int:
        self._check(slot)
        return self._lengths[slot]

    def truncate(self, slot: int, n: int) -> None:
        """Roll the slot back to its first `n` tokens (rejected drafts are forgotten)."""
        self._check(slot)
        if not 0 <= n <= self._lengths[slot]:
            raise ValueError(f"truncate: n={n} outside [0, {self._lengths[slot]}] for slot {slot}")
        self._lengths[slot] = n

    def advance(self, slot: int, n: int) -> None:
        """Count `n` tokens just written after the slot's length."""
        self._check(slot)
        if self._lengths[slot] + n > self.max_len:
            raise ValueError(
                f"slot {slot}: {self._lengths[slot]} + {n} tokens exceed max_len={self.max_len}"
            )
        self._lengths[slot] += n

    def _check(self, slot: int) -> None:
        if slot not in self._used:
            raise KeyError(f"KV slot {slot} is not allocated")
