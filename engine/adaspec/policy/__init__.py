"""Pure AdaSpec policy math (numpy only; no torch, no vLLM)."""

from adaspec.policy.adaptive import AdaSpecPolicy
from adaspec.policy.base import SpecPolicy, StepContext, StepOutcome, VerifyDecision
from adaspec.policy.baselines import FixedKPolicy, OffPolicy, SmartSpecPolicy, ThresholdPolicy
from adaspec.policy.calibration import AcceptanceCalibrator
from adaspec.policy.time_model import StepTimePredictor, default_cpu_time_model

__all__ = [
    "AcceptanceCalibrator",
    "AdaSpecPolicy",
    "FixedKPolicy",
    "OffPolicy",
    "SmartSpecPolicy",
    "SpecPolicy",
    "StepContext",
    "StepOutcome",
    "StepTimePredictor",
    "ThresholdPolicy",
    "VerifyDecision",
    "default_cpu_time_model",
]
