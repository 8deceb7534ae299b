"""Greedy speculative decoding with the torch backend equals plain greedy decoding of the target.

Tiny random Qwen2 models in fp32. Drafts: the target itself (everything accepted), a noisy copy
(partial acceptance) and an unrelated model (almost nothing accepted). The reference is the HF
model's own forward, token by token, without any cache.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from adaspec.backends.base import (
    Backend,
    ChunkedPrefillBackend,
    PrefillChunks,
    SamplingParams,
    SeqState,
    StepStats,
)
from adaspec.backends.torch import TorchBackend
from adaspec.backends.torch.tiny import noisy_copy, tiny_model
from adaspec.policy.base import (
    BoolArray,
    FloatArray,
    IntArray,
    SpecPolicy,
    StepContext,
    StepOutcome,
    VerifyDecision,
)
from adaspec.policy.baselines import FixedKPolicy, OffPolicy
from adaspec.policy.factory import make_policy


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models are dominated by per-op overhead; extra threads only spin on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class JaggedPolicy:
    """Deterministic test policy: some rows skip drafting, rows stop at different depths, and
    verification prunes odd-context rows by one token. Records what it was shown."""

    name = "jagged"

    def __init__(self) -> None:
        self.outcomes: list[StepOutcome] = []

    def start(self, ctx: StepContext) -> BoolArray:
        out: BoolArray = ctx.context_lens % 3 != 0
        return out

    def keep_drafting(
        self, ctx: StepContext, conf: FloatArray, lens: IntArray, drafting: BoolArray
    ) -> BoolArray:
        depth = 1 + (ctx.context_lens % max(ctx.max_draft, 1))
        out: BoolArray = drafting & (lens < depth)
        return out

    def verify_lengths(self, ctx: StepContext, conf: FloatArray, lens: IntArray) -> VerifyDecision:
        prune = (ctx.context_lens % 2 == 1).astype(np.int64)
        v = np.maximum(lens - prune, 0)
        return VerifyDecision(
            lens=v,
            predicted_step_s=0.0,
            expected_tokens=np.ones(ctx.batch),
            pruned=int((lens - v).sum()),
        )

    def observe(self, outcome: StepOutcome) -> None:
        self.outcomes.append(outcome)


@pytest.fixture(scope="module")
def target() -> Any:
    return tiny_model("qwen2", seed=0)


@pytest.fixture(scope="module")
def drafts(target: Any) -> dict[str, Any]:
    return {
        "same": target,
        "noisy": noisy_copy(target, 0.1, seed=7),
        "unrelated": tiny_model("qwen2", seed=123),
    }


PROMPTS = [
    [5, 17, 33, 8, 91, 12, 40],
    [70, 3],
    [11, 22, 33, 44, 55, 66, 77, 88, 9, 10, 13, 61, 29],
    [4, 4, 4, 4],
    [90, 80, 70, 60, 50, 40],
]
MAX_TOKENS = [14, 9, 18, 6, 12]


def reference_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([toks])).logits[0, -1].argmax())
            out.append(nxt)
            toks.append(nxt)
    return out


@pytest.fixture(scope="module")
def references(target: Any) -> list[list[int]]:
    return [reference_greedy(target, p, n) for p, n in zip(PROMPTS, MAX_TOKENS, strict=True)]


def run_engine(
    backend: TorchBackend,
    policy: SpecPolicy,
    max_draft: int,
    prompts: list[list[int]] = PROMPTS,
    max_tokens: list[int] = MAX_TOKENS,
    params: SamplingParams | None = None,
) -> tuple[list[list[int]], list[StepStats]]:
    """A minimal continuous-batching driver: admit while there is room, step, retire."""
    seqs = [
        SeqState(f"r{i}", p, params or SamplingParams(max_tokens=n))
        for i, (p, n) in enumerate(zip(prompts, max_tokens, strict=True))
    ]
    waiting = list(range(len(prompts)))
    running: list[int] = []
    stats: list[StepStats] = []
    while waiting or running:
        while waiting and len(running) < backend.max_batch:
            i = waiting.pop(0)
            seqs[i].output_ids.append(backend.add(seqs[i]))
            running.append(i)
        batch = [seqs[i] for i in running]
        res = backend.step(batch, policy, max_draft, None)
        stats.append(res.stats)
        assert set(res.new_tokens) == {s.seq_id for s in batch}
        for i in list(running):
            new = res.new_tokens[seqs[i].seq_id]
            assert len(new) >= 1
            seqs[i].output_ids.extend(new)
            if len(seqs[i].output_ids) >= max_tokens[i]:
                del seqs[i].output_ids[max_tokens[i] :]
                backend.remove(seqs[i].seq_id)
                running.remove(i)
    assert backend.running == 0
    return [s.output_ids for s in seqs], stats


def _backend(target: Any, draft: Any, max_batch: int = 3, **kw: Any) -> TorchBackend:
    return TorchBackend(
        target,
        draft,
        max_batch=max_batch,
        max_model_len=kw.pop("max_model_len", 64),
        dtype=torch.float32,
        **kw,
    )


def _policy(kind: str) -> tuple[SpecPolicy, int]:
    if kind == "fixed3":
        return FixedKPolicy(3), 3
    if kind == "jagged4":
        return JaggedPolicy(), 4
    if kind == "adaptive4":
        return make_policy("adaptive", None), 4
    if kind == "fixed5":
        return FixedKPolicy(5), 5
    if kind == "off":
        return OffPolicy(), 0
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("draft_kind", "policy_kind", "max_batch"),
    [
        ("same", "fixed3", 3),
        ("same", "jagged4", 3),
        ("noisy", "fixed3", 3),
        ("noisy", "jagged4", 3),
        ("noisy", "adaptive4", 3),
        ("noisy", "fixed5", 1),
        ("noisy", "fixed3", 5),
        ("noisy", "off", 3),
        ("unrelated", "fixed3", 3),
        ("unrelated", "jagged4", 2),
    ],
)
def test_greedy_speculation_equals_plain_greedy(
    target: Any,
    drafts: dict[str, Any],
    references: list[list[int]],
    draft_kind: str,
    policy_kind: str,
    max_batch: int,
) -> None:
    policy, max_draft = _policy(policy_kind)
    backend = _backend(target, drafts[draft_kind], max_batch=max_batch)
    outputs, stats = run_engine(backend, policy, max_draft)
    assert outputs == references
    proposed = sum(s.proposed for s in stats)
    verified = sum(s.verified for s in stats)
    accepted = sum(s.accepted for s in stats)
    assert accepted <= verified <= proposed
    assert all(len(s.spec_lens) == s.batch for s in stats)
    assert all(max(s.spec_lens) <= max_draft for s in stats)
    if policy_kind == "off":
        assert proposed == 0 and all(s.decision is None for s in stats)
        return
    assert verified > 0
    if policy_kind == "fixed3" or policy_kind == "fixed5":
        assert verified == proposed
    if draft_kind == "same":
        assert accepted == verified  # the draft is the target: every token is accepted
    elif draft_kind == "noisy":
        assert 0.2 * verified < accepted < verified  # real, partial acceptance
    else:
        assert accepted < 0.2 * verified
    if policy_kind == "jagged4":
        assert any(s.decision is not None and s.decision.pruned > 0 for s in stats)
        assert len({len_ for s in stats for len_ in s.spec_lens}) > 2  # ragged lengths


def test_policy_sees_consistent_outcomes(target: Any, drafts: dict[str, Any]) -> None:
    policy = JaggedPolicy()
    run_engine(_backend(target, drafts["noisy"]), policy, 4)
    assert policy.outcomes
    for o in policy.outcomes:
        drafted = o.drafted_lens
        assert o.conf.shape == (len(o.context_lens), 4)
        assert (o.verified_lens <= drafted).all() and (o.accepted <= o.verified_lens).all()
        inside = np.arange(4)[None, :] < drafted[:, None]
        assert ((o.conf > 0) & (o.conf <= 1) | ~inside).all()
        assert (o.conf[~inside] == 0).all()
        assert o.draft_time_s >= 0 and o.verify_time_s > 0


def test_caches_hold_exactly_the_committed_tokens(target: Any, drafts: dict[str, Any]) -> None:
    """After steps with rejections, both caches equal a fresh prefill of the committed tokens."""
    backend = _backend(target, drafts["noisy"], max_batch=2)
    seqs = [
        SeqState("a", PROMPTS[0], SamplingParams()),
        SeqState("b", PROMPTS[2], SamplingParams()),
    ]
    for s in seqs:
        s.output_ids.append(backend.add(s))
    rejected = 0
    for _ in range(5):
        res = backend.step(seqs, FixedKPolicy(4), 4, None)
        rejected += res.stats.verified - res.stats.accepted
        for s in seqs:
            s.output_ids.extend(res.new_tokens[s.seq_id])
    assert rejected > 0
    for s in seqs:
        assert_caches_hold(backend, s.seq_id, [*s.prompt_ids, *s.output_ids])


def _assert_slot_equals_fresh_prefill(
    runner: Any, slot: int, fresh_runner: Any, tokens: list[int]
) -> None:
    n = len(tokens)
    assert runner.length(slot) == n
    if n == 0:
        return
    fs = fresh_runner.alloc()
    fresh_runner.forward([fs], [tokens], last_n=0)
    for layer in range(len(runner.cache.keys)):
        for got, want in (
            (runner.cache.keys[layer], fresh_runner.cache.keys[layer]),
            (runner.cache.values[layer], fresh_runner.cache.values[layer]),
        ):
            torch.testing.assert_close(got[slot, :, :n], want[fs, :, :n], atol=1e-5, rtol=0)
    fresh_runner.free(fs)


def assert_caches_hold(backend: TorchBackend, seq_id: str, committed: list[int]) -> None:
    """Both caches of a decoding request equal a fresh prefill of its committed tokens minus
    what is pending (the module invariant: target + 1 == draft + len(draft_lag) == committed)."""
    row = backend._rows[seq_id]
    fresh = TorchBackend(
        backend.target.model,
        backend.draft.model if backend.draft is not None else None,
        max_batch=1,
        max_model_len=backend.max_model_len,
        dtype=torch.float32,
    )
    n_t = backend.target.length(row.t_slot)
    assert n_t == len(committed) - 1
    assert row.pending == committed[-1]
    _assert_slot_equals_fresh_prefill(backend.target, row.t_slot, fresh.target, committed[:n_t])
    if backend.draft is not None:
        assert row.d_slot is not None and fresh.draft is not None
        n_d = backend.draft.length(row.d_slot)
        assert n_d + len(row.draft_lag) == len(committed)
        assert row.draft_lag == committed[n_d:]
        _assert_slot_equals_fresh_prefill(backend.draft, row.d_slot, fresh.draft, committed[:n_d])


def test_slots_are_reused_and_membership_errors_are_clear(
    target: Any, drafts: dict[str, Any]
) -> None:
    backend = _backend(target, drafts["noisy"], max_batch=2)
    as_protocol: Backend = backend  # mypy checks TorchBackend against the Backend protocol
    chunked: ChunkedPrefillBackend = backend  # ... and the chunked-prefill one
    assert chunked.chunked_prefill and chunked.has_draft
    assert as_protocol.max_batch == 2 and as_protocol.eos_token_ids == frozenset({1})
    for round_ in range(4):  # more requests over time than slots
        a = SeqState(f"a{round_}", PROMPTS[1], SamplingParams())
        b = SeqState(f"b{round_}", PROMPTS[3], SamplingParams())
        backend.add(a)
        backend.add(b)
        with pytest.raises(RuntimeError, match="batch is full"):
            backend.add(SeqState("c", [5], SamplingParams()))
        backend.remove(a.seq_id)
        backend.remove(b.seq_id)
    assert backend.target.cache.free_slots == 2
    assert backend.draft is not None and backend.draft.cache.free_slots == 2
    backend.remove("never-added")  # idempotent
    s = SeqState("x", [5, 6], SamplingParams())
    backend.add(s)
    with pytest.raises(ValueError, match="already running"):
        backend.add(s)
    with pytest.raises(ValueError, match="prompt_ids"):
        backend.add(SeqState("y", [], SamplingParams()))
    with pytest.raises(ValueError, match="prompt_ids"):
        backend.add(SeqState("y", [5, 1000], SamplingParams()))
    with pytest.raises(ValueError, match="prompt_ids"):
        backend.add(SeqState("y", list(range(3, 70)), SamplingParams()))
    with pytest.raises(ValueError, match="temperature"):
        backend.add(SeqState("y", [5], SamplingParams(temperature=-1.0)))
    with pytest.raises(ValueError, match="top_p"):
        backend.add(SeqState("y", [5], SamplingParams(temperature=1.0, top_p=0.0)))
    with pytest.raises(KeyError, match="not running"):
        backend.step([SeqState("zz", [5], SamplingParams())], OffPolicy(), 0, None)
    assert backend.running == 1


def test_generation_up_to_max_model_len(target: Any, drafts: dict[str, Any]) -> None:
    """Drafting is capped by the room left in the cache; output stays exact to the last slot."""
    max_len = 20
    backend = _backend(target, drafts["same"], max_batch=1, max_model_len=max_len)
    seq = SeqState("a", PROMPTS[0], SamplingParams())
    seq.output_ids.append(backend.add(seq))
    for _ in range(max_len):
        try:
            res = backend.step([seq], FixedKPolicy(5), 5, None)
        except ValueError as e:
            assert "max_model_len" in str(e)
            break
        seq.output_ids.extend(res.new_tokens["a"])
    else:
        raise AssertionError("never reached max_model_len")
    n = len(seq.output_ids)
    assert len(seq.prompt_ids) + n == max_len + 1  # the last token needs no cache entry
    assert seq.output_ids == reference_greedy(target, seq.prompt_ids, n)


def test_acceptance_override_emits_drafts_as_accepted(target: Any, drafts: dict[str, Any]) -> None:
    draft = drafts["unrelated"]
    calls: list[tuple[np.ndarray, np.ndarray]] = []

    def accept_all(conf: np.ndarray, lens: np.ndarray) -> np.ndarray:
        calls.append((conf.copy(), lens.copy()))
        return lens

    backend = _backend(target, draft, max_batch=1, acceptance_override=accept_all)
    seq = SeqState("a", PROMPTS[2], SamplingParams())
    first = backend.add(seq)
    res = backend.step([seq], FixedKPolicy(3), 3, None)
    ctx = [*seq.prompt_ids, first]
    d = reference_greedy(draft, ctx, 3)
    x = reference_greedy(target, ctx + d, 1)
    assert res.new_tokens["a"] == d + x
    assert res.stats.accepted == res.stats.verified == 3
    assert len(calls) == 1 and calls[0][1].tolist() == [3] and calls[0][0].shape == (1, 3)


def test_llama_pair_and_no_draft_are_exact() -> None:
    llama = tiny_model("llama", seed=5)
    refs = [reference_greedy(llama, p, n) for p, n in zip(PROMPTS, MAX_TOKENS, strict=True)]
    backend = _backend(llama, noisy_copy(llama, 0.1, seed=9), max_batch=3)
    outputs, stats = run_engine(backend, JaggedPolicy(), 3)
    assert outputs == refs
    assert sum(s.accepted for s in stats) > 0
    # Without a draft model every step is plain decoding, whatever the policy asks.
    plain = _backend(llama, None, max_batch=2)
    outputs, stats = run_engine(plain, FixedKPolicy(3), 3)
    assert outputs == refs
    assert all(s.proposed == 0 and s.decision is None for s in stats)


def test_guard_refusals_and_infeasibility_reach_the_step_stats(
    target: Any, drafts: dict[str, Any]
) -> None:
    """When the SLO guard refuses to draft at all, the step still reports it (metrics need it)."""
    from adaspec.policy.adaptive import AdaSpecPolicy

    backend = _backend(target, drafts["same"], max_batch=2)
    policy = AdaSpecPolicy()  # default CPU time model: a draft pass costs ~40% of a verify
    seqs = [SeqState(f"r{i}", [5 + i, 7, 9], SamplingParams(max_tokens=8)) for i in range(2)]
    for s in seqs:
        s.output_ids.append(backend.add(s))
    plain = policy.predicted_plain_step_s(np.array([4, 4], dtype=np.int64))
    tight = backend.step(seqs, policy, max_draft=4, budget_s=plain * 1.01)
    assert tight.stats.proposed == 0
    assert tight.stats.decision is not None
    assert tight.stats.decision.guard_refusals > 0 and not tight.stats.decision.infeasible
    impossible = backend.step(seqs, policy, max_draft=4, budget_s=plain * 0.1)
    assert impossible.stats.decision is not None and impossible.stats.decision.infeasible


# ----------------------------------------------------------------------------- chunked prefill


def run_chunked(
    backend: TorchBackend,
    policy: SpecPolicy,
    max_draft: int,
    *,
    chunk_sizes: list[int],
    admit_at: list[int],
    prompts: list[list[int]] = PROMPTS,
    max_tokens: list[int] = MAX_TOKENS,
    params: SamplingParams | None = None,
    check_caches: bool = False,
    extra_s: float = 0.0,
) -> tuple[list[list[int]], list[StepStats]]:
    """Like `run_engine`, but prompts are registered at step `admit_at[i]` (when there is room)
    and fed in chunks cycling through `chunk_sizes`, riding along with the decoding steps."""
    seqs = [
        SeqState(f"r{i}", p, params or SamplingParams(max_tokens=n))
        for i, (p, n) in enumerate(zip(prompts, max_tokens, strict=True))
    ]
    sizes = itertools.cycle(chunk_sizes)
    waiting = list(range(len(prompts)))
    prefilling: list[int] = []
    running: list[int] = []
    done = [0] * len(prompts)
    stats: list[StepStats] = []
    step = 0
    while waiting or prefilling or running:
        while (
            waiting
            and admit_at[waiting[0]] <= step
            and len(prefilling) + len(running) < backend.max_batch
        ):
            i = waiting.pop(0)
            backend.begin_prefill(seqs[i])
            prefilling.append(i)
        chunks = {seqs[i].seq_id: min(next(sizes), len(prompts[i]) - done[i]) for i in prefilling}
        batch = [seqs[i] for i in running]
        res = backend.step(batch, policy, max_draft, None, PrefillChunks(chunks, extra_s))
        step += 1
        stats.append(res.stats)
        finishing = [i for i in prefilling if done[i] + chunks[seqs[i].seq_id] == len(prompts[i])]
        expected = {s.seq_id for s in batch} | {seqs[i].seq_id for i in finishing}
        assert set(res.new_tokens) == expected
        assert res.stats.batch == len(batch)
        assert res.stats.prefill_tokens == sum(chunks.values())
        assert res.stats.prefill_done == len(finishing)
        for i in list(running):
            seqs[i].output_ids.extend(res.new_tokens[seqs[i].seq_id])
        for i in prefilling:
            done[i] += chunks[seqs[i].seq_id]
        for i in finishing:
            assert len(res.new_tokens[seqs[i].seq_id]) == 1
            seqs[i].output_ids.extend(res.new_tokens[seqs[i].seq_id])
            prefilling.remove(i)
            running.append(i)
        for i in list(running):
            if len(seqs[i].output_ids) >= max_tokens[i]:
                del seqs[i].output_ids[max_tokens[i] :]
                backend.remove(seqs[i].seq_id)
                running.remove(i)
        if check_caches:
            for i in running:
                s = seqs[i]
                assert_caches_hold(backend, s.seq_id, [*s.prompt_ids, *s.output_ids])
            for i in prefilling:
                p = backend._prefilling[seqs[i].seq_id]
                assert p.done == done[i] == backend.target.length(p.t_slot)
                if backend.draft is not None and p.d_slot is not None:
                    assert backend.draft.length(p.d_slot) == done[i]
    assert backend.running == 0
    assert backend.target.cache.free_slots == backend.max_batch
    return [s.output_ids for s in seqs], stats


@pytest.mark.parametrize(
    ("draft_kind", "policy_kind", "max_batch", "chunk_sizes", "admit_at"),
    [
        ("noisy", "fixed3", 3, [3, 5, 2], [0, 0, 2, 3, 5]),
        ("noisy", "jagged4", 2, [4, 1, 6], [0, 1, 1, 4, 4]),
        ("noisy", "adaptive4", 3, [5], [0, 3, 3, 3, 9]),
        ("noisy", "off", 3, [2, 7], [0, 1, 2, 3, 4]),
        ("same", "fixed5", 5, [1], [0, 0, 0, 0, 0]),
        ("unrelated", "fixed3", 4, [13, 3], [1, 0, 6, 2, 2]),
    ],
)
def test_chunked_prefill_equals_plain_greedy(
    target: Any,
    drafts: dict[str, Any],
    references: list[list[int]],
    draft_kind: str,
    policy_kind: str,
    max_batch: int,
    chunk_sizes: list[int],
    admit_at: list[int],
) -> None:
    """Prompts split unevenly over steps, admitted while others decode: exactly the plain
    greedy output, with both caches holding exactly the committed tokens after every step."""
    policy, max_draft = _policy(policy_kind)
    backend = _backend(target, drafts[draft_kind], max_batch=max_batch)
    outputs, stats = run_chunked(
        backend, policy, max_draft, chunk_sizes=chunk_sizes, admit_at=admit_at, check_caches=True
    )
    assert outputs == references
    mixed = [s for s in stats if s.batch > 0 and s.prefill_tokens > 0]
    assert mixed, "no step fed a chunk along with decoding rows"
    if policy_kind == "off":
        assert all(s.draft_passes == 0 for s in stats)  # chunks got their own draft forward
    else:
        assert any(s.draft_passes > 0 for s in mixed)  # chunks rode along with draft pass 0


def test_chunked_prefill_without_a_draft_is_exact(target: Any, references: list[list[int]]) -> None:
    backend = _backend(target, None, max_batch=3)
    outputs, _ = run_chunked(
        backend, FixedKPolicy(3), 3, chunk_sizes=[4, 3], admit_at=[0, 2, 2, 5, 5]
    )
    assert outputs == references


def test_chunked_prefill_samples_like_whole_prompt_admission(
    target: Any, drafts: dict[str, Any]
) -> None:
    """Same backend seed, same admission order: each request draws the same random stream
    whether its prompt was prefilled whole or in chunks, so the sampled outputs are equal."""
    params = SamplingParams(temperature=1.0)
    whole, _ = run_engine(
        _backend(target, drafts["noisy"], max_batch=3, seed=11), FixedKPolicy(3), 3, params=params
    )
    chunked, _ = run_chunked(
        _backend(target, drafts["noisy"], max_batch=3, seed=11),
        FixedKPolicy(3),
        3,
        chunk_sizes=[2, 5],
        admit_at=[0, 1, 3, 3, 8],
        params=params,
    )
    other, _ = run_engine(
        _backend(target, drafts["noisy"], max_batch=3, seed=12), FixedKPolicy(3), 3, params=params
    )
    assert chunked == whole
    assert other != whole  # the seed matters: the comparison above can fail


class RecordingPolicy(JaggedPolicy):
    """Records every StepContext it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.contexts: list[StepContext] = []

    def start(self, ctx: StepContext) -> BoolArray:
        self.contexts.append(ctx)
        return super().start(ctx)


