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
