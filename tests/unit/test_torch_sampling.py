"""Sampled speculative decoding follows the target distribution (lossless rejection sampling)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from adaspec.backends.base import SamplingParams, SeqState
from adaspec.backends.torch import TorchBackend
from adaspec.backends.torch.sampling import (
    accept_greedy,
    probs_from_logits,
    sample_inverse_cdf,
    verify_greedy,
    verify_sampled,
)
from adaspec.backends.torch.tiny import tiny_model
from adaspec.policy.baselines import FixedKPolicy


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models are dominated by per-op overhead; extra threads only spin on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tv(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(a - b).sum())


def tv_noise(p: np.ndarray, n: int) -> float:
    """Expected TV distance of an n-sample empirical distribution from p (normal approx.)."""
    return 0.5 * float(np.sqrt(2.0 * p * (1.0 - p) / (math.pi * n)).sum())


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson–Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.001)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def chi2(counts: np.ndarray, p: np.ndarray) -> float:
    expected = p * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_rejection_sampling_emits_target_distribution() -> None:
    """Three draft positions with fixed p/q: each emitted position follows p at that position."""
    V, s, n = 6, 3, 20000
    gen = torch.Generator().manual_seed(1234)
    p = torch.tensor(
        [
            [0.40, 0.25, 0.15, 0.10, 0.05, 0.05],
            [0.05, 0.05, 0.30, 0.30, 0.20, 0.10],
            [0.10, 0.10, 0.10, 0.10, 0.30, 0.30],
            [0.50, 0.00, 0.20, 0.10, 0.10, 0.10],
        ]
    )
    q = torch.tensor(
        [
            [0.10, 0.10, 0.20, 0.20, 0.20, 0.20],
            [0.30, 0.30, 0.10, 0.10, 0.10, 0.10],
            [0.00, 0.20, 0.20, 0.20, 0.20, 0.20],
        ]
    )
    counts = np.zeros((s + 1, V))
    accepted = np.zeros(s + 1)
    for _ in range(n):
        drafts = [int(torch.multinomial(q[j], 1, generator=gen)) for j in range(s)]
        out = verify_sampled(drafts, q, p, gen)
        assert len(out.tokens) == out.accepted + 1
        assert out.tokens[: out.accepted] == drafts[: out.accepted]
        accepted[out.accepted] += 1
        for j, tok in enumerate(out.tokens):
            counts[j, tok] += 1
    for j in range(s + 1):
        pj = p[j].double().numpy()
        total = counts[j].sum()
        assert total > 500
        emp = counts[j] / total
        support = pj > 0
        assert counts[j][~support].sum() == 0  # never a token the target rules out
        assert chi2(counts[j][support], pj[support]) < chi2_critical(int(support.sum()) - 1)
        assert tv(emp, pj) < 3 * tv_noise(pj, int(total))
    # Acceptance of the first position is Σ min(p, q) (the theory of rejection sampling).
    alpha0 = float(torch.minimum(p[0], q[0]).sum())
    assert abs(1 - accepted[0] / n - alpha0) < 0.02


def test_greedy_verify_accepts_matching_prefix() -> None:
    logits = torch.full((4, 5), -1.0)
    for j, best in enumerate([2, 4, 0, 3]):
        logits[j, best] = 1.0
    assert verify_greedy([2, 4, 0], logits).tokens == [2, 4, 0, 3]
    v = verify_greedy([2, 1, 0], logits)
    assert (v.accepted, v.tokens) == (1, [2, 4])
    assert verify_greedy([], logits[:1]).tokens == [2]
    ids = logits.argmax(dim=-1).tolist()
    assert accept_greedy([2, 1, 0], ids) == verify_greedy([2, 1, 0], logits)


def test_inverse_cdf_sampler_follows_the_weights() -> None:
    """The sampler used when probabilities live on another device than the generator (a GPU):
    tested here on CPU by calling it directly. Unnormalised weights; zero weights never drawn,
    including the first and the last token."""
    w = torch.tensor([0.0, 3.0, 1.0, 0.0, 0.5, 2.5, 0.0])
    pj = (w / w.sum()).double().numpy()
    gen = torch.Generator().manual_seed(99)
    n = 20000
    counts = np.zeros(len(w))
    for _ in range(n):
        counts[sample_inverse_cdf(w, gen)] += 1
    support = pj > 0
    assert counts[~support].sum() == 0
    assert chi2(counts[support], pj[support]) < chi2_critical(int(support.sum()) - 1)
    assert tv(counts / n, pj) < 3 * tv_noise(pj, n)
    one_hot = torch.zeros(5)
    one_hot[4] = 1.0
    assert {sample_inverse_cdf(one_hot, gen) for _ in range(50)} == {4}


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = probs_from_logits(probs.log(), 1.0, 0.7)
    torch.testing.assert_close(out, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    out = probs_from_logits(probs.log(), 1.0, 0.5)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(probs_from_logits(probs.log(), 1.0, 1.0), probs)
    hot = probs_from_logits(probs.log(), 2.0, 1.0)
    expected = probs.sqrt() / probs.sqrt().sum()
    torch.testing.assert_close(hot, expected)


# ----------------------------------------------------------------------------- end to end

VOCAB = 8
PROMPT = [3, 5, 7, 2]


def _small(seed: int) -> Any:
    model = tiny_model("qwen2", seed=seed, vocab_size=VOCAB)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)  # undo part of the sharpening: spread distributions
    return model


def _exact(model: Any, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Exact marginals of generated tokens 2 and 3 from the model's own forward."""
    with torch.no_grad():
        p1 = probs_from_logits(
            model(torch.tensor([PROMPT])).logits[0, -1:], params.temperature, params.top_p
        )[0]
        ctx2 = torch.tensor([[*PROMPT, a] for a in range(VOCAB)])
        p2 = probs_from_logits(model(ctx2).logits[:, -1], params.temperature, params.top_p)
        ctx3 = torch.tensor([[*PROMPT, a, b] for a in range(VOCAB) for b in range(VOCAB)])
        p3 = probs_from_logits(model(ctx3).logits[:, -1], params.temperature, params.top_p)
    joint12 = p1[:, None] * p2  # [t1, t2]
    m2 = joint12.sum(0)
    m3 = (joint12.reshape(-1, 1) * p3).sum(0)
    return m2.double().numpy(), m3.double().numpy()


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_p=0.9)],
    ids=["t1", "t0.8-p0.9"],
)
def test_sampled_speculation_follows_target_distribution(params: SamplingParams) -> None:
    target, draft = _small(0), _small(58)
    n = 2000
    backend = TorchBackend(target, draft, max_batch=16, max_model_len=16, dtype=torch.float32)
    policy = FixedKPolicy(2)
    counts2 = np.zeros(VOCAB)
    counts3 = np.zeros(VOCAB)
    acc = ver = 0
    for start in range(0, n, backend.max_batch):
        seqs = []
        for i in range(start, start + backend.max_batch):
            p = SamplingParams(temperature=params.temperature, top_p=params.top_p, seed=i)
            seq = SeqState(f"s{i}", PROMPT, p)
            seq.output_ids.append(backend.add(seq))
            seqs.append(seq)
        while any(len(s.output_ids) < 3 for s in seqs):
            res = backend.step(seqs, policy, 2, None)
            acc += res.stats.accepted
            ver += res.stats.verified
            for s in seqs:
                s.output_ids.extend(res.new_tokens[s.seq_id])
        for s in seqs:
            counts2[s.output_ids[1]] += 1
            counts3[s.output_ids[2]] += 1
            backend.remove(s.seq_id)
    assert 0.2 * ver < acc < 0.9 * ver  # drafts are both accepted and rejected
    m2, m3 = _exact(target, params)
    d2, _ = _exact(draft, params)
    for counts, m in ((counts2, m2), (counts3, m3)):
        emp = counts / counts.sum()
        limit = 3 * tv_noise(m, n)
        assert tv(emp, m) < limit
    # Power: had the draft's tokens been emitted unchecked, the test would have failed.
    assert tv(d2, m2) > 2 * 3 * tv_noise(m2, n)  # > twice the limit


def test_same_seed_same_output() -> None:
    target, draft = _small(0), _small(58)

    def run(seed: int) -> list[int]:
        backend = TorchBackend(target, draft, max_batch=1, max_model_len=32, dtype=torch.float32)
        seq = SeqState("a", PROMPT, SamplingParams(temperature=1.0, seed=seed))
        seq.output_ids.append(backend.add(seq))
        while len(seq.output_ids) < 16:
            seq.output_ids.extend(backend.step([seq], FixedKPolicy(3), 3, None).new_tokens["a"])
        return seq.output_ids[:16]

    assert run(7) == run(7)
    assert run(7) != run(8)
