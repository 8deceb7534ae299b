"""`AdaSpecScheduler`: vLLM's V1 scheduler choosing K every step from the AdaSpec model.

Passed to vLLM as `scheduler_cls="adaspec.backends.vllm.scheduler.AdaSpecScheduler"`; it runs in
vLLM's engine-core process and reads its settings from `additional_config["adaspec"]`
(`SchedulerSettings`). Hooks (all pinned to vLLM 0.32.0 and contract-tested in tests/vllm):

- `Scheduler.dynamic_sd_lookup`: vLLM indexes it with the number of scheduled requests to get
  `SchedulerOutput.num_spec_tokens_to_schedule`, which the V1 runner passes to the drafter as
  `num_speculative_tokens`. We install an indexable object that asks `plan_k` instead of a static
  table: the step's K comes from the goodput model + SLO guard for this batch size, mean context
  and the per-position acceptance seen so far. (Setting it also turns off vLLM's uniform padding
  of decode requests, which only serves CUDA graphs.)
- `Scheduler.update_draft_token_ids`: per-request trimming of the proposed drafts before they
  are scheduled (here: to the step's K and the request's own cap from
  `sampling_params.extra_args["adaspec_max_draft"]`). Requires async scheduling off (it always
  is on CPU; vLLM also turns it off for custom scheduler classes on this path).
- `Scheduler.update_from_output`: per-request (drafted, accepted) from
  `scheduler_output.scheduled_spec_decode_tokens` and `model_runner_output.sampled_token_ids`,
  feeding `PositionAcceptance`.
- Live policy: the Policy file (the operator's ConfigMap) is re-read when its mtime changes
  (checked at most every `poll_s`): mode off → K = 0, fixed → fixedDraftTokens, adaptive →
  plan_k with the new budget and maxDraftTokens (never above the engine's K_max).
- The SLO guard protects the request with the lowest acceptance so far (`RequestRates`);
  K is decided one step ahead (the drafts verified in step t were drafted with K_{t-1}).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from vllm.v1.core.sched.scheduler import (  # type: ignore[import-not-found, unused-ignore]
    Scheduler,
)

from adaspec.backends.vllm.kplan import (
    PositionAcceptance,
    RequestRates,
    plan_k,
    profile_rate,
    static_k,
)
from adaspec.contract import ContractError, Policy, Profile, load_policy, parse_profile
from adaspec.policy.time_model import StepTimePredictor, default_cpu_time_model

log = logging.getLogger("adaspec.vllm")

SETTINGS_KEY = "adaspec"


class SchedulerSettings(BaseModel):
    """What the engine passes to the scheduler through vLLM's `additional_config`."""

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


class _KLookup:
    """Stands in for vLLM's dense batch-size → K list: `lookup[n]` plans K for n requests."""

    def __init__(self, owner: AdaSpecScheduler) -> None:
        self._owner = owner

    def __getitem__(self, n_reqs: int) -> int:
        return self._owner.choose_k(int(n_reqs))

    def __len__(self) -> int:  # vLLM only indexes; len for debugging/printing
        return int(self._owner.max_num_running_reqs) + 1


