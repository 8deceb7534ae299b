"""Prompts of exact token lengths, built from a fixed prompt set (deterministic, seeded).

The traces carry lengths, not text. We tokenize a fixed corpus (`prompt_set.json`: a mix of chat
questions and code, written for this project) once with the target's tokenizer, and give request
i the token window of its prompt length starting at a seeded offset (wrapping around the
corpus), decoded back to text. Decoding then re-encoding can merge or split a token at the
window edges, so the server's count may differ by a token or two; the client records the count
the server reports.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

PROMPT_SET = Path(__file__).resolve().parent / "prompt_set.json"


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    """Adapter over a `tokenizers` tokenizer.json (the target's; no transformers import)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"tokenizer: {path} does not exist")
        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=False))


class WordTokenizer:
    """Whitespace 'tokenizer' for tests and for engines whose tokenizer is unknown."""

    def __init__(self) -> None:
        self._vocab: dict[str, int] = {}
        self._words: list[str] = []

    def encode(self, text: str) -> list[int]:
        out = []
        for w in text.split():
            if w not in self._vocab:
                self._vocab[w] = len(self._words)
                self._words.append(w)
            out.append(self._vocab[w])
        return out

    def decode(self, ids: list[int]) -> str:
        return " ".join(self._words[i] for i in ids)


def load_prompt_set(path: Path = PROMPT_SET) -> list[str]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), list):
        raise ValueError(f"{path}: expected an object with a 'prompts' list")
    prompts = [p for p in data["prompts"] if isinstance(p, str) and p.strip()]
    if not prompts:
        raise ValueError(f"{path}: 'prompts' holds no non-empty string")
    return prompts


class PromptBuilder:
    def __init__(self, tokenizer: TokenizerLike, prompts: Sequence[str], seed: int = 0) -> None:
        ids: list[int] = []
        for p in prompts:
            ids.extend(tokenizer.encode(p.strip() + "\n\n"))
        if not ids:
            raise ValueError("the prompt set tokenizes to nothing")
        self._ids = np.asarray(ids, dtype=np.int64)
        self._tok = tokenizer
        self.seed = seed

    @property
    def corpus_tokens(self) -> int:
        return int(self._ids.shape[0])

    def token_ids(self, index: int, length: int) -> list[int]:
        """Request `index`'s prompt ids: `length` corpus tokens from a seeded offset."""
        if length < 1:
            raise ValueError("prompt length must be >= 1")
        rng = np.random.default_rng([self.seed, 0x9807, index])
        start = int(rng.integers(0, self._ids.shape[0]))
        idx = (start + np.arange(length)) % self._ids.shape[0]
        return [int(i) for i in self._ids[idx]]

    def prompt(self, index: int, length: int) -> str:
        return self._tok.decode(self.token_ids(index, length))


def tokenizer_from(spec: str) -> TokenizerLike:
    """'words' → WordTokenizer; otherwise a tokenizer.json file or a model folder holding one."""
    return WordTokenizer() if spec == "words" else HFTokenizer(Path(spec).expanduser())
