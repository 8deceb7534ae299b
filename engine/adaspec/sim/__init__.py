"""Discrete-event simulator: replays request traces through the real SpecPolicy code.

from adaspec.sim import load_trace, run_policy, load_builtin_profile
profile = load_builtin_profile("h200-7b-0.5b-synthetic")
res = run_policy("adaptive", load_trace("adaspec-conv"), profile, policy_doc)
print(res.summary(tpot_slo_s=0.05))
"""

from adaspec.sim.acceptance import (
    AcceptanceModel,
    AcceptanceSampler,
    AcceptanceSource,
    PositionDraws,
    RejectionKeyedDraws,
    cpu_pair_acceptance,
    load_acceptance_model,
)
from adaspec.sim.measured_text import (
    MeasuredAcceptance,
    MeasuredSampler,
    MeasuredText,
    load_measured_acceptance,
)
from adaspec.sim.oracle import ClairvoyantDrafter, run_clairvoyant
from adaspec.sim.overhead import EngineOverhead
from adaspec.sim.profile_store import builtin_profiles, load_builtin_profile
from adaspec.sim.results import RequestRecord, StepLog, Summary, summarize
from adaspec.sim.simulator import (
    POLICY_KINDS,
    SimConfig,
    SimResult,
    policy_for,
    run_policy,
    simulate,
)
from adaspec.sim.step_log import (
    LoggedStep,
    OverheadFit,
    StepLogError,
    StepLogs,
    StepRecord,
    compare,
    fit_leave_one_policy_out,
    fit_overhead,
    load_step_logs,
)
from adaspec.sim.traces import (
    KNOWN_TRACES,
    ScaleSpec,
    Trace,
    TraceError,
    load_trace,
    poisson_trace,
    rate_scaled,
    scale_trace,
)

__all__ = [
    "KNOWN_TRACES",
    "POLICY_KINDS",
    "AcceptanceModel",
    "AcceptanceSampler",
    "AcceptanceSource",
    "ClairvoyantDrafter",
    "EngineOverhead",
    "LoggedStep",
    "MeasuredAcceptance",
    "MeasuredSampler",
    "MeasuredText",
    "OverheadFit",
    "PositionDraws",
    "RejectionKeyedDraws",
    "RequestRecord",
    "ScaleSpec",
    "SimConfig",
    "SimResult",
    "StepLog",
    "StepLogError",
    "StepLogs",
    "StepRecord",
    "Summary",
    "Trace",
    "TraceError",
    "builtin_profiles",
    "compare",
    "cpu_pair_acceptance",
    "fit_leave_one_policy_out",
    "fit_overhead",
    "load_acceptance_model",
    "load_builtin_profile",
    "load_measured_acceptance",
    "load_step_logs",
    "load_trace",
    "poisson_trace",
    "policy_for",
    "rate_scaled",
    "run_clairvoyant",
    "run_policy",
    "scale_trace",
    "simulate",
    "summarize",
]