def test_policy_never_sees_prefilling_rows_but_sees_their_cost(
    target: Any, drafts: dict[str, Any]
) -> None:
    backend = _backend(target, drafts["noisy"], max_batch=3)
    policy = RecordingPolicy()
    a = SeqState("a", PROMPTS[0], SamplingParams())
    a.output_ids.append(backend.add(a))
    b = SeqState("b", PROMPTS[2], SamplingParams())
    backend.begin_prefill(b)
    assert backend.running == 2
    with pytest.raises(KeyError, match="still prefilling"):
        backend.step([a, b], policy, 4, None)
    res = backend.step([a], policy, 4, None, PrefillChunks({"b": 5}, extra_s=0.25))
    assert set(res.new_tokens) == {"a"}
    assert policy.contexts[-1].batch == 1 and policy.contexts[-1].prefill_extra_s == 0.25
    assert policy.outcomes[-1].prefill_extra_s == 0.25
    assert len(policy.outcomes[-1].context_lens) == 1
    res = backend.step([a], policy, 4, None)  # b waits this step: no chunk, no extra
    assert policy.contexts[-1].prefill_extra_s == 0.0 and res.stats.prefill_tokens == 0
    # a step with only a prompt chunk: the policy is not consulted at all
    n_ctx, n_out = len(policy.contexts), len(policy.outcomes)
    res = backend.step([], policy, 4, None, PrefillChunks({"b": 8}, extra_s=0.1))
    assert set(res.new_tokens) == {"b"} and res.stats.batch == 0 and res.stats.prefill_done == 1
    assert (len(policy.contexts), len(policy.outcomes)) == (n_ctx, n_out)
    assert res.new_tokens["b"] == reference_greedy(target, PROMPTS[2], 1)


