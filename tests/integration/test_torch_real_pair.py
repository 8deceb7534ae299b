"""The real Qwen2.5-Coder 1.5B/0.5B pair through the torch backend: lossless and accepting.

fp32 on purpose: bf16 near-ties between batched and incremental attention can flip a greedy
token without any logic error (MODELS.md). The reference is transformers' own `generate`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from adaspec.backends.base import SamplingParams, SeqState
from adaspec.backends.torch import TorchBackend
from adaspec.policy.baselines import FixedKPolicy

pytestmark = pytest.mark.integration

NEW_TOKENS = 24
CHATS = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Explain in two sentences what a hash map is.",
]
RAW = "def is_prime(n: int) -> bool:\n    "


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Any, Any, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaspec.models import ModelError, resolve_model

    try:
        target_dir = resolve_model("qwen2.5-coder-1.5b-instruct")
        draft_dir = resolve_model("qwen2.5-coder-0.5b-instruct")
    except ModelError as e:
        pytest.skip(f"real model pair unavailable: {e}")
    tok = AutoTokenizer.from_pretrained(str(target_dir))
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=torch.float32).eval()
    yield tok, target, draft
    del target, draft


def _prompts(tok: Any) -> list[list[int]]:
    out = []
    for text in CHATS:
        chat = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        out.append(tok.encode(chat, add_special_tokens=False))
    out.append(tok.encode(RAW, add_special_tokens=False))
    return out


def _hf_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(prompt) :]]


def test_real_pair_greedy_is_lossless_and_accepts(pair: tuple[Any, Any, Any]) -> None:
    tok, target, draft = pair
    prompts = _prompts(tok)
    backend = TorchBackend(target, draft, max_batch=4, max_model_len=256, dtype=torch.float32)
    seqs = [
        SeqState(f"p{i}", p, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
        for i, p in enumerate(prompts)
    ]
    for s in seqs:
        s.output_ids.append(backend.add(s))
    policy = FixedKPolicy(4)
    accepted = verified = 0
    chat_accepted = chat_verified = 0
    while any(len(s.output_ids) < NEW_TOKENS for s in seqs):
        live = [s for s in seqs if len(s.output_ids) < NEW_TOKENS]
        res = backend.step(live, policy, 4, None)
        accepted += res.stats.accepted
        verified += res.stats.verified
        for s, spec_len in zip(live, res.stats.spec_lens, strict=True):
            new = res.new_tokens[s.seq_id]
            if s.seq_id != f"p{len(prompts) - 1}":
                chat_accepted += len(new) - 1
                chat_verified += spec_len
            s.output_ids.extend(new)
            if len(s.output_ids) >= NEW_TOKENS:
                backend.remove(s.seq_id)  # leaves the batch while others continue
    for s, p in zip(seqs, prompts, strict=True):
        want = _hf_greedy(target, p, NEW_TOKENS)
        got = s.output_ids[:NEW_TOKENS]
        assert got == want, f"{s.seq_id}: {tok.decode(got)!r} != {tok.decode(want)!r}"
    assert verified > 0
    assert chat_accepted / chat_verified > 0.5, (chat_accepted, chat_verified)
