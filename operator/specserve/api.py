"""The SpecService custom resource as pydantic models (DESIGN §3).

These models are the single source of truth: the CRD's OpenAPI schema is generated from them
(`python -m specserve.crdgen`), and the handlers parse every object through them. Constraints
that a Kubernetes 1.20 structural schema can express (types, enums, min/max, defaults) live here
as field constraints; cross-field rules live in `specserve.validation`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from adaspec.contract import MAX_DRAFT_TOKENS_LIMIT, SpecMode

GROUP = "specserve.io"
VERSION = "v1alpha1"
PLURAL = "specservices"
SINGULAR = "specservice"
KIND = "SpecService"
SHORT_NAMES = ["ssvc"]

PRESERVE: JsonDict = {"x-kubernetes-preserve-unknown-fields": True}
"""Marks a free-form object (Kubernetes-native shapes we pass through, e.g. resources)."""


class _Camel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown spec keys are errors (the API server
    prunes them anyway, so an unknown key here means a hand-made object or a typo)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def wire(self) -> dict[str, Any]:
        """The object as it is stored in Kubernetes (camelCase, no nulls)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# ----------------------------------------------------------------------------- spec


class ModelRef(_Camel):
    name: str = Field(
        min_length=1,
        max_length=512,
        description="Model name or path as the engine understands it (HF id, /models/… path).",
    )
    revision: str | None = Field(
        default=None, max_length=128, description="Optional revision (branch, tag or commit)."
    )


class Slo(_Camel):
    tpot_ms: float = Field(
        gt=0.0, le=60000.0, description="Time-per-output-token target in milliseconds."
    )
    percentile: float = Field(
        default=90.0,
        ge=50.0,
        le=99.9,
        description="Percentile of per-request TPOT that must stay under tpotMs.",
    )
    ttft_ms: float | None = Field(
        default=None,
        gt=0.0,
        le=600000.0,
        description="Optional time-to-first-token target in milliseconds (reported only).",
    )


class Speculation(_Camel):
    mode: SpecMode = Field(
        default=SpecMode.adaptive,
        description="adaptive: AdaSpec per step; fixed: fixedDraftTokens every step; off.",
    )
    max_draft_tokens: int = Field(
        default=8,
        ge=0,
        le=MAX_DRAFT_TOKENS_LIMIT,
        description="Upper bound on draft tokens per request per step.",
    )
    fixed_draft_tokens: int = Field(
        default=3,
        ge=0,
        le=MAX_DRAFT_TOKENS_LIMIT,
        description="Draft tokens per step in fixed mode.",
    )


class Autoscaling(_Camel):
    enabled: bool = Field(
        default=False, description="Let the operator move spec.replicas within min..max."
    )
    min_replicas: int = Field(default=1, ge=1, le=1000)
    max_replicas: int = Field(default=4, ge=1, le=1000)