def test_chunked_prefill_membership_and_plan_errors(target: Any, drafts: dict[str, Any]) -> None:
    backend = _backend(target, drafts["noisy"], max_batch=2)
    a = SeqState("a", PROMPTS[0], SamplingParams())
    backend.begin_prefill(a)
    backend.begin_prefill(SeqState("b", PROMPTS[1], SamplingParams()))
    with pytest.raises(RuntimeError, match="batch is full"):
        backend.begin_prefill(SeqState("c", [5], SamplingParams()))
    with pytest.raises(RuntimeError, match="batch is full"):
        backend.add(SeqState("c", [5], SamplingParams()))
    with pytest.raises(ValueError, match="already running"):
        backend.begin_prefill(a)
    with pytest.raises(ValueError, match=r"outside \[1, 7\]"):
        backend.step([], OffPolicy(), 0, None, PrefillChunks({"a": 8}))
    with pytest.raises(ValueError, match=r"outside \[1, 7\]"):
        backend.step([], OffPolicy(), 0, None, PrefillChunks({"a": 0}))
    with pytest.raises(KeyError, match="not running"):
        backend.step([], OffPolicy(), 0, None, PrefillChunks({"zz": 1}))
    backend.remove("b")  # an abort while prefilling frees both slots
    assert backend.running == 1
    assert backend.target.cache.free_slots == 1
    assert backend.draft is not None and backend.draft.cache.free_slots == 1
    with pytest.raises(ValueError, match="prompt_ids"):
        backend.begin_prefill(SeqState("y", [5, 1000], SamplingParams()))
    with pytest.raises(ValueError, match="prompt_ids"):
        backend.begin_prefill(SeqState("y", list(range(3, 70)), SamplingParams()))
    with pytest.raises(ValueError, match="temperature"):
        backend.begin_prefill(SeqState("y", [5], SamplingParams(temperature=-1.0)))
    assert backend.running == 1 and backend.target.cache.free_slots == 1  # refusals hold nothing
    res = backend.step([], OffPolicy(), 0, None, PrefillChunks({"a": 7}))
    assert res.new_tokens == {"a": reference_greedy(target, PROMPTS[0], 1)}
    with pytest.raises(KeyError, match="decoding"):
        backend.step([], OffPolicy(), 0, None, PrefillChunks({"a": 1}))


