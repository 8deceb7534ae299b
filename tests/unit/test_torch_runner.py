"""The ragged slot-cache forward reproduces the HF model's own forward (fp32, tiny models)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from adaspec.backends.torch.kv import SlotKVCache
from adaspec.backends.torch.runner import ModelRunner
from adaspec.backends.torch.tiny import tiny_model

TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models are dominated by per-op overhead; extra threads only spin on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model(request: pytest.FixtureRequest) -> Any:
    return tiny_model(request.param, seed=3)


def _hf_logits(model: Any, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def _seq(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n,), generator=g).tolist()


def test_prefill_and_incremental_decode_match_hf(model: Any) -> None:
    runner = ModelRunner(model, max_slots=2, max_len=64)
    toks = _seq(20, 1)
    ref = _hf_logits(model, toks)
    slot = runner.alloc()
    out = runner.forward([slot], [toks[:12]])[0]
    torch.testing.assert_close(out, ref[:12], atol=TOL, rtol=0)
    for t in range(12, 20):  # one token at a time, as plain decoding does
        out = runner.forward([slot], [[toks[t]]])[0]
        torch.testing.assert_close(out, ref[t : t + 1], atol=TOL, rtol=0)
    assert runner.length(slot) == 20


def test_ragged_batch_matches_each_row_alone(model: Any) -> None:
    runner = ModelRunner(model, max_slots=4, max_len=64)
    seqs = [_seq(n, 10 + n) for n in (17, 8, 11)]
    refs = [_hf_logits(model, s) for s in seqs]
    # Non-contiguous, reordered slots exercise the gather path.
    slots = [runner.alloc() for _ in range(4)]
    use = [slots[3], slots[0], slots[2]]
    prefix = [9, 2, 6]
    outs = runner.forward(use, [s[:p] for s, p in zip(seqs, prefix, strict=True)])
    for o, r, p in zip(outs, refs, prefix, strict=True):
        torch.testing.assert_close(o, r[:p], atol=TOL, rtol=0)
    # Ragged continuation: different cache lengths and different query lengths in one pass.
    steps = [4, 3, 1]
    outs = runner.forward(
        use, [s[p : p + k] for s, p, k in zip(seqs, prefix, steps, strict=True)], last_n=None
    )
    for o, r, p, k in zip(outs, refs, prefix, steps, strict=True):
        torch.testing.assert_close(o, r[p : p + k], atol=TOL, rtol=0)
    # last_n returns only the tail of each row.
    prefix = [p + k for p, k in zip(prefix, steps, strict=True)]
    rest = [s[p:] for s, p in zip(seqs, prefix, strict=True)]
    outs = runner.forward(use, rest, last_n=2)
    for o, r in zip(outs, refs, strict=True):
        torch.testing.assert_close(o, r[-2:], atol=TOL, rtol=0)


def test_truncate_then_rewrite_is_rollback(model: Any) -> None:
    """Rejected tokens written past the kept length must not leak into later attention."""
    runner = ModelRunner(model, max_slots=1, max_len=64)
    toks = _seq(16, 4)
    wrong = _seq(5, 99)
    ref = _hf_logits(model, toks)
    slot = runner.alloc()
    runner.forward([slot], [toks[:10]])
    runner.forward([slot], [wrong])  # speculative tokens that get rejected
    runner.truncate(slot, 10)
    out = runner.forward([slot], [toks[10:]])[0]
    torch.testing.assert_close(out, ref[10:], atol=TOL, rtol=0)


def test_slot_reuse_after_free(model: Any) -> None:
    runner = ModelRunner(model, max_slots=1, max_len=32)
    a, b = _seq(12, 5), _seq(7, 6)
    s = runner.alloc()
    runner.forward([s], [a])
    runner.free(s)
    s2 = runner.alloc()
    assert s2 == s and runner.length(s2) == 0
    out = runner.forward([s2], [b])[0]
    torch.testing.assert_close(out, _hf_logits(model, b), atol=TOL, rtol=0)


def test_bad_inputs_are_clear_errors(model: Any) -> None:
    runner = ModelRunner(model, max_slots=1, max_len=8)
    s = runner.alloc()
    with pytest.raises(ValueError, match="exceed max_len"):
        runner.forward([s], [list(range(3, 12))])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        runner.forward([s], [[500]])
    with pytest.raises(ValueError, match="at least one token"):
        runner.forward([s], [[]])
    with pytest.raises(RuntimeError, match="no free KV slot"):
        runner.alloc()
    with pytest.raises(KeyError):
        runner.length(5)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ModelRunner(model, 1, 10_000)


def test_unsupported_architecture_is_refused() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="not supported"):
        ModelRunner(m, 1, 16)


def test_kv_truncate_bounds() -> None:
    kv = SlotKVCache(1, 2, 1, 8, 4, dtype=torch.float32)
    s = kv.alloc()
    kv.advance(s, 5)
    with pytest.raises(ValueError, match="truncate"):
        kv.truncate(s, 6)
    kv.truncate(s, 2)
    assert kv.length(s) == 2
    with pytest.raises(ValueError, match="exceed max_len"):
        kv.advance(s, 7)


def test_packed_pass_of_very_different_lengths_matches_hf(model: Any) -> None:
    """A prompt chunk riding along with one-token rows takes the packed path: same logits and
    the same cache as each row alone."""
    runner = ModelRunner(model, max_slots=5, max_len=96)
    packed = runner._forward_packed
    calls: list[list[int]] = []

    def spy(*args: Any) -> list[torch.Tensor]:
        calls.append(list(args[3]))
        return packed(*args)

    runner._forward_packed = spy  # type: ignore[method-assign, assignment]
    seqs = [_seq(n, 40 + n) for n in (70, 12, 14, 40, 9)]
    refs = [_hf_logits(model, s) for s in seqs]
    slots = [runner.alloc() for _ in range(5)]
    use = [slots[4], slots[1], slots[0], slots[3], slots[2]]
    prefix = [10, 8, 11, 2, 5]
    runner.forward(use, [s[:p] for s, p in zip(seqs, prefix, strict=True)], last_n=0)
    # q lens 48, 1, 1, 27, 1: mostly padding if padded, so the pass is packed
    steps = [48, 1, 1, 27, 1]
    outs = runner.forward(use, [s[p : p + k] for s, p, k in zip(seqs, prefix, steps, strict=True)])
    for o, r, p, k in zip(outs, refs, prefix, steps, strict=True):
        torch.testing.assert_close(o, r[p : p + k], atol=TOL, rtol=0)
    prefix = [p + k for p, k in zip(prefix, steps, strict=True)]
    steps = [12, 1, 1, 1, 1]
    outs = runner.forward(
        use, [s[p : p + k] for s, p, k in zip(seqs, prefix, steps, strict=True)], last_n=2
    )
    for o, r, p, k in zip(outs, refs, prefix, steps, strict=True):
        torch.testing.assert_close(o, r[p : p + k][-2:], atol=TOL, rtol=0)
    assert calls == [[48, 1, 1, 27, 1], [12, 1, 1, 1, 1]]  # the prefill above was not packed


def test_logits_can_stay_on_the_device(model: Any) -> None:
    """`on_device=True` returns the same float32 logits, left where the model runs (the host
    here); dense and packed passes alike."""
    host = ModelRunner(model, max_slots=3, max_len=64)
    dev = ModelRunner(model, max_slots=3, max_len=64)
    for lens in ((4, 3, 4), (15, 3, 1)):  # dense; packed (mostly padding otherwise)
        seqs = [_seq(n, 40 + n) for n in lens]
        for last_n in (None, 2):
            hs = [host.alloc() for _ in seqs]
            ds = [dev.alloc() for _ in seqs]
            a = host.forward(hs, seqs, last_n=last_n)
            b = dev.forward(ds, seqs, last_n=last_n, on_device=True)
            for x, y in zip(a, b, strict=True):
                assert y.dtype == torch.float32 and y.device == dev.device
                torch.testing.assert_close(x, y, atol=0, rtol=0)
            for s in hs:
                host.free(s)
            for s in ds:
                dev.free(s)