class Toleration(_Camel):
    """core/v1 Toleration (typed so that typos are rejected by the schema)."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class EngineSpec(_Camel):
    image: str = Field(
        default="specserve/engine:0.1.0",
        min_length=1,
        description="Engine container image (runs `adaspec serve` and `adaspec profile`).",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    backend: Literal["vllm", "torch"] = Field(default="vllm", description="Engine backend.")
    resources: dict[str, Any] = Field(
        default_factory=dict,
        json_schema_extra=PRESERVE,
        description="core/v1 ResourceRequirements for the engine container.",
    )
    gpus: int = Field(
        default=1,
        ge=0,
        le=64,
        description="nvidia.com/gpu requested and limited (added to resources).",
    )
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    extra_args: list[str] = Field(
        default_factory=list, description="Appended to the `adaspec serve` command line."
    )
    port: int = Field(default=8000, ge=1, le=65535)


class Profiling(_Camel):
    enabled: bool = Field(
        default=True, description="Run a profiling Job before deploying the engine."
    )
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [1, 2, 4, 8], min_length=1, max_length=32
    )
    context_lens: list[Annotated[int, Field(ge=1, le=1048576)]] = Field(
        default_factory=lambda: [128, 512, 2048], min_length=1, max_length=32
    )
    timeout_seconds: int = Field(
        default=3600, ge=60, le=86400, description="activeDeadlineSeconds of the profiling Job."
    )
    backoff_limit: int = Field(default=2, ge=0, le=10)


class PrometheusRef(_Camel):
    url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="Prometheus base URL; default: the operator's SPECSERVE_PROMETHEUS_URL.",
    )


class SpecServiceSpec(_Camel):
    target_model: ModelRef
    draft_model: ModelRef
    slo: Slo
    speculation: Speculation = Field(default_factory=Speculation)
    replicas: int = Field(
        default=1, ge=0, le=1000, description="Desired engine replicas (scale subresource)."
    )
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    profiling: Profiling = Field(default_factory=Profiling)
    prometheus: PrometheusRef = Field(default_factory=PrometheusRef)


# ----------------------------------------------------------------------------- status


class Phase(StrEnum):
    pending = "Pending"
    profiling = "Profiling"
    deploying = "Deploying"
    ready = "Ready"
    degraded = "Degraded"
    failed = "Failed"


class ConditionType(StrEnum):
    validated = "Validated"
    profiled = "Profiled"
    available = "Available"
    metrics_available = "MetricsAvailable"
    slo_met = "SLOMet"
    slo_feasible = "SLOFeasible"


class Condition(_Camel):
    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(min_length=1)
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class ProfileSummary(_Camel):
    config_map: str
    job: str | None = None
    key: str | None = Field(default=None, description="Hash of what the profile depends on.")
    created_at: str | None = None
    device: str | None = None
    draft_step_ms: float | None = Field(default=None, description="Predicted draft step, B=1.")
    verify_step_ms: float | None = Field(default=None, description="Predicted verify, B=1, K=1.")
    draft_fit_r2: float | None = None
    verify_fit_r2: float | None = None
    calibration_auc: float | None = None


class Observed(_Camel):
    time: str | None = None
    tpot_p90_ms: float | None = Field(default=None, description="P90 of per-request TPOT.")
    tpot_slo_percentile_ms: float | None = Field(
        default=None, description="TPOT at slo.percentile (what the controller compares)."
    )
    ttft_slo_percentile_ms: float | None = Field(
        default=None, description="TTFT at slo.percentile (compare with slo.ttftMs)."
    )
    request_rate: float | None = None
    acceptance_rate: float | None = None
    mean_draft_length: float | None = None
    engine_policy_generation: int | None = Field(
        default=None, description="Lowest policy generation the engines report as applied."
    )


class PolicyStatus(_Camel):
    generation: int = 0
    mode: SpecMode = SpecMode.adaptive
    tpot_slo_ms: float = 0.0
    tpot_budget_ms: float = 0.0
    max_draft_tokens: int = 0
    fixed_draft_tokens: int = 0
    reason: str = ""


class PolicyHistoryEntry(_Camel):
    time: str
    generation: int
    tpot_budget_ms: float
    max_draft_tokens: int
    replicas: int | None = None
    observed_tpot_ms: float | None = None
    reason: str


class ControlMemory(_Camel):
    """Controller timers that must survive an operator restart (RFC 3339 times)."""

    last_evaluated: str | None = None
    last_policy_change: str | None = None
    last_scale_change: str | None = None
    breach_since: str | None = None
    far_under_since: str | None = None
    infeasible_since: str | None = None


class SpecServiceStatus(_Camel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    phase: Phase | None = None
    observed_generation: int | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    profile: ProfileSummary | None = None
    observed: Observed | None = None
    policy: PolicyStatus | None = None
    policy_history: list[PolicyHistoryEntry] = Field(default_factory=list, max_length=10)
    replicas: int | None = None
    ready_replicas: int | None = None
    selector: str | None = None
    spec_hash: str | None = Field(default=None, description="Hash of the deployed pod spec.")
    control: ControlMemory | None = None


POLICY_HISTORY_LIMIT = 10