# ----------------------------------------------------------------------------- per-request cap


class SpyFixedK(FixedKPolicy):
    """FixedKPolicy that records what the backend tells it about drafting rows."""

    def __init__(self, k: int) -> None:
        super().__init__(k)
        self.keep_calls: list[tuple[int, IntArray, BoolArray]] = []
        """(step index, lens, drafting) per keep_drafting call."""
        self.verify_confs: list[FloatArray] = []
        self.outcomes: list[StepOutcome] = []

    def keep_drafting(
        self, ctx: StepContext, conf: FloatArray, lens: IntArray, drafting: BoolArray
    ) -> BoolArray:
        self.keep_calls.append((len(self.outcomes), lens.copy(), drafting.copy()))
        return super().keep_drafting(ctx, conf, lens, drafting)

    def verify_lengths(self, ctx: StepContext, conf: FloatArray, lens: IntArray) -> VerifyDecision:
        self.verify_confs.append(conf.copy())
        return super().verify_lengths(ctx, conf, lens)

    def observe(self, outcome: StepOutcome) -> None:
        self.outcomes.append(outcome)


def _run_batch(
    backend: TorchBackend, policy: SpecPolicy, k: int, seqs: list[SeqState], limits: list[int]
) -> list[tuple[list[str], StepStats]]:
    """Admit every request, step them together until each has `limits[i]` tokens; returns each
    step's batch (seq ids in order) with its stats."""
    running = list(zip(seqs, limits, strict=True))
    for s, _ in running:
        s.output_ids.append(backend.add(s))
    steps = []
    while running:
        batch = [s for s, _ in running]
        res = backend.step(batch, policy, k, None)
        steps.append(([s.seq_id for s in batch], res.stats))
        still = []
        for s, n in running:
            s.output_ids.extend(res.new_tokens[s.seq_id])
            if len(s.output_ids) >= n:
                del s.output_ids[n:]
                backend.remove(s.seq_id)
            else:
                still.append((s, n))
        running = still
    return steps


