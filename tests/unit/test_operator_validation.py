"""Semantic spec checks: every error names its field; good specs pass; nothing raises."""

from __future__ import annotations

from typing import Any

import pytest

from specserve.validation import MAX_NAME_LENGTH, validate_spec


def spec(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "targetModel": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
        "draftModel": {"name": "tiny-draft"},
        "slo": {"tpotMs": 50},
    }
    raw.update(over)
    return raw


def test_minimal_spec_is_valid_with_defaults() -> None:
    v = validate_spec(spec(), "chat")
    assert v.ok, v.message()
    assert v.spec is not None
    assert v.spec.slo.percentile == 90.0
    assert v.spec.speculation.max_draft_tokens == 8
    assert v.spec.engine.backend == "vllm" and v.spec.engine.gpus == 1


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "spec.autoscaling.minReplicas"),
        (
            {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 4}, "replicas": 7},
            "spec.replicas",
        ),
        ({"speculation": {"mode": "adaptive", "maxDraftTokens": 0}}, "maxDraftTokens"),
        (
            {"speculation": {"mode": "fixed", "maxDraftTokens": 2, "fixedDraftTokens": 4}},
            "spec.speculation.fixedDraftTokens",
        ),
        ({"draftModel": {"name": "Qwen/Qwen2.5-0.5B-Instruct"}}, "spec.draftModel.name"),
        ({"slo": {"tpotMs": 50, "ttftMs": 20}}, "spec.slo.ttftMs"),
        ({"engine": {"backend": "vllm", "gpus": 0}}, "spec.engine.gpus"),
        ({"engine": {"backend": "vllm", "gpus": 1, "tensorParallelSize": 2}}, "tensorParallelSize"),
        ({"engine": {"backend": "torch", "gpus": 0, "tensorParallelSize": 2}}, "tensorParallel"),
        ({"engine": {"resources": {"limit": {"cpu": "1"}}}}, "spec.engine.resources"),
        ({"engine": {"resources": {"limits": "4"}}}, "spec.engine.resources.limits"),
        ({"engine": {"extraArgs": ["--seed", "1", "--port=9000"]}}, "spec.engine.extraArgs[2]"),
        ({"profiling": {"batchSizes": [1, 2, 2]}}, "spec.profiling.batchSizes"),
        # schema-level errors (objects that bypassed the CRD schema) are named the same way
        ({"slo": {"tpotMs": -1}}, "spec.slo.tpotMs"),
        ({"speculation": {"mode": "maybe"}}, "spec.speculation.mode"),
        ({"slo": {"tpotMs": 50}, "unknownField": 1}, "spec.unknownField"),
    ],
)
def test_bad_specs_name_the_field(over: dict[str, Any], field: str) -> None:
    v = validate_spec(spec(**over), "chat")
    assert not v.ok
    assert field in v.message(), v.message()


def test_missing_spec_and_long_name() -> None:
    v = validate_spec(None, "x" * (MAX_NAME_LENGTH + 1))
    assert not v.ok
    assert "metadata.name" in v.message()
    assert "spec.targetModel" in v.message() and "spec.slo" in v.message()


def test_mode_off_allows_same_models_and_zero_draft() -> None:
    v = validate_spec(
        spec(
            draftModel={"name": "Qwen/Qwen2.5-0.5B-Instruct"},
            speculation={"mode": "off", "maxDraftTokens": 0},
        )
    )
    assert v.ok, v.message()


def test_several_errors_are_all_reported() -> None:
    v = validate_spec(
        spec(
            autoscaling={"minReplicas": 5, "maxReplicas": 2},
            engine={"backend": "vllm", "gpus": 0},
        )
    )
    assert len(v.errors) == 2
