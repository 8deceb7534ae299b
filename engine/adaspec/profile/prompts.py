"""The built-in calibration prompt set: chat requests (rendered with the model's chat template)
and raw code completions, the two regimes MODELS.md measured different acceptance rates for."""

from __future__ import annotations

from typing import Any

CHAT_PROMPTS: tuple[str, ...] = (
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain the difference between a process and a thread in two short paragraphs.",
    "Write a SQL query that returns the ten customers with the highest total order value.",
    "How do I reverse a linked list in C? Show the code.",
    "Write a bash script that counts the lines of every .py file in a directory tree.",
    "What does the HTTP status code 429 mean and how should a client react to it?",
    "Write a JavaScript function that debounces another function.",
    "Give three tips for writing readable unit tests.",
)

CODE_PROMPTS: tuple[str, ...] = (
    'def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n',
    "import json\n\n\ndef load_config(path):\n    with open(path) as f:\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "#include <stdio.h>\n\nint main(void) {\n    int i;\n    for (i = 0; i < 10; i++) {\n",
    "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    pivot = xs[0]\n",
    "function sum(arr) {\n  let total = 0;\n",
    "SELECT name, COUNT(*) AS orders\nFROM customers\nJOIN orders ON",
    "def parse_args():\n    import argparse\n    parser = argparse.ArgumentParser(\n",
)


def encode_prompts(tokenizer: Any, n_chat: int, n_code: int) -> list[list[int]]:
    """Token ids of the first n_chat chat prompts (chat template) and n_code code prompts."""
    out: list[list[int]] = []
    has_template = bool(getattr(tokenizer, "chat_template", None))
    for text in CHAT_PROMPTS[:n_chat]:
        if has_template:
            messages = [{"role": "user", "content": text}]
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        # A base model without a chat template still gets the question, as plain text.
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    for text in CODE_PROMPTS[:n_code]:
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out