def test_per_request_draft_cap_limits_drafting_and_stays_lossless(
    target: Any, drafts: dict[str, Any], references: list[list[int]]
) -> None:
    """Caps 0 and 1 next to an uncapped request under fixed K=4: the capped rows never draft
    past their cap (0: never), the policy is told exactly that, greedy output is unchanged."""
    caps = {"c0": 0, "c1": 1, "free": None}
    seqs = [
        SeqState(sid, PROMPTS[i], SamplingParams(max_tokens=MAX_TOKENS[i], max_draft=cap))
        for i, (sid, cap) in enumerate(caps.items())
    ]
    policy = SpyFixedK(4)
    steps = _run_batch(
        _backend(target, drafts["noisy"], max_batch=3), policy, 4, seqs, MAX_TOKENS[:3]
    )
    assert [s.output_ids for s in seqs] == references[:3]

    lens_seen: dict[str, list[int]] = {sid: [] for sid in caps}
    for (ids, stats), outcome in zip(steps, policy.outcomes, strict=True):
        assert stats.proposed == int(outcome.drafted_lens.sum())
        for sid, spec, drafted in zip(ids, stats.spec_lens, outcome.drafted_lens, strict=True):
            lens_seen[sid].append(spec)
            cap = caps[sid]
            if cap is not None:
                assert spec <= cap and drafted <= cap, (sid, spec, drafted)
    assert set(lens_seen["c0"]) == {0}  # never speculates
    assert max(lens_seen["c1"]) == 1  # capped, but does draft
    assert max(lens_seen["free"]) == 4  # the same batch drafts the full K for the uncapped row
    # The policy is never told that a row drafts past its cap.
    assert policy.keep_calls
    for step, lens, drafting in policy.keep_calls:
        for sid, n, on in zip(steps[step][0], lens, drafting, strict=True):
            cap = caps[sid]
            assert cap is None or n <= cap
            assert not (on and cap == 0)
    for o in policy.outcomes:
        inside = np.arange(o.conf.shape[1])[None, :] < o.drafted_lens[:, None]
        assert (o.conf[~inside] == 0).all()


