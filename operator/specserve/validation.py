"""Semantic checks of a SpecService spec that a structural schema (Kubernetes 1.20, no CEL)
cannot express. Pure: the handlers turn the result into condition Validated=False, reason
InvalidSpec, with a message that names every offending field.

The pydantic parse is repeated here too, because objects can reach the operator without the API
server's schema (an older CRD installed, or a test fake); its errors are reported the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from adaspec.contract import SpecMode
from specserve.api import SpecServiceSpec

MAX_NAME_LENGTH = 46
"""Longest SpecService name: `<name>-profile-<8 hex>` must stay a 63-character label value."""

MANAGED_FLAGS = (
    "--host",
    "--port",
    "--target",
    "--draft",
    "--policy-file",
    "--profile-file",
)
"""Engine flags the operator sets itself; extraArgs must not override them."""

_RESOURCE_KEYS = {"limits", "requests", "claims"}


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass(frozen=True)
class Validated:
    spec: SpecServiceSpec | None
    errors: list[FieldError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.spec is not None and not self.errors

    def message(self) -> str:
        return "; ".join(str(e) for e in self.errors)


MIN_PROFILE_POINTS = 6
"""adaspec profile refuses fewer draft-step points (batch sizes × context lengths)."""


def _pydantic_errors(err: ValidationError) -> list[FieldError]:
    out = []
    for e in err.errors():
        path = ".".join(["spec", *(str(p) for p in e["loc"])])
        out.append(FieldError(path, e["msg"]))
    return out


def validate_spec(raw_spec: Mapping[str, Any] | None, name: str = "") -> Validated:
    """Parse and check a spec; never raises for bad input."""
    errors: list[FieldError] = []
    if name and len(name) > MAX_NAME_LENGTH:
        errors.append(FieldError("metadata.name", f"must be at most {MAX_NAME_LENGTH} characters"))
    try:
        spec = SpecServiceSpec.model_validate(dict(raw_spec or {}))
    except ValidationError as e:
        return Validated(None, errors + _pydantic_errors(e))
    errors.extend(semantic_errors(spec))
    return Validated(spec, errors)


def semantic_errors(spec: SpecServiceSpec) -> list[FieldError]:
    errors: list[FieldError] = []
    a = spec.autoscaling
    if a.min_replicas > a.max_replicas:
        errors.append(
            FieldError(
                "spec.autoscaling.minReplicas",
                f"{a.min_replicas} is greater than maxReplicas {a.max_replicas}",
            )
        )
    elif a.enabled and not a.min_replicas <= spec.replicas <= a.max_replicas:
        errors.append(
            FieldError(
                "spec.replicas",
                f"{spec.replicas} is outside autoscaling.minReplicas..maxReplicas "
                f"({a.min_replicas}..{a.max_replicas})",
            )
        )
    s = spec.speculation
    if s.mode is not SpecMode.off and s.max_draft_tokens < 1:
        errors.append(
            FieldError(
                "spec.speculation.maxDraftTokens",
                f"must be at least 1 in mode {s.mode.value} (use mode: off to disable)",
            )
        )
    if s.mode is SpecMode.fixed and s.fixed_draft_tokens > s.max_draft_tokens:
        errors.append(
            FieldError(
                "spec.speculation.fixedDraftTokens",
                f"{s.fixed_draft_tokens} exceeds maxDraftTokens {s.max_draft_tokens}",
            )
        )
    prof = spec.profiling
    points = len(set(prof.batch_sizes)) * len(set(prof.context_lens))
    if prof.enabled and points < MIN_PROFILE_POINTS:
        errors.append(
            FieldError(
                "spec.profiling.batchSizes",
                f"batchSizes x contextLens gives {points} distinct grid points; the profiler "
                f"fits the time model with held-out points and needs at least {MIN_PROFILE_POINTS}",
            )
        )
    for key, model in (("targetModel", spec.target_model), ("draftModel", spec.draft_model)):
        if model.revision:
            errors.append(
                FieldError(
                    f"spec.{key}.revision",
                    "is not supported yet: the engine loads local folders, .gguf files and "
                    "built-in hash-pinned models, so pin a version through the name/path",
                )
            )
    if (
        s.mode is not SpecMode.off
        and spec.draft_model.name == spec.target_model.name
        and spec.draft_model.revision == spec.target_model.revision
    ):
        errors.append(
            FieldError("spec.draftModel.name", "must differ from targetModel for speculation")
        )
    if spec.slo.ttft_ms is not None and spec.slo.ttft_ms < spec.slo.tpot_ms:
        errors.append(
            FieldError(
                "spec.slo.ttftMs",
                f"{spec.slo.ttft_ms} ms is below tpotMs {spec.slo.tpot_ms} ms "
                "(the first token cannot be faster than one decoding step)",
            )
        )
    e = spec.engine
    if e.backend == "vllm" and e.gpus < 1:
        errors.append(FieldError("spec.engine.gpus", "the vllm backend needs at least 1 GPU"))
    if e.backend == "vllm" and e.tensor_parallel_size > max(e.gpus, 1):
        errors.append(
            FieldError(
                "spec.engine.tensorParallelSize",
                f"{e.tensor_parallel_size} exceeds engine.gpus {e.gpus}",
            )
        )
    if e.backend == "torch" and e.tensor_parallel_size != 1:
        errors.append(
            FieldError("spec.engine.tensorParallelSize", "the torch backend supports only 1")
        )
    unknown = sorted(set(e.resources) - _RESOURCE_KEYS)
    if unknown:
        errors.append(
            FieldError(
                "spec.engine.resources",
                f"unknown key(s) {', '.join(unknown)} (expected limits, requests)",
            )
        )
    for key in ("limits", "requests"):
        value = e.resources.get(key)
        if value is not None and not (
            isinstance(value, dict)
            and all(isinstance(v, str | int | float) for v in value.values())
        ):
            errors.append(
                FieldError(f"spec.engine.resources.{key}", "must map resource names to quantities")
            )
    for i, arg in enumerate(e.extra_args):
        flag = arg.split("=", 1)[0]
        if flag in MANAGED_FLAGS:
            errors.append(
                FieldError(f"spec.engine.extraArgs[{i}]", f"{flag} is set by the operator")
            )
    p = spec.profiling
    for label, values in (("batchSizes", p.batch_sizes), ("contextLens", p.context_lens)):
        if len(set(values)) != len(values):
            errors.append(FieldError(f"spec.profiling.{label}", "values must be unique"))
    return errors
