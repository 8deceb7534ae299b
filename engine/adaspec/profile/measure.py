"""The two measurements behind a Profile, run against the torch backend's ModelRunner.

Timing: the cost of a forward pass depends on how many tokens sit in each row's KV cache, not on
what they are, so each point sets the slot lengths directly (no prefill) and times
`ModelRunner.forward` with the point's batch and query length, then rolls the slots back.
Prefill points time what an admission runs (adaspec.backends.torch.backend.add): the target
over the prompt chunk (logits of its last token only) and then the draft over it (no logits).

Acceptance: greedy speculative decoding of a fixed prompt set, drafting a fixed number of tokens
per step and verifying them in one target pass; each drafted token up to and including the first
mismatch gives one (draft top-1 probability, target agreed?) observation. Tokens after a
mismatch are not observed, matching what the engine's online correction sees; their draft
confidences are kept apart per step (`DraftStep.off_confidence`) for the simulator's
off-path model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from adaspec.backends.torch.runner import ModelRunner
from adaspec.profile.fit import StepSample
from adaspec.profile.grid import GridPoint, PrefillPoint

Tick = Callable[[int], None]
"""Progress callback: called with the number of units just completed."""


def _noop(_: int) -> None:
    pass


def time_point(
    runner: ModelRunner,
    slots: Sequence[int],
    point: GridPoint,
    repeats: int,
    generator: torch.Generator,
) -> StepSample:
    """Fastest of `repeats` forwards at `point`, in ms.

    The minimum, not the median: on a shared machine noise only ever adds time, so the minimum
    is the stable estimate of the pass's own cost (the engine corrects for load online).
    """
    use = list(slots[: point.batch])
    times = []
    for _ in range(repeats):
        tokens = torch.randint(0, runner.vocab_size, (point.batch, point.q), generator=generator)
        for s in use:
            runner.truncate(s, 0)
            runner.cache.advance(s, point.ctx)
        start = time.perf_counter()
        runner.forward(use, tokens.tolist())
        times.append((time.perf_counter() - start) * 1000.0)
    for s in use:
        runner.truncate(s, 0)
    return StepSample(
        q_lens=(point.q,) * point.batch,
        ctx_lens=(point.ctx,) * point.batch,
        time_ms=min(times),
    )


def time_grid(
    runner: ModelRunner,
    points: Sequence[GridPoint],
    warmup: int,
    repeats: int,
    tick: Tick = _noop,
    seed: int = 0,
) -> list[StepSample]:
    """Time every point; `warmup` untimed forwards at the largest point come first."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    batch = max(p.batch for p in points)
    slots = [runner.alloc() for _ in range(batch)]
    gen = torch.Generator().manual_seed(seed)
    # Shuffled order: slow drift of a shared machine spreads over the grid instead of
    # biasing whichever axis happens to be measured last.
    order = torch.randperm(len(points), generator=gen).tolist()
    out: dict[int, StepSample] = {}
    try:
        if warmup > 0:
            largest = max(points, key=lambda p: (p.tokens, p.ctx))
            time_point(runner, slots, largest, warmup, gen)
        for i in order:
            out[i] = time_point(runner, slots, points[i], repeats, gen)
            tick(1)
        return [out[i] for i in range(len(points))]
    finally:
        for s in slots:
            runner.free(s)


def retime_slow_points(
    runner: ModelRunner,
    points: Sequence[GridPoint],
    samples: Sequence[StepSample],
    predicted: Sequence[float],
    repeats: int,
    threshold: float = 1.25,
    tick: Tick = _noop,
    seed: int = 1,
) -> tuple[list[StepSample], int]:
    """Measure again every point slower than `threshold` × its predicted time; keep the faster.

    On a shared machine another process can hold a core through all repeats of one point; such
    a point is an outlier of the machine's load, not of the model. Measuring it again later
    (the fit is unchanged for well-measured points) removes most of them without discarding
    any data. Returns the samples and how many points were measured again.
    """
    return _retime(
        samples,
        predicted,
        threshold,
        lambda slow: time_grid(runner, [points[i] for i in slow], 0, repeats, tick, seed),
    )


def _retime(
    samples: Sequence[StepSample],
    predicted: Sequence[float],
    threshold: float,
    measure: Callable[[list[int]], list[StepSample]],
) -> tuple[list[StepSample], int]:
    slow = [
        i
        for i, (s, p) in enumerate(zip(samples, predicted, strict=True))
        if s.time_ms > threshold * p
    ]
    if not slow:
        return list(samples), 0
    again = measure(slow)
    out = list(samples)
    for i, s in zip(slow, again, strict=True):
        if s.time_ms < out[i].time_ms:
            out[i] = s
    return out, len(slow)