def test_cap_zero_sampled_request_decodes_exactly_like_plain_decoding(
    target: Any, drafts: dict[str, Any]
) -> None:
    """A sampled request with max_draft=0 in a speculating batch draws the same random stream
    as the same request under plain decoding: it verifies nothing, so it samples nothing extra."""
    capped = SeqState("s", PROMPTS[0], SamplingParams(temperature=1.0, seed=5, max_draft=0))
    mate = SeqState("g", PROMPTS[2], SamplingParams())
    steps = _run_batch(
        _backend(target, drafts["noisy"], max_batch=2), FixedKPolicy(3), 3, [capped, mate], [14, 18]
    )
    assert sum(st.proposed for _, st in steps) > 0  # the batch did speculate
    alone = SeqState("s", PROMPTS[0], SamplingParams(temperature=1.0, seed=5))
    _run_batch(_backend(target, drafts["noisy"], max_batch=1), OffPolicy(), 0, [alone], [14])
    assert capped.output_ids == alone.output_ids
    other = SeqState("s", PROMPTS[0], SamplingParams(temperature=1.0, seed=6))
    _run_batch(_backend(target, drafts["noisy"], max_batch=1), OffPolicy(), 0, [other], [14])
    assert other.output_ids != alone.output_ids  # the seed matters: the comparison can fail


