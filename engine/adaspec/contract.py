"""Contracts shared by the engine, the profiler and the operator (DESIGN §3).

These pydantic models are the only shape in which a Profile or a Policy crosses a process
boundary (profiling Job termination message, ConfigMaps, files mounted into engine pods). They
import neither torch nor vLLM, so the operator image can use them.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

PROFILE_SCHEMA_VERSION: Literal[1] = 1
POLICY_SCHEMA_VERSION = 1


class _Camel(BaseModel):
    """JSON uses camelCase (Kubernetes style); Python uses snake_case. Unknown keys are errors."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)


# ----------------------------------------------------------------------------- Profile


class ModelIdentity(_Camel):
    name: str = Field(min_length=1, description="model name or path as given to the engine")
    sha256: str | None = Field(default=None, description="hash of the weights file, if known")
    dtype: str = "bfloat16"


class Hardware(_Camel):
    device: str = Field(description="e.g. 'cpu' or 'cuda:NVIDIA H200'")
    threads: int = Field(ge=1)
    backend: Literal["torch", "vllm", "sim"] = "torch"


class FitQuality(_Camel):
    r2: float
    mape: float = Field(ge=0.0, description="mean absolute percentage error on held-out points")
    n_train: int = Field(ge=0)
    n_test: int = Field(ge=0)


class StepTimeModel(_Camel):
    """Linear time of one forward pass, in milliseconds.

    t = intercept + per_row·rows + per_token·tokens
        + per_ctx_ktoken·(Σ_rows query_tokens·context)/1000

    `rows` are sequences in the pass, `tokens` the query tokens processed (rows for a draft step,
    Σ(s_i+1) for a verification), the last term is the attention work against the KV cache.
    """

    intercept_ms: float
    per_row_ms: float = 0.0
    per_token_ms: float = 0.0
    per_ctx_ktoken_ms: float = 0.0
    fit: FitQuality | None = None


class TimeModel(_Camel):
    """Step times of the engine's forward passes.

    `prefill` (optional, added after schema version 1 shipped; older profiles omit it) is the
    time to prefill prompt tokens into the target *and* the draft cache: rows = prompts (or
    prompt chunks), tokens = prompt tokens, ctx = their attention work. A verification feeds a
    few tokens per row and is memory-bound, so its per-token slope says nothing about a
    500-token prompt; on CPU the two differ by 100×. Without it, prompt cost is predicted
    with `verify`.
    """

    draft: StepTimeModel
    verify: StepTimeModel
    prefill: StepTimeModel | None = None


class AcceptanceCalibration(_Camel):
    """Piecewise-constant map from draft confidence (top-1 probability) to P(accept).

    `bin_edges` has one more entry than `accept_prob`; both describe the offline measurement.
    The engine corrects it online from verification outcomes.
    """

    bin_edges: list[float] = Field(min_length=2)
    accept_prob: list[float] = Field(min_length=1)
    counts: list[int] | None = None
    auc: float | None = None
    brier: float | None = None

    @model_validator(mode="after")
    def _check(self) -> AcceptanceCalibration:
        if len(self.bin_edges) != len(self.accept_prob) + 1:
            raise ValueError("binEdges must have exactly one more entry than acceptProb")
        if any(b <= a for a, b in zip(self.bin_edges, self.bin_edges[1:], strict=False)):
            raise ValueError("binEdges must be strictly increasing")
        if self.bin_edges[0] < 0.0 or self.bin_edges[-1] > 1.0:
            raise ValueError("binEdges must lie within [0, 1]")
        if any(not 0.0 <= p <= 1.0 for p in self.accept_prob):
            raise ValueError("acceptProb values must lie within [0, 1]")
        if self.counts is not None and len(self.counts) != len(self.accept_prob):
            raise ValueError("counts must have as many entries as acceptProb")
        return self


class Profile(_Camel):
    schema_version: Literal[1] = PROFILE_SCHEMA_VERSION
    created_at: str
    hardware: Hardware
    target: ModelIdentity
    draft: ModelIdentity
    time_model: TimeModel
    calibration: AcceptanceCalibration


# ----------------------------------------------------------------------------- Policy


class SpecMode(StrEnum):
    adaptive = "adaptive"
    fixed = "fixed"
    off = "off"


MAX_DRAFT_TOKENS_LIMIT = 16


class Policy(_Camel):
    """What the operator tells the engines; the engine applies it without restart."""

    generation: int = Field(ge=0)
    mode: SpecMode = SpecMode.adaptive
    tpot_slo_ms: Annotated[float, Field(gt=0.0)]
    tpot_budget_ms: Annotated[float, Field(gt=0.0)]
    max_draft_tokens: int = Field(default=8, ge=0, le=MAX_DRAFT_TOKENS_LIMIT)
    fixed_draft_tokens: int = Field(default=3, ge=0, le=MAX_DRAFT_TOKENS_LIMIT)
    reason: str = ""

    @model_validator(mode="after")
    def _check(self) -> Policy:
        if self.mode is SpecMode.fixed and self.fixed_draft_tokens > self.max_draft_tokens:
            raise ValueError("fixedDraftTokens must not exceed maxDraftTokens in fixed mode")
        return self


class ContractError(ValueError):
    """A Profile or Policy document is unreadable or invalid; the message names the field."""


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<document>"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def parse_policy(text: str) -> Policy:
    try:
        return Policy.model_validate(json.loads(text))
    except json.JSONDecodeError as e:
        raise ContractError(f"policy is not valid JSON: {e}") from e
    except ValidationError as e:
        raise ContractError(f"invalid policy: {_describe(e)}") from e


def parse_profile(text: str) -> Profile:
    try:
        return Profile.model_validate(json.loads(text))
    except json.JSONDecodeError as e:
        raise ContractError(f"profile is not valid JSON: {e}") from e
    except ValidationError as e:
        raise ContractError(f"invalid profile: {_describe(e)}") from e


def load_policy(path: Path) -> Policy:
    return parse_policy(path.read_text(encoding="utf-8"))


def load_profile(path: Path) -> Profile:
    return parse_profile(path.read_text(encoding="utf-8"))