def chunk_work(point: PrefillPoint) -> float:
    """Attention work of the point's chunks: each token attends to the cached prefix and to
    the chunk up to itself (adaspec.policy.prefill.chunk_ctx_work, summed over the rows)."""
    n, d = point.n, point.offset
    return point.batch * (float(n) * d + n * (n + 1) / 2.0)


def time_prefill_point(
    target: ModelRunner,
    draft: ModelRunner,
    t_slots: Sequence[int],
    d_slots: Sequence[int],
    point: PrefillPoint,
    repeats: int,
    generator: torch.Generator,
) -> StepSample:
    """Fastest of `repeats` target-then-draft passes over the point's chunks, in ms."""
    ts, ds = list(t_slots[: point.batch]), list(d_slots[: point.batch])
    times = []
    vocab = min(target.vocab_size, draft.vocab_size)
    for _ in range(repeats):
        chunks = torch.randint(0, vocab, (point.batch, point.n), generator=generator).tolist()
        for runner, slots in ((target, ts), (draft, ds)):
            for s in slots:
                runner.truncate(s, 0)
                runner.cache.advance(s, point.offset)
        start = time.perf_counter()
        target.forward(ts, chunks, last_n=1)
        draft.forward(ds, chunks, last_n=0)
        times.append((time.perf_counter() - start) * 1000.0)
    for runner, slots in ((target, ts), (draft, ds)):
        for s in slots:
            runner.truncate(s, 0)
    return StepSample(
        q_lens=(point.n,) * point.batch,
        ctx_lens=(point.offset,) * point.batch,
        time_ms=min(times),
        ctx_work=chunk_work(point),
    )


def time_prefill_grid(
    target: ModelRunner,
    draft: ModelRunner,
    points: Sequence[PrefillPoint],
    warmup: int,
    repeats: int,
    tick: Tick = _noop,
    seed: int = 0,
) -> list[StepSample]:
    """Time every prefill point (shuffled, like time_grid). The warm-up runs at the smallest
    point: a pass at the largest costs seconds on CPU, and a slow first pass of a new size
    (allocations) is already discarded by keeping the fastest of the repeats."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not points:
        return []
    batch = max(p.batch for p in points)
    t_slots = [target.alloc() for _ in range(batch)]
    d_slots = [draft.alloc() for _ in range(batch)]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(points), generator=gen).tolist()
    out: dict[int, StepSample] = {}
    try:
        if warmup > 0:
            smallest = min(points, key=lambda p: (p.tokens, p.offset))
            time_prefill_point(target, draft, t_slots, d_slots, smallest, warmup, gen)
        for i in order:
            out[i] = time_prefill_point(target, draft, t_slots, d_slots, points[i], repeats, gen)
            tick(1)
        return [out[i] for i in range(len(points))]
    finally:
        for s in t_slots:
            target.free(s)
        for s in d_slots:
            draft.free(s)


def retime_slow_prefill_points(
    target: ModelRunner,
    draft: ModelRunner,
    points: Sequence[PrefillPoint],
    samples: Sequence[StepSample],
    predicted: Sequence[float],
    repeats: int,
    threshold: float = 1.25,
    tick: Tick = _noop,
    seed: int = 1,
) -> tuple[list[StepSample], int]:
    """retime_slow_points for prefill points."""
    return _retime(
        samples,
        predicted,
        threshold,
        lambda slow: time_prefill_grid(
            target, draft, [points[i] for i in slow], 0, repeats, tick, seed
        ),
    )


@dataclass(frozen=True)
class DraftStep:
    """One row's drafts in one verification step.

    `on_*`: the observed tokens (the accepted ones and the first rejected one), the same
    observations `AcceptanceRun.confidence` / `.accepted` list. `off_confidence`: the draft's
    confidence in the tokens it drafted *after* the first rejected one (they sit on a wrong
    prefix, so the target never judges them); a policy that keeps drafting past a rejection
    decides on these, which is why the simulator's off-path model is fitted from them.
    """

    request: int
    """Index of the prompt in `measure_acceptance`'s `prompts`."""
    on_confidence: tuple[float, ...]
    on_accepted: tuple[bool, ...]
    off_confidence: tuple[float, ...]


