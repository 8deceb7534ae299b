"""Text ↔ token ids for the server: prompts, chat templates and (in the engine) detokenization.

`HFCodec` adapts a transformers tokenizer; `ByteCodec` is a self-contained byte-level codec for
the scripted backend (tests, smoke runs without model weights). Both satisfy `TextCodec`.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol


class ChatTemplateError(ValueError):
    """The tokenizer cannot render these messages (no template, or the template refused)."""


class TextCodec(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]: ...


class HFCodec:
    """A transformers tokenizer. Chat prompts are rendered to text by the model's own template
    (with the assistant generation prompt) and then encoded without adding special tokens.

    The server thread encodes while the engine thread decodes; a Rust tokenizer shared across
    threads can fail with "Already borrowed", so every call takes one lock (calls are µs)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()

    @classmethod
    def from_folder(cls, folder: str) -> HFCodec:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(folder))

    def encode(self, text: str) -> list[int]:
        with self._lock:
            return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        with self._lock:
            return str(self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ChatTemplateError(
                "this model has no chat template; use /v1/completions with a plain prompt"
            )
        with self._lock:
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            except Exception as e:  # jinja errors: e.g. roles in an order the template refuses
                raise ChatTemplateError(f"the chat template rejected the messages: {e}") from e
            return [int(t) for t in self.tokenizer.encode(str(text), add_special_tokens=False)]


class ByteCodec:
    """UTF-8 bytes as tokens: id = byte + 4; ids 0..3 are special (0 BOS, 1 EOS, 2 PAD, 3 UNK).

    Multi-byte characters span several tokens, which exercises incremental detokenization.
    """

    SPECIAL = 4
    EOS = 1
    VOCAB = 256 + SPECIAL

    def encode(self, text: str) -> list[int]:
        return [b + self.SPECIAL for b in text.encode("utf-8")]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        data = bytes(t - self.SPECIAL for t in token_ids if self.SPECIAL <= t < self.VOCAB)
        return data.decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
        return self.encode(text)
