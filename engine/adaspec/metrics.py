"""Prometheus metrics of one engine (names from `adaspec.metric_names`, DESIGN §3).

Each engine owns its own CollectorRegistry, so several engines (tests, benchmarks) can live in
one process without clashing, and `/metrics` exposes exactly this engine's series.
Everything here is a thin recorder: the engine loop decides *what* happened, this module only
turns it into samples. prometheus_client is thread-safe, so the engine thread records directly.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from adaspec import metric_names as mn
from adaspec.backends.base import StepStats
from adaspec.contract import Policy

STEP_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
SPEC_LEN_BUCKETS = tuple(float(k) for k in range(17))
RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 4.0)

OUTCOMES = ("stop", "length", "abort", "error", "rejected")
"""requests_total{outcome}: finished by EOS/stop string, by max_tokens/context, client gone or
cancelled, failed by an engine error, refused at admission (queue full / shutting down)."""


class EngineMetrics:
    """All engine series, registered in a private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tpot = Histogram(
            mn.REQUEST_TPOT,
            "Per-request time per output token: (finish - first token) / (tokens - 1)",
            buckets=mn.TPOT_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            mn.REQUEST_TTFT,
            "Time from admission request to first token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            mn.STEP_DURATION,
            "Wall time of one decoding step of the running batch",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.proposed = Counter(
            _base(mn.DRAFT_PROPOSED), "Draft tokens produced by draft passes", registry=r
        )
        self.verified = Counter(
            _base(mn.DRAFT_VERIFIED), "Draft tokens sent to verification", registry=r
        )
        self.accepted = Counter(
            _base(mn.DRAFT_ACCEPTED), "Verified draft tokens accepted by the target", registry=r
        )
        self.generated = Counter(
            _base(mn.GENERATED_TOKENS), "Tokens emitted to clients", registry=r
        )
        self.target_forwards = Counter(
            _base(mn.TARGET_FORWARDS),
            "Target forward passes per sequence (one per prefill, one per sequence per step)",
            registry=r,
        )
        self.spec_length = Histogram(
            mn.SPEC_LENGTH,
            "Verified draft tokens per request per step",
            buckets=SPEC_LEN_BUCKETS,
            registry=r,
        )
        self.running = Gauge(mn.REQUESTS_RUNNING, "Requests in the running batch", registry=r)
        self.waiting = Gauge(mn.REQUESTS_WAITING, "Requests waiting for admission", registry=r)
        self.requests = Counter(
            _base(mn.REQUESTS_TOTAL), "Requests by outcome", ["outcome"], registry=r
        )
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)
        self.policy_generation = Gauge(
            mn.POLICY_GENERATION, "Generation of the policy in effect", registry=r
        )
        self.policy_budget = Gauge(
            mn.POLICY_BUDGET, "TPOT budget the SLO guard enforces (seconds)", registry=r
        )
        self.policy_slo = Gauge(mn.POLICY_SLO, "TPOT SLO of the policy in effect", registry=r)
        self.policy_max_draft = Gauge(
            mn.POLICY_MAX_DRAFT, "Max draft tokens per request per step in effect", registry=r
        )
        self.policy_reload_errors = Counter(
            _base(mn.POLICY_RELOAD_ERRORS), "Policy files rejected (last good kept)", registry=r
        )
        self.policy_invalid = Gauge(
            mn.POLICY_INVALID, "1 while the policy file on disk is rejected", registry=r
        )
        self.step_predicted = Histogram(
            mn.STEP_PREDICTED,
            "Step time predicted by the policy's time model",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.model_error = Histogram(
            mn.STEP_MODEL_ERROR,
            "Observed / predicted step time (draft + verification)",
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.guard_refusals = Counter(
            _base(mn.SLO_GUARD_REFUSALS),
            "Draft tokens dropped because the step would break the TPOT budget",
            registry=r,
        )
        self.infeasible = Gauge(
            mn.SLO_INFEASIBLE,
            "1 when the last step predicted even plain decoding to break the budget",
            registry=r,
        )
        self.calibration_error = Gauge(
            mn.ACCEPTANCE_CALIBRATION_ERROR,
            "EWMA of |predicted - observed accepted tokens| per verified draft token",
            registry=r,
        )
        self._cal_err: float | None = None

    # ------------------------------------------------------------------ recorders

    def record_policy(self, policy: Policy, max_draft: int, budget_s: float | None) -> None:
        self.policy_generation.set(policy.generation)
        self.policy_slo.set(policy.tpot_slo_ms / 1000.0)
        self.policy_budget.set(budget_s if budget_s is not None else policy.tpot_budget_ms / 1000)
        self.policy_max_draft.set(max_draft)

    def record_step(self, stats: StepStats, wall_s: float, forwards: int) -> None:
        self.step_duration.observe(wall_s)
        self.proposed.inc(stats.proposed)
        self.verified.inc(stats.verified)
        self.accepted.inc(stats.accepted)
        self.target_forwards.inc(forwards)
        for s in stats.spec_lens:
            self.spec_length.observe(s)
        d = stats.decision
        if d is None:
            return
        self.guard_refusals.inc(d.guard_refusals)
        self.infeasible.set(1.0 if d.infeasible else 0.0)
        if d.predicted_step_s > 0.0:
            self.step_predicted.observe(d.predicted_step_s)
            observed = stats.draft_time_s + stats.verify_time_s
            if observed > 0.0:
                self.model_error.observe(observed / d.predicted_step_s)
            if stats.verified > 0:
                predicted_accepted = float((d.expected_tokens - 1.0).sum())
                err = abs(predicted_accepted - stats.accepted) / stats.verified
                self._cal_err = err if self._cal_err is None else 0.9 * self._cal_err + 0.1 * err
                self.calibration_error.set(self._cal_err)

    def record_finish(self, outcome: str, tpot_s: float | None) -> None:
        self.requests.labels(outcome=outcome).inc()
        if tpot_s is not None:
            self.tpot.observe(tpot_s)

    include_default_registry = False
    """Also expose prometheus_client's global registry (the vLLM backend's vllm:* metrics)."""

    def exposition(self) -> bytes:
        own = generate_latest(self.registry)
        if not self.include_default_registry:
            return own
        from prometheus_client import REGISTRY

        return own + generate_latest(REGISTRY)


def _base(name: str) -> str:
    """prometheus_client appends `_total` to counters itself; strip it from the contract name."""
    return name.removesuffix("_total")
