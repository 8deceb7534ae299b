"""Tiny randomly initialised Qwen2/Llama models for fast tests and demos without weights.

A random draft does not agree with a random target, so `noisy_copy` makes a draft that agrees
most of the time (the target plus small weight noise): real, partial acceptance in unit tests.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


def tiny_model(
    arch: str = "qwen2",
    *,
    seed: int = 0,
    vocab_size: int = 97,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 512,
) -> Any:
    """A small causal LM of the given architecture ("qwen2" or "llama") in float32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(seed)
    model: Any
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(f"arch must be 'qwen2' or 'llama', got {arch!r}")
    # Random init gives near-uniform next-token distributions; sharpen the output layer so
    # greedy decoding has clear winners (ties would make exactness tests meaningless).
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.float().eval()


def noisy_copy(model: Any, scale: float, *, seed: int = 1) -> Any:
    """A deep copy with Gaussian noise (std = scale × each tensor's std) added to every weight."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            std = float(p.float().std()) if p.numel() > 1 else 0.0
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * (scale * std)
            p.add_(noise.to(p.dtype))
    return out
