"""From the live Policy document (and the Profile) to a SpecPolicy and its per-step limits.

Policies learn online (acceptance calibration, time-model bias), so the selector keeps one
instance per kind and only changes the limits (max draft, budget) when a new Policy generation
arrives: a hot reload never throws away what was learned.
"""

from __future__ import annotations

from dataclasses import dataclass

from adaspec.contract import Policy, Profile, SpecMode
from adaspec.policy.adaptive import AdaSpecPolicy
from adaspec.policy.base import SpecPolicy
from adaspec.policy.baselines import FixedKPolicy, OffPolicy, SmartSpecPolicy, ThresholdPolicy
from adaspec.policy.calibration import AcceptanceCalibrator
from adaspec.policy.time_model import StepTimePredictor, default_cpu_time_model

OVERRIDES = ("adaptive", "off", "fixed", "smartspec", "threshold")


@dataclass(frozen=True)
class StepLimits:
    max_draft: int
    budget_s: float | None


def _times(profile: Profile | None) -> StepTimePredictor:
    return StepTimePredictor(profile.time_model if profile else default_cpu_time_model())


def make_policy(kind: str, profile: Profile | None, fixed_k: int = 3) -> SpecPolicy:
    """Build a fresh policy of `kind` (one of OVERRIDES)."""
    if kind == "adaptive":
        cal = (
            AcceptanceCalibrator.from_profile(profile.calibration)
            if profile
            else AcceptanceCalibrator.identity()
        )
        return AdaSpecPolicy(_times(profile), cal)
    if kind == "off":
        return OffPolicy()
    if kind == "fixed":
        return FixedKPolicy(fixed_k)
    if kind == "smartspec":
        return SmartSpecPolicy(_times(profile))
    if kind == "threshold":
        return ThresholdPolicy()
    raise ValueError(f"unknown policy kind {kind!r}; expected one of {', '.join(OVERRIDES)}")


def limits_for(policy: Policy, kind: str) -> StepLimits:
    """Per-step limits: only AdaSpec enforces the budget (baselines are static flags)."""
    if kind == "off":
        return StepLimits(0, None)
    if kind == "fixed":
        return StepLimits(policy.fixed_draft_tokens, None)
    budget = policy.tpot_budget_ms / 1000.0 if kind == "adaptive" else None
    return StepLimits(policy.max_draft_tokens, budget)


class PolicySelector:
    """Keeps one policy instance per kind; `select` maps a Policy document to (policy, limits)."""

    def __init__(self, profile: Profile | None = None, override: str | None = None) -> None:
        if override is not None and override not in OVERRIDES:
            raise ValueError(
                f"unknown --spec-policy {override!r}; expected one of {', '.join(OVERRIDES)}"
            )
        self.profile = profile
        self.override = override
        self._instances: dict[tuple[str, int], SpecPolicy] = {}

    def kind_for(self, policy: Policy) -> str:
        if self.override is not None:
            return self.override
        return {SpecMode.adaptive: "adaptive", SpecMode.fixed: "fixed", SpecMode.off: "off"}[
            policy.mode
        ]

    def select(self, policy: Policy) -> tuple[SpecPolicy, StepLimits]:
        kind = self.kind_for(policy)
        key = (kind, policy.fixed_draft_tokens if kind == "fixed" else 0)
        inst = self._instances.get(key)
        if inst is None:
            inst = make_policy(kind, self.profile, fixed_k=policy.fixed_draft_tokens)
            self._instances[key] = inst
        return inst, limits_for(policy, kind)


def build_policy(
    policy: Policy, profile: Profile | None, override: str | None = None
) -> SpecPolicy:
    """One-shot convenience (tests, benchmarks): a fresh policy for this document."""
    return PolicySelector(profile, override).select(policy)[0]
