"""What SpecServe hands to its code inside vLLM's processes, and the live Policy there. No vLLM.

The engine serialises `SchedulerSettings` into vLLM's `additional_config["adaspec"]`; vLLM copies
the config into the engine-core process (AdaSpecScheduler) and into every worker (the MRV2
verifier, mrv2.py), which validate it back with the same model. Unknown keys are refused, so a
typo in a deployment is an error naming the field, not a silently ignored setting.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adaspec.contract import ContractError, Policy, load_policy

log = logging.getLogger("adaspec.vllm")

SETTINGS_KEY = "adaspec"
MAX_DRAFT_ARG = "adaspec_max_draft"
"""`SamplingParams.extra_args` key of a request's own draft cap (0 = never speculate)."""


class VerifierSettings(BaseModel):
    """The AdaSpec verifier inside vLLM's adaptive verification (Model Runner V2, GPU only)."""

    model_config = ConfigDict(extra="forbid")
    acceptance: Literal["vllm", "profile"] = Field(
        default="vllm",
        description="per-draft acceptance: vLLM's online logistic estimate of each draft "
        "token, or the Profile's calibration applied to the draft's top-1 probability",
    )
    step_cost: Literal["vllm", "profile"] = Field(
        default="profile",
        description="step time per verified-token budget: the Profile's time model (with "
        "context), or the cost tables vLLM profiles at start-up",
    )


class SchedulerSettings(BaseModel):
    """What the engine passes to the scheduler (and the MRV2 verifier) through vLLM's
    `additional_config`."""

    model_config = ConfigDict(extra="forbid")
    policy_file: str | None = None
    policy: dict[str, Any] | None = Field(
        default=None, description="initial Policy document (camelCase) when no file is given"
    )
    profile_json: str | None = Field(default=None, description="the Profile document")
    k_max: int = Field(ge=1, description="vLLM num_speculative_tokens (buffers are sized by it)")
    poll_s: float = Field(default=0.5, gt=0.0)
    trace_file: str | None = Field(
        default=None, description="append one JSON line per decision (tests, debugging)"
    )
    verifier: VerifierSettings | None = Field(
        default=None, description="set when AdaSpec decides vLLM's adaptive verification"
    )


def parse_settings(additional_config: dict[str, Any] | None) -> SchedulerSettings:
    raw = (additional_config or {}).get(SETTINGS_KEY)
    if raw is None:
        raise ValueError(
            f"the AdaSpec vLLM plugin needs additional_config[{SETTINGS_KEY!r}] "
            "(adaspec.backends.vllm.settings.SchedulerSettings); build the engine arguments "
            "with adaspec.backends.vllm.config.engine_kwargs"
        )
    return SchedulerSettings.model_validate(raw)


def request_cap(extra_args: dict[str, Any] | None) -> int | None:
    """A request's own draft cap from `sampling_params.extra_args`, or None when it has none.

    Raises ValueError naming the key for anything but a non-negative integer; the adapter
    validates at submit, so only a client talking to AsyncLLM directly can get here with a
    bad value."""
    if not extra_args or MAX_DRAFT_ARG not in extra_args:
        return None
    v = extra_args[MAX_DRAFT_ARG]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"extra_args[{MAX_DRAFT_ARG!r}] must be an integer >= 0, got {v!r}")
    return v


class LivePolicy:
    """The Policy as seen inside a vLLM process: the initial document, then the policy file
    re-read whenever its mtime changes (checked at most every `poll_s`). An unreadable or
    invalid file keeps the last good policy (logged)."""

    def __init__(self, settings: SchedulerSettings) -> None:
        self.path = settings.policy_file
        self.poll_s = settings.poll_s
        self.policy: Policy | None = (
            Policy.model_validate(settings.policy) if settings.policy else None
        )
        self._mtime: float | None = None
        self._next_poll = 0.0
        self.reload(force=True)

    def current(self) -> Policy | None:
        self.reload()
        return self.policy

    def reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.path is None or (not force and now < self._next_poll):
            return
        self._next_poll = now + self.poll_s
        try:
            mtime = os.stat(self.path).st_mtime
            if not force and mtime == self._mtime:
                return
            self.policy = load_policy(Path(self.path))
            self._mtime = mtime
            log.info("adaspec: policy generation %s (%s)", self.policy.generation, self.policy.mode)
        except (OSError, ContractError) as e:
            log.warning("adaspec: policy file %s not applied: %s", self.path, e)
