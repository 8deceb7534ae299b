"""The real built-in pair: resolves from the cache (fetching it on first use), loads in bf16,
and the draft and target share one tokenizer (speculative decoding needs identical token ids)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from adaspec.models import DRAFT, TARGET, model_sha256, resolve_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair() -> tuple[Path, Path]:
    return resolve_model("default-target"), resolve_model("default-draft")


def test_folders_record_the_pinned_gguf(pair: tuple[Path, Path]) -> None:
    target, draft = pair
    assert model_sha256(target) == TARGET.gguf_sha256
    assert model_sha256(draft) == DRAFT.gguf_sha256
    for folder in pair:
        cfg = json.loads((folder / "config.json").read_text())
        assert "quantization_config" not in cfg  # a plain dense checkpoint, loadable by vLLM
        assert cfg["model_type"] == "qwen2"
        assert any(folder.glob("*.safetensors"))


def test_tokenizers_are_identical(pair: tuple[Path, Path]) -> None:
    from transformers import AutoTokenizer

    target, draft = pair
    digests = [hashlib.sha256((f / "tokenizer.json").read_bytes()).hexdigest() for f in pair]
    assert digests[0] == digests[1]
    t_tok = AutoTokenizer.from_pretrained(str(target))
    d_tok = AutoTokenizer.from_pretrained(str(draft))
    # The GGUF tokenizer lists the vocabulary padded to the embedding size.
    assert len(t_tok) == len(d_tok) == 151_936
    assert t_tok.get_vocab() == d_tok.get_vocab()
    messages = [{"role": "user", "content": "def add(a, b): return a + b  # Zürich ✓"}]
    rendered = [
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        for tok in (t_tok, d_tok)
    ]
    assert rendered[0] == rendered[1]
    assert t_tok(rendered[0])["input_ids"] == d_tok(rendered[1])["input_ids"]


def test_models_load_in_bf16_and_agree_on_an_easy_token(pair: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pair[0]))
    ids = torch.tensor([tok("def fibonacci(n):\n")["input_ids"]])
    nexts = []
    for folder in pair:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        assert model.config.vocab_size == 151_936
        with torch.inference_mode():
            logits = model(ids).logits[0, -1]
        assert torch.isfinite(logits.float()).all()
        nexts.append(int(logits.argmax()))
        del model
    # Both continue a function header with its body's indentation: real, agreeing weights.
    first = str(tok.decode([nexts[0]]))
    assert first.strip() == "" and first.startswith("   ")
    assert nexts[0] == nexts[1]