class AdaSpecScheduler(Scheduler):  # type: ignore[misc, unused-ignore]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        raw = (self.vllm_config.additional_config or {}).get(SETTINGS_KEY)
        if raw is None:
            raise ValueError(
                f"AdaSpecScheduler needs additional_config[{SETTINGS_KEY!r}] (SchedulerSettings)"
            )
        self.settings = SchedulerSettings.model_validate(raw)
        self.profile: Profile | None = (
            parse_profile(self.settings.profile_json) if self.settings.profile_json else None
        )
        self.times = StepTimePredictor(
            self.profile.time_model if self.profile else default_cpu_time_model()
        )
        self.k_max = min(self.settings.k_max, int(self.num_spec_tokens))
        self.acceptance = PositionAcceptance(self.k_max, profile_rate(self.profile))
        self.request_rates = RequestRates()
        self.policy: Policy | None = (
            Policy.model_validate(self.settings.policy) if self.settings.policy else None
        )
        self._policy_mtime: float | None = None
        self._next_poll = 0.0
        self.step_k = self.k_max
        self.decisions = 0
        self._trace = Path(self.settings.trace_file) if self.settings.trace_file else None
        self._reload_policy(force=True)
        if self.num_spec_tokens > 0:
            self.dynamic_sd_lookup = _KLookup(self)

    # ------------------------------------------------------------------ policy

    def _reload_policy(self, force: bool = False) -> None:
        path = self.settings.policy_file
        now = time.monotonic()
        if path is None or (not force and now < self._next_poll):
            return
        self._next_poll = now + self.settings.poll_s
        try:
            mtime = os.stat(path).st_mtime
            if not force and mtime == self._policy_mtime:
                return
            self.policy = load_policy(Path(path))
            self._policy_mtime = mtime
            log.info("adaspec: policy generation %s (%s)", self.policy.generation, self.policy.mode)
        except (OSError, ContractError) as e:  # keep the last good policy
            log.warning("adaspec: policy file %s not applied: %s", path, e)

    # ------------------------------------------------------------------ K per step

    def _mean_context(self) -> float:
        running = self.running
        if not running:
            return 0.0
        return float(np.mean([r.num_computed_tokens for r in running]))

    def choose_k(self, n_reqs: int) -> int:
        """K for this step (called by vLLM's schedule() through `dynamic_sd_lookup`)."""
        self._reload_policy()
        pol = self.policy
        k_cap = self.k_max if pol is None else min(self.k_max, pol.max_draft_tokens)
        fixed = None if pol is None else static_k(pol)
        infeasible = False
        worst: float | None = None
        ctx = self._mean_context()
        if fixed is not None:
            k = min(fixed, self.k_max)
        else:
            budget = None if pol is None else pol.tpot_budget_ms / 1000.0
            rates = self.acceptance.rates
            worst = self.request_rates.worst(
                [r.request_id for r in self.running], float(np.mean(rates))
            )
            plan = plan_k(n_reqs, ctx, rates, self.times, budget, k_cap, worst_rate=worst)
            k, infeasible = plan.k, plan.infeasible
        self.step_k = k
        self.decisions += 1
        if self._trace is not None:
            rec = {
                "step": self.decisions,
                "batch": n_reqs,
                "ctx": round(ctx, 1),
                "k": k,
                "infeasible": infeasible,
                "worst_rate": None if worst is None else round(worst, 3),
                "mode": None if pol is None else str(pol.mode),
                "generation": None if pol is None else pol.generation,
            }
            with self._trace.open("a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        return k

    # ------------------------------------------------------------------ per-request trimming

    def update_draft_token_ids(self, draft_token_ids: Any) -> None:
        """Trim each request's proposed drafts to its own cap before vLLM stores them."""
        trimmed = []
        for req_id, ids in zip(
            draft_token_ids.req_ids, draft_token_ids.draft_token_ids, strict=False
        ):
            cap = self.step_k
            req = self.requests.get(req_id)
            extra = getattr(getattr(req, "sampling_params", None), "extra_args", None) or {}
            if "adaspec_max_draft" in extra:
                with contextlib.suppress(TypeError, ValueError):
                    cap = min(cap, max(0, int(extra["adaspec_max_draft"])))
            trimmed.append(list(ids)[:cap])
        draft_token_ids.draft_token_ids = trimmed
        super().update_draft_token_ids(draft_token_ids)

    # ------------------------------------------------------------------ acceptance feedback

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        spec = scheduler_output.scheduled_spec_decode_tokens or {}
        sampled = model_runner_output.sampled_token_ids
        index = model_runner_output.req_id_to_index
        if spec and sampled:
            for req_id, drafts in spec.items():
                i = index.get(req_id)
                if i is None or i >= len(sampled) or not sampled[i]:
                    continue
                d = sum(1 for t in drafts if t >= 0)
                self.acceptance.observe(d, len(sampled[i]) - 1)
                self.request_rates.observe(req_id, d, len(sampled[i]) - 1)
            if self.decisions % 64 == 0:
                self.request_rates.keep(set(self.requests))
        return super().update_from_output(scheduler_output, model_runner_output)