@pytest.mark.parametrize("bad", [-1, True, 1.5])
def test_bad_draft_cap_is_refused_naming_the_field(
    target: Any, drafts: dict[str, Any], bad: Any
) -> None:
    backend = _backend(target, drafts["noisy"], max_batch=1)
    with pytest.raises(ValueError, match=r"params\.max_draft"):
        backend.add(SeqState("a", [5, 6], SamplingParams(max_draft=bad)))
    with pytest.raises(ValueError, match=r"params\.max_draft"):
        backend.begin_prefill(SeqState("a", [5, 6], SamplingParams(max_draft=bad)))
    assert backend.running == 0


# ----------------------------------------------------------------------------- confidence hook


def test_confidence_override_replaces_what_the_policy_sees(
    target: Any, drafts: dict[str, Any]
) -> None:
    """The hook gets the real confidences (those recorded without it) and its answer is what the
    policy sees; the drafted tokens and outputs do not change."""
    seen: list[tuple[list[str], int, np.ndarray]] = []

    def synthetic(ids: list[str], j: int, real: np.ndarray) -> np.ndarray:
        seen.append((list(ids), j, real.copy()))
        return np.array([0.1 * (j + 1) + (0.05 if sid == "b" else 0.0) for sid in ids])

    def run(override: Any) -> tuple[SpyFixedK, list[list[int]]]:
        backend = _backend(target, drafts["noisy"], max_batch=2, confidence_override=override)
        seqs = [SeqState(sid, PROMPTS[i], SamplingParams()) for i, sid in enumerate("ab")]
        policy = SpyFixedK(3)
        _run_batch(backend, policy, 3, seqs, [6, 6])
        return policy, [s.output_ids for s in seqs]

    plain, plain_out = run(None)
    spied, spied_out = run(synthetic)
    assert spied_out == plain_out
    want = np.array([[0.1, 0.2, 0.3], [0.15, 0.25, 0.35]])
    for conf in spied.verify_confs:
        np.testing.assert_allclose(conf, want[: conf.shape[0]])
    # The hook saw the real confidences, row by row and pass by pass.
    assert [ids for ids, _, _ in seen[:3]] == [["a", "b"]] * 3
    assert [j for _, j, _ in seen[:3]] == [0, 1, 2]
    real = np.stack([r for _, _, r in seen[:3]], axis=1)
    np.testing.assert_array_equal(real, plain.verify_confs[0])

    bad = _backend(
        target, drafts["noisy"], max_batch=1, confidence_override=lambda i, j, r: np.ones(3)
    )
    s = SeqState("a", PROMPTS[0], SamplingParams())
    s.output_ids.append(bad.add(s))
    with pytest.raises(ValueError, match="confidence_override returned shape"):
        bad.step([s], FixedKPolicy(2), 2, None)
