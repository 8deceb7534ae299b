"""`AdaSpecVerifier`: the state AdaSpec keeps inside a vLLM worker to decide the adaptive
verification budget each step (MRV2, GPU). No vLLM import: mrv2.py feeds it numpy arrays read
from vLLM's `AdaptiveVerificationManager` and applies the returned budget.

Per step: the live Policy (the same file the scheduler watches), the Profile's time model (or
vLLM's start-up cost tables), the acceptance estimates of every scheduled draft slot (vLLM's
online estimate or the Profile's calibration, chosen in mrv2.py) → `verify_plan.plan_for_policy`.
Counters (`stats`) and an optional JSON-lines trace (`<trace_file>.verify.jsonl`) say what the
guard did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adaspec.backends.vllm.settings import LivePolicy, SchedulerSettings, VerifierSettings
from adaspec.backends.vllm.verify_plan import (
    BoolArray,
    FloatArray,
    IntArray,
    VerifyPlan,
    plan_for_policy,
    profile_draft_s,
    profile_step_times,
    rank_slots,
    table_step_times,
)
from adaspec.contract import AcceptanceCalibration, parse_profile
from adaspec.policy.time_model import StepTimePredictor


@dataclass
class VerifierStats:
    steps: int = 0
    drafts_scheduled: int = 0
    drafts_verified: int = 0
    vllm_would_verify: int = 0
    guard_lowered: int = 0
    """Steps where the SLO guard verified fewer drafts than the goodput-optimal budget."""
    infeasible: int = 0


def verifier_settings(settings: SchedulerSettings) -> VerifierSettings:
    """The verifier block, checked against what it needs (the Profile for "profile" sources)."""
    cfg = settings.verifier
    if cfg is None:
        raise ValueError(
            "the AdaSpec MRV2 verifier needs additional_config['adaspec']['verifier']; build "
            "the engine arguments with adaptive_verification set"
        )
    if settings.profile_json is None:
        for field in ("acceptance", "step_cost"):
            if getattr(cfg, field) == "profile":
                raise ValueError(
                    f"adaptive_verification.{field}='profile' needs a Profile (profile_json); "
                    "pass one or use 'vllm'"
                )
    return cfg


class AdaSpecVerifier:
    def __init__(self, settings: SchedulerSettings) -> None:
        self.cfg = verifier_settings(settings)
        self.live = LivePolicy(settings)
        profile = parse_profile(settings.profile_json) if settings.profile_json else None
        self.times = StepTimePredictor(profile.time_model) if profile is not None else None
        self.calibration: AcceptanceCalibration | None = (
            profile.calibration if profile is not None else None
        )
        self.stats = VerifierStats()
        self._trace = Path(settings.trace_file + ".verify.jsonl") if settings.trace_file else None

    def decide(
        self,
        accept: FloatArray,
        drafts: IntArray,
        emits: BoolArray,
        context: FloatArray,
        base_tokens: IntArray,
        max_budget: int,
        cost_tables: tuple[FloatArray, FloatArray] | None,
        vllm_budget: int,
    ) -> VerifyPlan:
        """The budget for this step. `accept` [requests, positions]: acceptance estimate per
        draft slot; `drafts`: scheduled drafts per request; `emits`: the request samples a token
        this step; `context`: computed tokens; `base_tokens`: non-draft tokens scheduled;
        `max_budget`: vLLM's cap (logits chunk); `vllm_budget`: what vLLM itself chose."""
        ranked = rank_slots(accept, drafts)
        n_max = max(0, min(int(max_budget), int(ranked.survival.shape[0])))
        if self.cfg.step_cost == "profile":
            assert self.times is not None  # verifier_settings checked it
            draft_s = profile_draft_s(self.times, context, int(drafts.max(initial=0)))
            step_s = profile_step_times(self.times, ranked, context, base_tokens, draft_s, n_max)
        else:
            if cost_tables is None:
                raise RuntimeError("vLLM's adaptive verification has no cost tables yet")
            draft_ms, verify_ms = cost_tables
            step_s = table_step_times(
                draft_ms, verify_ms, int(drafts.shape[0]), int(base_tokens.sum()), n_max
            )
        pol = self.live.current()
        plan = plan_for_policy(pol, ranked, emits, step_s)
        st = self.stats
        st.steps += 1
        st.drafts_scheduled += int(drafts.sum())
        st.drafts_verified += plan.draft_budget
        st.vllm_would_verify += int(vllm_budget)
        st.guard_lowered += int(plan.draft_budget < plan.free_budget)
        st.infeasible += int(plan.infeasible)
        if self._trace is not None:
            self._write(
                {
                    "event": "verify",
                    "step": st.steps,
                    "reqs": int(drafts.shape[0]),
                    "scheduled": int(drafts.sum()),
                    "budget": plan.draft_budget,
                    "free_budget": plan.free_budget,
                    "vllm_budget": int(vllm_budget),
                    "infeasible": plan.infeasible,
                    "step_ms": round(plan.step_s * 1e3, 3),
                    "worst_tpot_ms": round(plan.worst_tpot_s * 1e3, 3),
                    "generation": None if pol is None else pol.generation,
                }
            )
        return plan

    def _write(self, rec: dict[str, Any]) -> None:
        assert self._trace is not None
        with self._trace.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def calibration_arrays(self) -> tuple[FloatArray, FloatArray]:
        """(inner bin edges, acceptance per bin) of the Profile's calibration."""
        if self.calibration is None:
            raise ValueError("no Profile calibration to apply")
        return (
            np.asarray(self.calibration.bin_edges[1:-1], dtype=np.float64),
            np.asarray(self.calibration.accept_prob, dtype=np.float64),
        )
