"""Profiler measurements against the real ModelRunner with tiny random Qwen2 models (fp32)."""

from __future__ import annotations

from dataclasses import replace

import torch

from adaspec.backends.torch.runner import ModelRunner
from adaspec.backends.torch.tiny import noisy_copy, tiny_model
from adaspec.policy.prefill import chunk_ctx_work
from adaspec.profile.fit import fit_step_time
from adaspec.profile.grid import GridPoint, PrefillPoint
from adaspec.profile.measure import (
    measure_acceptance,
    retime_slow_points,
    retime_slow_prefill_points,
    time_grid,
    time_prefill_grid,
)


def _plain_greedy(runner: ModelRunner, prompt: list[int], n: int) -> list[int]:
    slot = runner.alloc()
    try:
        logits = runner.forward([slot], [prompt], last_n=1)[0]
        out = [int(logits[-1].argmax())]
        while len(out) < n:
            logits = runner.forward([slot], [[out[-1]]])[0]
            out.append(int(logits[-1].argmax()))
        return out
    finally:
        runner.free(slot)


def test_speculative_calibration_run_reproduces_plain_greedy() -> None:
    """The draft/verify cache bookkeeping is right iff the output equals plain greedy decoding."""
    target_model = tiny_model(seed=3)
    target = ModelRunner(target_model, 4, 128, dtype=torch.float32)
    draft = ModelRunner(noisy_copy(target_model, 0.3, seed=5), 4, 128, dtype=torch.float32)
    prompts = [[5, 9, 11, 20], [7, 3], [40, 41, 42, 43, 44, 45]]
    run = measure_acceptance(target, draft, prompts, 3, 20, frozenset())
    for prompt, out in zip(prompts, run.outputs, strict=True):
        assert len(out) >= 20
        assert out[:20] == _plain_greedy(target, prompt, 20)
    accepted = sum(run.accepted)
    assert 0 < accepted < len(run.accepted)  # a noisy draft: partial acceptance observed
    assert all(0.0 <= c <= 1.0 for c in run.confidence)
    assert run.emitted == sum(len(o) for o in run.outputs)
    # Every slot was given back.
    assert target.cache.free_slots == 4 and draft.cache.free_slots == 4


def test_identical_draft_is_always_accepted() -> None:
    model = tiny_model(seed=4)
    target = ModelRunner(model, 2, 64, dtype=torch.float32)
    draft = ModelRunner(tiny_model(seed=4), 2, 64, dtype=torch.float32)
    run = measure_acceptance(target, draft, [[3, 4, 5]], 4, 12, frozenset())
    assert run.accepted and all(run.accepted)
    assert run.target_passes == 3  # 5 tokens per pass: 12 tokens need 3 passes


def test_time_grid_returns_samples_in_grid_order_and_frees_slots() -> None:
    runner = ModelRunner(tiny_model(seed=1), 4, 64, dtype=torch.float32)
    points = [GridPoint(2, 3, 10), GridPoint(1, 1, 40), GridPoint(4, 2, 0)]
    ticks: list[int] = []
    samples = time_grid(runner, points, warmup=1, repeats=2, tick=ticks.append)
    assert [s.q_lens for s in samples] == [(3, 3), (1,), (2, 2, 2, 2)]
    assert [s.ctx_lens for s in samples] == [(10, 10), (40,), (0, 0, 0, 0)]
    assert all(s.time_ms > 0 for s in samples)
    assert sum(ticks) == 3
    assert runner.cache.free_slots == 4


def test_slow_points_are_measured_again_and_only_improved() -> None:
    runner = ModelRunner(tiny_model(seed=1), 2, 64, dtype=torch.float32)
    points = [GridPoint(1, 1, 8), GridPoint(2, 2, 16), GridPoint(1, 2, 4)]
    measured = time_grid(runner, points, warmup=1, repeats=1)
    # Pretend another process held the CPU during point 1; point 2 looked fast.
    inflated = [measured[0], replace(measured[1], time_ms=1e6), replace(measured[2], time_ms=1e-3)]
    predicted = [s.time_ms for s in measured]
    out, n = retime_slow_points(runner, points, inflated, predicted, repeats=1)
    assert n == 1
    assert out[1].time_ms < 1e6 and out[1].q_lens == (2, 2)
    assert out[0] == inflated[0] and out[2] == inflated[2]  # untouched
    assert runner.cache.free_slots == 2


def _pair(seed: int = 1, max_len: int = 640) -> tuple[ModelRunner, ModelRunner]:
    target = tiny_model(seed=seed, max_position_embeddings=max_len)
    return (
        ModelRunner(target, 2, max_len, dtype=torch.float32),
        ModelRunner(noisy_copy(target, 0.3, seed=seed + 1), 2, max_len, dtype=torch.float32),
    )


def test_prefill_grid_records_chunk_work_and_frees_both_caches() -> None:
    target, draft = _pair()
    points = [PrefillPoint(1, 40, 0), PrefillPoint(2, 8, 100), PrefillPoint(1, 3, 7)]
    ticks: list[int] = []
    samples = time_prefill_grid(target, draft, points, warmup=1, repeats=2, tick=ticks.append)
    assert [s.q_lens for s in samples] == [(40,), (8, 8), (3,)]
    assert [s.ctx_lens for s in samples] == [(0,), (100, 100), (7,)]
    # the planner's attention work (each prompt token attends to the prefix and to itself)
    for s, p in zip(samples, points, strict=True):
        assert s.ctx_work == p.batch * chunk_ctx_work(p.offset, p.n)
        assert s.ctx_ktokens == s.ctx_work / 1000.0
        assert s.time_ms > 0
    assert sum(ticks) == 3
    assert target.cache.free_slots == 2 and draft.cache.free_slots == 2


def test_slow_prefill_points_are_measured_again() -> None:
    target, draft = _pair()
    points = [PrefillPoint(1, 16, 0), PrefillPoint(1, 32, 64)]
    measured = time_prefill_grid(target, draft, points, warmup=0, repeats=1)
    inflated = [replace(measured[0], time_ms=1e6), measured[1]]
    out, n = retime_slow_prefill_points(
        target, draft, points, inflated, [s.time_ms for s in measured], repeats=1
    )
    assert n == 1 and out[0].time_ms < 1e6 and out[0].ctx_work == measured[0].ctx_work
    assert out[1] == measured[1]
    assert target.cache.free_slots == 2 and draft.cache.free_slots == 2


def test_prefill_measurement_grows_with_the_chunk_and_fits() -> None:
    """Structure of a real measurement (tiny pair, fp32). Whether the prefill model beats the
    verification model is asserted on synthetic data (test_profile_fit): with tiny fp32 models
    both are overhead-bound and the margin is machine noise, unlike the real bf16 pair."""
    target, draft = _pair(max_len=640)
    points = [PrefillPoint(1, n, d) for n in (16, 64, 192, 512) for d in (0, 96)]
    points += [PrefillPoint(2, 32, 0), PrefillPoint(2, 128, 96)]
    samples = time_prefill_grid(target, draft, points, warmup=1, repeats=3)
    by_point = dict(zip(points, samples, strict=True))
    assert by_point[PrefillPoint(1, 512, 0)].time_ms > by_point[PrefillPoint(1, 16, 0)].time_ms
    model = fit_step_time(samples)
    assert model.fit is not None and model.fit.n_test >= 1
    coef = (model.intercept_ms, model.per_row_ms, model.per_token_ms, model.per_ctx_ktoken_ms)
    assert min(coef) >= 0.0
