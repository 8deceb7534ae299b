"""Shared pytest configuration.

Integration tests use the real CPU model pair; they obtain it through `adaspec.models` (cached
under ~/.cache/specserve). CI fetches the pair before running the tests, so they never skip there.
"""

from __future__ import annotations

import os

import pytest

# keep torch from oversubscribing the 2 CPU cores when several processes run
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests under tests/integration and tests/e2e get their marker automatically."""
    for item in items:
        path = str(item.fspath)
        if f"{os.sep}integration{os.sep}" in path:
            item.add_marker(pytest.mark.integration)
        if f"{os.sep}e2e{os.sep}" in path:
            item.add_marker(pytest.mark.e2e)
    # The slow scenarios (real models behind the local control plane, minutes of CPU) run
    # last, so their load and teardown cannot disturb the timing of the fast ones.
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)