@dataclass
class AcceptanceRun:
    confidence: list[float] = field(default_factory=list)
    accepted: list[bool] = field(default_factory=list)
    target_passes: int = 0
    emitted: int = 0
    outputs: list[list[int]] = field(default_factory=list)
    """Tokens generated per prompt (greedy target output; checks the cache bookkeeping)."""
    steps: list[DraftStep] = field(default_factory=list)
    """Every row's drafts of every step, in verification order (within one request: output
    order, so a request's on-path observations concatenated are its `confidence` run)."""


@dataclass
class _Row:
    request: int
    t_slot: int
    d_slot: int
    pending: int
    draft_lag: list[int]
    out: list[int] = field(default_factory=list)


def measure_acceptance(
    target: ModelRunner,
    draft: ModelRunner,
    prompts: Sequence[list[int]],
    draft_len: int,
    max_new_tokens: int,
    eos_ids: frozenset[int],
    tick: Tick = _noop,
) -> AcceptanceRun:
    """Greedy speculative decoding of all prompts as one ragged batch; see module docstring."""
    if draft_len < 1:
        raise ValueError(f"draft_len must be >= 1, got {draft_len}")
    if any(len(p) < 2 for p in prompts):
        raise ValueError("every calibration prompt needs at least two tokens")
    run = AcceptanceRun()
    rows: list[_Row] = []
    try:
        for i, p in enumerate(prompts):
            rows.append(_Row(i, target.alloc(), draft.alloc(), p[-1], [p[-1]]))
            target.forward([rows[-1].t_slot], [p[:-1]], last_n=0)
            draft.forward([rows[-1].d_slot], [p[:-1]], last_n=0)
            tick(0)
        active = list(rows)
        while active:
            # Draft: the first pass feeds each row's lag (1–2 tokens), later passes one token.
            drafts: list[list[int]] = [[] for _ in active]
            confs: list[list[float]] = [[] for _ in active]
            feed = [r.draft_lag for r in active]
            for _ in range(draft_len):
                logits = draft.forward([r.d_slot for r in active], feed, last_n=1)
                feed = []
                for i, lg in enumerate(logits):
                    probs = torch.softmax(lg[-1].float(), dim=-1)
                    conf, tok = probs.max(dim=-1)
                    drafts[i].append(int(tok))
                    confs[i].append(float(conf))
                    feed.append([int(tok)])
            # Verify all drafts in one target pass.
            t_logits = target.forward(
                [r.t_slot for r in active],
                [[r.pending, *d] for r, d in zip(active, drafts, strict=True)],
            )
            run.target_passes += 1
            still = []
            for r, d, c, lg in zip(active, drafts, confs, t_logits, strict=True):
                greedy = lg.argmax(dim=-1).tolist()
                n = 0
                while n < draft_len and d[n] == greedy[n]:
                    n += 1
                observed = min(n + 1, draft_len)
                run.confidence.extend(c[:observed])
                run.accepted.extend(j < n for j in range(observed))
                run.steps.append(
                    DraftStep(
                        request=r.request,
                        on_confidence=tuple(c[:observed]),
                        on_accepted=tuple(j < n for j in range(observed)),
                        off_confidence=tuple(c[observed:]),
                    )
                )
                new = [*d[:n], greedy[n]]
                # Target cache: keep pending + accepted drafts; the correction token is pending.
                t_keep = target.length(r.t_slot) - (draft_len + 1) + 1 + n
                target.truncate(r.t_slot, t_keep)
                # Draft cache holds lag + d[:-1]; keep lag + accepted drafts it has seen.
                d_start = draft.length(r.d_slot) - len(r.draft_lag) - (draft_len - 1)
                seen = min(n, draft_len - 1)
                draft.truncate(r.d_slot, d_start + len(r.draft_lag) + seen)
                r.draft_lag = [*d[seen:n], greedy[n]]
                r.pending = greedy[n]
                tick(max(0, min(len(new), max_new_tokens - len(r.out))))
                r.out.extend(new)
                run.emitted += len(new)
                done = len(r.out) >= max_new_tokens or any(t in eos_ids for t in new)
                room = target.max_len - target.length(r.t_slot) > draft_len + 2
                if not done and room:
                    still.append(r)
            active = still
        run.outputs = [r.out for r in rows]
        return run
    finally:
        for r in rows:
            target.free(r.t_slot)
            draft.free(r.d_slot)
