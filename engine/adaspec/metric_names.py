"""Engine metric names (DESIGN §3): the contract between engine, Prometheus rules and operator.

Kept free of prometheus_client so the operator can import the names without the engine.
All durations are in seconds (Prometheus convention); the SLO itself is configured in ms.
"""

PREFIX = "specserve_"

REQUEST_TPOT = PREFIX + "request_tpot_seconds"  # histogram, one observation per finished request
REQUEST_TTFT = PREFIX + "request_ttft_seconds"  # histogram
STEP_DURATION = PREFIX + "step_duration_seconds"  # histogram, one per decoding step
DRAFT_PROPOSED = PREFIX + "draft_tokens_proposed_total"  # counter: tokens drafted
DRAFT_VERIFIED = PREFIX + "draft_tokens_verified_total"  # counter: drafted tokens sent to verify
DRAFT_ACCEPTED = PREFIX + "draft_tokens_accepted_total"  # counter: verified tokens accepted
GENERATED_TOKENS = PREFIX + "generated_tokens_total"  # counter: tokens emitted to clients
TARGET_FORWARDS = PREFIX + "target_forwards_total"  # counter: target (verification) passes
SPEC_LENGTH = PREFIX + "spec_length"  # histogram: verified draft tokens per request per step
REQUESTS_RUNNING = PREFIX + "requests_running"  # gauge
REQUESTS_WAITING = PREFIX + "requests_waiting"  # gauge
REQUESTS_TOTAL = PREFIX + "requests_total"  # counter{outcome}
POLICY_GENERATION = PREFIX + "policy_generation"  # gauge
POLICY_BUDGET = PREFIX + "policy_tpot_budget_seconds"  # gauge
POLICY_SLO = PREFIX + "policy_tpot_slo_seconds"  # gauge
POLICY_MAX_DRAFT = PREFIX + "policy_max_draft_tokens"  # gauge
POLICY_RELOAD_ERRORS = PREFIX + "policy_reload_errors_total"  # counter
POLICY_INVALID = PREFIX + "policy_invalid"  # gauge 1 while the file on disk is rejected
STEP_PREDICTED = PREFIX + "step_predicted_seconds"  # histogram of the time model's prediction
STEP_MODEL_ERROR = PREFIX + "step_time_model_error_ratio"  # histogram observed/predicted
SLO_GUARD_REFUSALS = PREFIX + "slo_guard_refusals_total"  # counter: draft steps refused
SLO_INFEASIBLE = PREFIX + "slo_infeasible"  # gauge 1 when even plain decoding breaks the budget
ACCEPTANCE_CALIBRATION_ERROR = PREFIX + "acceptance_calibration_error"  # gauge: |pred-obs|

# Buckets around typical CPU and GPU TPOT SLOs (fine near 20 ms..1 s).
TPOT_BUCKETS = (
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.035,
    0.04,
    0.05,
    0.06,
    0.07,
    0.08,
    0.09,
    0.1,
    0.12,
    0.14,
    0.16,
    0.18,
    0.2,
    0.225,
    0.25,
    0.275,
    0.3,
    0.35,
    0.4,
    0.45,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    1.0,
    1.25,
    1.5,
    2.0,
    3.0,
    5.0,
)
