"""`AdaSpecScheduler`: vLLM's V1 scheduler choosing K every step from the AdaSpec model.

Passed to vLLM as `scheduler_cls="adaspec.backends.vllm.scheduler.AdaSpecScheduler"`; it runs in
vLLM's engine-core process and reads its settings from `additional_config["adaspec"]`
(`settings.SchedulerSettings`). Hooks (all pinned to vLLM 0.32.0 and contract-tested in
tests/vllm/test_contract.py):

- `Scheduler.dynamic_sd_lookup`: vLLM indexes it with the number of scheduled requests to get
  `SchedulerOutput.num_spec_tokens_to_schedule`, which the runner passes to the drafter as
  `num_speculative_tokens`. We install an indexable object that asks `plan_k` instead of a static
  table: the step's K comes from the goodput model + SLO guard for this batch size, mean context,
  the per-position acceptance seen so far and each running request's own acceptance and draft
  cap. (Setting it also turns off vLLM's uniform padding of decode requests, which only serves
  CUDA graphs.)
- `Scheduler.update_draft_token_ids`: per-request trimming of the proposed drafts before they
  are scheduled: to the step's K and the request's own cap from
  `sampling_params.extra_args["adaspec_max_draft"]` (0 = this request never speculates). Needs
  async scheduling off: the CPU platform always turns it off, and config.engine_kwargs sets
  `async_scheduling=False` in plugin mode (this class extends the synchronous Scheduler).
- `Scheduler.update_from_output`: per-request (drafted, accepted) from
  `scheduler_output.scheduled_spec_decode_tokens` (list lengths: on MRV2 they are placeholders)
  and `model_runner_output.sampled_token_ids`, feeding `PositionAcceptance` and `RequestRates`.
- Live policy (`settings.LivePolicy`): the Policy file (the operator's ConfigMap) is re-read when
  its mtime changes (checked at most every `poll_s`): mode off → K = 0, fixed →
  fixedDraftTokens, adaptive → plan_k with the new budget and maxDraftTokens (never above the
  engine's K_max).
- K is decided one step ahead (the drafts verified in step t were drafted with K_{t-1}).
- `trace_file`: one JSON line per K decision (`"event": "k"`: batch, K, the unconstrained
  `free_k`, predicted TPOT, plain step time, ...) and per verification (`"event": "verified"`:
  {request id: [drafts verified, accepted]}), for tests and debugging.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from vllm.v1.core.sched.scheduler import (  # type: ignore[import-not-found, unused-ignore]
    Scheduler,
)

from adaspec.backends.vllm.kplan import (
    BatchRequests,
    PositionAcceptance,
    RequestRates,
    plan_k,
    profile_rate,
    static_k,
)
from adaspec.backends.vllm.settings import (
    SETTINGS_KEY,
    LivePolicy,
    SchedulerSettings,
    parse_settings,
    request_cap,
)
from adaspec.contract import Policy, Profile, parse_profile
from adaspec.policy.time_model import StepTimePredictor, default_cpu_time_model

log = logging.getLogger("adaspec.vllm")

__all__ = ["SETTINGS_KEY", "AdaSpecScheduler", "SchedulerSettings"]


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
        self.settings = parse_settings(self.vllm_config.additional_config)
        self.profile: Profile | None = (
            parse_profile(self.settings.profile_json) if self.settings.profile_json else None
        )
        self.times = StepTimePredictor(
            self.profile.time_model if self.profile else default_cpu_time_model()
        )
        self.k_max = min(self.settings.k_max, int(self.num_spec_tokens))
        self.acceptance = PositionAcceptance(self.k_max, profile_rate(self.profile))
        self.request_rates = RequestRates()
        self.live_policy = LivePolicy(self.settings)
        self.step_k = self.k_max
        self.decisions = 0
        self._bad_caps: set[str] = set()
        self._trace = Path(self.settings.trace_file) if self.settings.trace_file else None
        if self.num_spec_tokens > 0:
            self.dynamic_sd_lookup = _KLookup(self)

    @property
    def adaspec_policy(self) -> Policy | None:
        """The live Policy (not `policy`: vLLM's Scheduler uses that name for its queue
        policy)."""
        return self.live_policy.policy

    # ------------------------------------------------------------------ per-request caps

    def request_cap(self, req: Any) -> int | None:
        """The request's own draft cap (`extra_args["adaspec_max_draft"]`), None if uncapped.
        A bad value (only possible through AsyncLLM directly; our adapter validates at submit)
        is logged once per request and ignored."""
        params = getattr(req, "sampling_params", None)
        try:
            return request_cap(getattr(params, "extra_args", None))
        except ValueError as e:
            rid = str(getattr(req, "request_id", "?"))
            if rid not in self._bad_caps:
                self._bad_caps.add(rid)
                log.warning("adaspec: request %s: %s; ignoring its draft cap", rid, e)
            return None

    # ------------------------------------------------------------------ K per step

    def _mean_context(self) -> float:
        running = self.running
        if not running:
            return 0.0
        return float(np.mean([r.num_computed_tokens for r in running]))

    def _batch_requests(self, prior: float) -> BatchRequests | None:
        running = self.running
        if not running:
            return None
        rates = np.array([self.request_rates.rate(r.request_id, prior) for r in running])
        caps = np.array(
            [self.k_max if (c := self.request_cap(r)) is None else c for r in running],
            dtype=np.int64,
        )
        return BatchRequests(rates, caps)

    def choose_k(self, n_reqs: int) -> int:
        """K for this step (called by vLLM's schedule() through `dynamic_sd_lookup`)."""
        pol = self.live_policy.current()
        k_cap = self.k_max if pol is None else min(self.k_max, pol.max_draft_tokens)
        fixed = None if pol is None else static_k(pol)
        rec: dict[str, Any] = {}
        ctx = self._mean_context()
        if fixed is not None:
            k = min(fixed, self.k_max)
        else:
            budget = None if pol is None else pol.tpot_budget_ms / 1000.0
            rates = self.acceptance.rates
            reqs = self._batch_requests(float(np.mean(rates)))
            plan = plan_k(n_reqs, ctx, rates, self.times, budget, k_cap, requests=reqs)
            k = plan.k
            rec = {
                "infeasible": plan.infeasible,
                "free_k": plan.free_k,
                "tpot_ms": round(plan.tpot_s * 1000.0, 3),
                "plain_ms": round(plan.plain_s * 1000.0, 3),
                "worst_rate": None if reqs is None else round(float(reqs.rates.min()), 3),
                "capped": 0 if reqs is None else int((reqs.caps < k_cap).sum()),
                "rates": [round(float(r), 3) for r in rates[:k_cap]],
            }
        self.step_k = k
        self.decisions += 1
        if self._trace is not None:
            self._write_trace(
                {
                    "event": "k",
                    "step": self.decisions,
                    "batch": n_reqs,
                    "ctx": round(ctx, 1),
                    "k": k,
                    "infeasible": False,
                    "mode": None if pol is None else str(pol.mode),
                    "generation": None if pol is None else pol.generation,
                    "budget_ms": None if pol is None else pol.tpot_budget_ms,
                    **rec,
                }
            )
        return k

    def _write_trace(self, rec: dict[str, Any]) -> None:
        assert self._trace is not None
        with self._trace.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------ per-request trimming

    def update_draft_token_ids(self, draft_token_ids: Any) -> None:
        """Trim each request's proposed drafts to the step's K and its own cap before vLLM
        stores them (on MRV2 these are placeholders: their count is what gets verified)."""
        trimmed = []
        for req_id, ids in zip(
            draft_token_ids.req_ids, draft_token_ids.draft_token_ids, strict=False
        ):
            cap = self.step_k
            req = self.requests.get(req_id)
            own = None if req is None else self.request_cap(req)
            if own is not None:
                cap = min(cap, own)
            trimmed.append(list(ids)[:cap])
        draft_token_ids.draft_token_ids = trimmed
        super().update_draft_token_ids(draft_token_ids)

    # ------------------------------------------------------------------ acceptance feedback

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        spec = scheduler_output.scheduled_spec_decode_tokens or {}
        sampled = model_runner_output.sampled_token_ids
        index = model_runner_output.req_id_to_index
        verified: dict[str, list[int]] = {}
        if spec and sampled:
            for req_id, drafts in spec.items():
                i = index.get(req_id)
                if i is None or i >= len(sampled) or not sampled[i]:
                    continue
                # Every scheduled draft was verified (V1 runner) or counts as rejected if
                # trimmed (MRV2 adaptive verification; its lists are -1 placeholders), as in
                # vLLM's own accounting.
                d = len(drafts)
                a = len(sampled[i]) - 1
                self.acceptance.observe(d, a)
                self.request_rates.observe(req_id, d, a)
                verified[req_id] = [d, a]
            if self.decisions % 64 == 0:
                self.request_rates.keep(set(self.requests))
        if verified and self._trace is not None:
            self._write_trace({"event": "verified", "step": self.decisions, "reqs": verified})
        return super().update_from_output(scheduler_output, model_runner_output)
