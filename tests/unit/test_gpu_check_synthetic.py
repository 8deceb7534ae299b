"""The synthetic-acceptance backend of bench/gpu_check.py on tiny models (in process)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from adaspec.backends.base import SamplingParams, SeqState
from adaspec.policy.baselines import FixedKPolicy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod
    spec.loader.exec_module(mod)
    return mod


def _backend(gc: ModuleType, seed: int = 3) -> object:
    target = gc.build_model(gc.TINY_TARGET, "cpu", gc.torch.float32, seed=0)
    draft = gc.build_model(gc.TINY_DRAFT, "cpu", gc.torch.float32, seed=1)
    return gc.SyntheticBackend(
        target,
        draft,
        gc.cpu_pair_acceptance(),
        seed,
        max_batch=2,
        max_model_len=64,
        device="cpu",
        dtype=gc.torch.float32,
    )


def _generate(gc: ModuleType, k: int, n_out: int = 20) -> tuple[list[list[int]], list[int]]:
    """Two requests decoded with fixed K; returns accepted counts per step and emitted lengths."""
    be = _backend(gc)
    seqs = []
    for i in range(2):
        s = SeqState(f"s{i}", [5 + i, 6, 7, 8], SamplingParams(max_tokens=n_out, ignore_eos=True))
        be.register(s.seq_id, i, n_out + k + 2)  # type: ignore[attr-defined]
        s.output_ids.append(be.add(s))  # type: ignore[attr-defined]
        seqs.append(s)
    accepted: list[list[int]] = []
    policy = FixedKPolicy(k)
    while any(len(s.output_ids) < n_out for s in seqs):
        res = be.step(seqs, policy, k, None)  # type: ignore[attr-defined]
        accepted.append([len(res.new_tokens[s.seq_id]) - 1 for s in seqs])
        for s in seqs:
            s.output_ids.extend(res.new_tokens[s.seq_id])
    return accepted, [len(s.output_ids) for s in seqs]


def test_accept_decisions_follow_the_position_keyed_draws(gc: ModuleType) -> None:
    """Accepted counts equal the leading run of accepted draws at each request's position."""
    k = 3
    be = _backend(gc)
    sampler = gc.AcceptanceSampler(gc.cpu_pair_acceptance(), 3)
    s = SeqState("a", [9, 10, 11], SamplingParams(max_tokens=30, ignore_eos=True))
    be.register("a", 0, 40)  # type: ignore[attr-defined]
    s.output_ids.append(be.add(s))  # type: ignore[attr-defined]
    _, acc, _ = sampler.draw(0, 40)
    for _ in range(6):
        p0 = len(s.output_ids)
        res = be.step([s], FixedKPolicy(k), k, None)  # type: ignore[attr-defined]
        window = acc[p0 : p0 + k]
        want = int(np.argmin(window)) if not window.all() else k
        assert res.stats.accepted == want
        assert len(res.new_tokens["a"]) == want + 1
        s.output_ids.extend(res.new_tokens["a"])


def test_same_text_for_every_policy(gc: ModuleType) -> None:
    """Common random numbers: K=1 and K=4 see the same per-position acceptance, so the total
    accepted tokens differ only by how the steps cut the sequence, and K=4 needs fewer steps."""
    a1, n1 = _generate(gc, 1)
    a4, n4 = _generate(gc, 4)
    assert len(a4) < len(a1)
    assert all(0 <= x <= 1 for row in a1 for x in row)
    assert all(0 <= x <= 4 for row in a4 for x in row)
    assert min(n1) >= 20 and min(n4) >= 20


def test_confidence_is_replaced_by_the_synthetic_draw(gc: ModuleType) -> None:
    """The policy sees the synthetic confidences (tiny random models give near-uniform ones)."""
    seen: list[np.ndarray] = []

    class Spy(FixedKPolicy):
        def verify_lengths(self, ctx, conf, lens):  # type: ignore[no-untyped-def]
            seen.append(conf.copy())
            return super().verify_lengths(ctx, conf, lens)

    be = _backend(gc)
    s = SeqState("c", [3, 4, 5], SamplingParams(max_tokens=12, ignore_eos=True))
    be.register("c", 7, 20)  # type: ignore[attr-defined]
    s.output_ids.append(be.add(s))  # type: ignore[attr-defined]
    p0 = len(s.output_ids)
    be.step([s], Spy(2), 2, None)  # type: ignore[attr-defined]
    on, acc, off = gc.AcceptanceSampler(gc.cpu_pair_acceptance(), 3).draw(7, 20)
    assert seen[0][0, 0] == pytest.approx(on[p0])
    assert seen[0][0, 1] == pytest.approx(on[p0 + 1] if acc[p0] else off[p0 + 1])
