"""The outer SLO loop (DESIGN §1): a pure function from observations to a new policy, a
replica count, conditions and a history entry. No clock, no I/O: `now` comes in as an argument,
so the loop is unit-tested with a fake clock and replayed offline (bench/controller_convergence).

Budget — a correction-factor controller with hysteresis and dwell:
  r = observed TPOT (at slo.percentile) / SLO
  * r > 1.0 (breach), ≥ tighten_dwell_s since the last change, and the engines do not report
    that plain decoding already breaks the budget (then tightening cannot help):
        budget ← min(budget, max(floor, budget · clamp((target/r)^gain_tighten, max_step_down, 1)))
    a severe breach (factor < k_cut_factor), or a budget already pinned at its floor, also
    lowers maxDraftTokens by one (long drafts make single verification steps long, which is
    what pushes the tail of TPOT up; at the floor it is the only lever left);
  * r < 0.8 (far under: the budget is tighter than needed and costs goodput),
    ≥ relax_dwell_s since the last change, and the engines' SLO guard is refusing draft steps
    (specserve_slo_guard_refusals_total rising; when it is not, the budget does not bind and
    relaxing it would only let it drift up while idle, which lengthens the next breach):
        budget ← budget · clamp((target/r)^gain_relax, 1, max_step_up), maxDraftTokens + 1
        (up to spec.speculation.maxDraftTokens);
  * 0.8 ≤ r ≤ 1.0: hold (the hysteresis band; target = 0.9 sits in its middle).
  The budget stays within [budget_min_ratio, budget_max_ratio] × SLO, and a tightening move
  never takes it below the *plain-step floor*: the time of one plain decoding step (one token
  per running request, no drafts) that the SpecService's profiled time model predicts at the
  observed load. No budget below that can be met even without speculation, so going lower
  buys nothing and must be relaxed back later (a pointless overshoot). When the SLO itself is
  below the floor and TPOT breaches it, the policy is held and SLOFeasible=False
  (SLOBelowPlainStep) names the predicted plain step time; only more replicas (less load per
  engine) can help. Tightening is fast and relaxing slow (asymmetric gains and dwell), because
  a breach costs users and slack only costs goodput. Only mode `adaptive` is adjusted; `fixed`
  and `off` are observed, never changed.

Replicas (only with autoscaling.enabled), within minReplicas..maxReplicas:
  * +1 when the SLO has been breached *and* infeasible for scale_up_after_s: the engines report
    that even plain decoding breaks the budget (specserve_slo_infeasible), the SLO is below the
    predicted plain step time, or the policy is at its limits (budget at its floor and
    maxDraftTokens at its minimum);
  * −1 when TPOT has stayed below scale_down_ratio × SLO for scale_down_after_s;
  * at most one change per scale_cooldown_s (new pods need time to start and to show up).

Missing or stale metrics, or a failing Prometheus, hold everything (policy and replicas) and
set MetricsAvailable=False with reason MetricsMissing, MetricsStale or PrometheusError.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from adaspec.contract import Policy, SpecMode, TimeModel
from adaspec.policy.time_model import StepTimePredictor
from specserve.api import ConditionType, SpecServiceSpec

# Condition reasons (CamelCase, stable: users alert on them).
METRICS_FOUND = "MetricsFound"
METRICS_MISSING = "MetricsMissing"
METRICS_STALE = "MetricsStale"
PROMETHEUS_ERROR = "PrometheusError"
PROMETHEUS_NOT_CONFIGURED = "PrometheusNotConfigured"
WITHIN_SLO = "WithinSLO"
SLO_BREACHED = "SLOBreached"
NO_METRICS = "NoMetrics"
FEASIBLE = "Feasible"
PLAIN_DECODING_TOO_SLOW = "PlainDecodingTooSlow"
SLO_BELOW_PLAIN_STEP = "SLOBelowPlainStep"
POLICY_AT_LIMIT = "PolicyAtLimit"


@dataclass(frozen=True)
class Observation:
    """What Prometheus said about one SpecService in the last window (None = no data)."""

    tpot_ms: float | None = None
    """Per-request TPOT at slo.percentile, milliseconds."""
    tpot_p90_ms: float | None = None
    request_rate: float | None = None
    acceptance_rate: float | None = None
    mean_draft_length: float | None = None
    infeasible: bool | None = None
    """Any engine reports that plain decoding alone breaks the budget."""
    sample_age_s: float | None = None
    """Age of the newest scraped sample; None when no series exist at all."""
    engine_policy_generation: int | None = None
    guard_refusal_rate: float | None = None
    """Draft steps/s the engines' SLO guard refused (0: the budget does not bind)."""
    ttft_ms: float | None = None
    """Per-request TTFT at slo.percentile (reported; the controller does not act on it)."""
    mean_running: float | None = None
    """Requests in an engine's running batch, averaged over the window and the pods: the load
    at which the plain-step floor is predicted."""
    error: str | None = None
    """Set when Prometheus could not answer; everything else is then None."""
    error_reason: str = PROMETHEUS_ERROR


@dataclass(frozen=True)
class ControllerConfig:
    band_low: float = 0.8
    band_high: float = 1.0
    target_ratio: float = 0.9
    gain_tighten: float = 1.0
    gain_relax: float = 0.5
    max_step_down: float = 0.5
    max_step_up: float = 1.25
    budget_min_ratio: float = 0.25
    budget_max_ratio: float = 1.5
    k_cut_factor: float = 0.75
    min_draft_tokens: int = 1
    tighten_dwell_s: float = 30.0
    relax_dwell_s: float = 120.0
    stale_after_s: float = 90.0
    min_request_rate: float = 0.1
    scale_up_after_s: float = 30.0
    scale_down_ratio: float = 0.5
    scale_down_after_s: float = 300.0
    scale_cooldown_s: float = 120.0

    def __post_init__(self) -> None:
        if not 0 < self.band_low < self.target_ratio <= self.band_high:
            raise ValueError("need 0 < band_low < target_ratio <= band_high")
        if not 0 < self.budget_min_ratio < self.budget_max_ratio:
            raise ValueError("need 0 < budget_min_ratio < budget_max_ratio")
        if not 0 < self.max_step_down < 1 < self.max_step_up:
            raise ValueError("need 0 < max_step_down < 1 < max_step_up")


@dataclass(frozen=True)
class Memory:
    """Timers the controller carries between ticks (epoch seconds; None = not running)."""

    last_policy_change: float | None = None
    last_scale_change: float | None = None
    breach_since: float | None = None
    far_under_since: float | None = None
    infeasible_since: float | None = None


@dataclass(frozen=True)
class Cond:
    status: str
    reason: str
    message: str


@dataclass(frozen=True)
class HistoryEntry:
    time: float
    generation: int
    tpot_budget_ms: float
    max_draft_tokens: int
    replicas: int | None
    observed_tpot_ms: float | None
    reason: str


@dataclass(frozen=True)
class Decision:
    policy: Policy
    replicas: int
    conditions: dict[ConditionType, Cond]
    memory: Memory
    history: HistoryEntry | None
    metrics_ok: bool
    policy_changed: bool = False
    plain_step_ms: float | None = None
    """The budget floor this tick (None: no profile, or metrics unusable)."""


def _since(t: float | None, now: float) -> float:
    return float("inf") if t is None else now - t


@dataclass(frozen=True)
class PlainStep:
    """The predicted time of one plain decoding step at the observed load (the budget floor)."""

    ms: float
    batch: float

    def describe(self) -> str:
        return (
            f"predicted plain decoding step {self.ms:.1f} ms at {self.batch:.1f} running "
            "requests per engine (profile time model)"
        )


def plain_step(time_model: TimeModel | None, obs: Observation) -> PlainStep | None:
    """One verification pass over the batch with one token per request, no draft pass, from the
    profiled time model (the same formula as the engine's guard, without its online bias
    correction, which no metric exports). Context attention work is taken as 0 (no metric
    reports context lengths) and the batch is a time average that counts idle time, so the load
    is under- rather than overestimated: the floor errs towards letting the budget go too low,
    not towards blocking a move the engines could meet. None without a profile."""
    if time_model is None:
        return None
    batch = max(1.0, obs.mean_running or 0.0)  # a finished request was running: ≥ 1
    ms = StepTimePredictor(time_model).verify(batch, batch, 0.0) * 1000.0
    return PlainStep(round(ms, 3), batch) if ms > 0 else None


def _hold(policy: Policy, replicas: int, memory: Memory, reason: str, message: str) -> Decision:
    unknown = Cond("Unknown", NO_METRICS, "no usable metrics: " + message)
    return Decision(
        policy=policy,
        replicas=replicas,
        conditions={
            ConditionType.metrics_available: Cond("False", reason, message),
            ConditionType.slo_met: unknown,
            ConditionType.slo_feasible: unknown,
        },
        # No evidence either way: the scale-down timer restarts, a breach timer keeps running.
        memory=replace(memory, far_under_since=None),
        history=None,
        metrics_ok=False,
    )


def metrics_problem(obs: Observation, cfg: ControllerConfig) -> tuple[str, str] | None:
    """(reason, message) when the observation cannot drive the controller, else None."""
    if obs.error is not None:
        return obs.error_reason, obs.error
    if obs.sample_age_s is None:
        return METRICS_MISSING, "no engine series found in Prometheus for this service"
    if obs.sample_age_s > cfg.stale_after_s:
        return (
            METRICS_STALE,
            f"newest engine sample is {obs.sample_age_s:.0f} s old "
            f"(limit {cfg.stale_after_s:.0f} s): scraping stopped?",
        )
    rate = obs.request_rate or 0.0
    if obs.tpot_ms is None or rate < cfg.min_request_rate:
        return (
            METRICS_MISSING,
            f"too few finished requests to estimate TPOT ({rate:.3g}/s, "
            f"need ≥ {cfg.min_request_rate:g}/s)",
        )
    return None


def step(
    *,
    spec: SpecServiceSpec,
    policy: Policy,
    replicas: int,
    obs: Observation,
    memory: Memory,
    now: float,
    cfg: ControllerConfig | None = None,
    time_model: TimeModel | None = None,
) -> Decision:
    """One tick of the outer loop. `time_model` is the SpecService's profiled one (None when
    not profiled: then there is no plain-step floor)."""
    cfg = cfg or ControllerConfig()
    problem = metrics_problem(obs, cfg)
    if problem is not None:
        return _hold(policy, replicas, memory, *problem)
    assert obs.tpot_ms is not None  # metrics_problem guarantees it
    slo = spec.slo.tpot_ms
    pct = f"P{spec.slo.percentile:g}"
    r = obs.tpot_ms / slo
    breached = r > cfg.band_high
    conditions: dict[ConditionType, Cond] = {
        ConditionType.metrics_available: Cond(
            "True", METRICS_FOUND, f"{obs.request_rate or 0.0:.3g} requests/s in the window"
        ),
        ConditionType.slo_met: (
            Cond("False", SLO_BREACHED, f"{pct} TPOT {obs.tpot_ms:.1f} ms > SLO {slo:g} ms")
            if breached
            else Cond("True", WITHIN_SLO, f"{pct} TPOT {obs.tpot_ms:.1f} ms ≤ SLO {slo:g} ms")
        ),
    }
    memory = replace(memory, breach_since=(memory.breach_since or now) if breached else None)

    # ---- policy (budget and maxDraftTokens)
    plain = plain_step(time_model, obs)
    budget_hi = cfg.budget_max_ratio * slo
    budget_lo = max(cfg.budget_min_ratio * slo, plain.ms if plain else 0.0)
    slo_below_plain = breached and plain is not None and slo < plain.ms
    budget, k = policy.tpot_budget_ms, policy.max_draft_tokens
    new_budget, new_k, why = budget, k, ""
    adaptive = policy.mode is SpecMode.adaptive
    since_change = _since(memory.last_policy_change, now)
    # When the engines say even plain decoding breaks the budget, or the profile predicts that
    # plain decoding alone is slower than the SLO, a tighter budget cannot lower TPOT any
    # further (plain decoding is the floor): hold, and let replicas act.
    if (
        adaptive
        and breached
        and not obs.infeasible
        and not slo_below_plain
        and since_change >= cfg.tighten_dwell_s
    ):
        factor = max(cfg.max_step_down, min(1.0, (cfg.target_ratio / r) ** cfg.gain_tighten))
        # never below the floor, and a tightening move never raises the budget (it may already
        # be under a floor that rose with the load)
        new_budget = min(budget, max(budget_lo, min(budget_hi, budget * factor)))
        pinned = round(new_budget, 3) >= round(budget, 3)
        if (factor < cfg.k_cut_factor or pinned) and k > cfg.min_draft_tokens:
            new_k = k - 1
        why = f"{pct} TPOT {obs.tpot_ms:.1f} ms > SLO {slo:g} ms: tighten"
        if plain is not None and round(new_budget, 3) <= round(plain.ms, 3):
            why += f" (floor: {plain.describe()})"
    elif (
        adaptive
        and r < cfg.band_low
        and since_change >= cfg.relax_dwell_s
        and (obs.guard_refusal_rate is None or obs.guard_refusal_rate > 0)
    ):
        factor = min(cfg.max_step_up, max(1.0, (cfg.target_ratio / r) ** cfg.gain_relax))
        new_budget = max(budget_lo, min(budget_hi, budget * factor))
        new_k = min(k + 1, spec.speculation.max_draft_tokens)
        why = f"{pct} TPOT {obs.tpot_ms:.1f} ms < {cfg.band_low:g}×SLO {slo:g} ms: relax"
    new_budget = round(new_budget, 3)
    policy_changed = new_budget != round(budget, 3) or new_k != k
    new_policy = policy
    reasons: list[str] = []
    if policy_changed:
        parts = [f"budget {budget:.1f}→{new_budget:.1f} ms"]
        if new_k != k:
            parts.append(f"maxDraftTokens {k}→{new_k}")
        reasons.append(f"{why}: {', '.join(parts)}")
        new_policy = policy.model_copy(
            update={
                "generation": policy.generation + 1,
                "tpot_budget_ms": new_budget,
                "max_draft_tokens": new_k,
                "fixed_draft_tokens": min(policy.fixed_draft_tokens, new_k),
                "reason": reasons[-1],
            }
        )
        memory = replace(memory, last_policy_change=now)

    # ---- feasibility
    at_limit = breached and (
        not adaptive
        or (
            round(budget, 3) <= round(budget_lo, 3)
            and k <= cfg.min_draft_tokens
            and not policy_changed
        )
    )
    if slo_below_plain:
        assert plain is not None  # slo_below_plain implies it
        conditions[ConditionType.slo_feasible] = Cond(
            "False",
            SLO_BELOW_PLAIN_STEP,
            f"SLO breached and SLO {slo:g} ms is below the {plain.describe()}: no speculation "
            "policy can meet it; add replicas (less load per engine) or raise the SLO",
        )
    elif breached and obs.infeasible:
        conditions[ConditionType.slo_feasible] = Cond(
            "False",
            PLAIN_DECODING_TOO_SLOW,
            "SLO breached and the engines report that even plain decoding breaks the budget",
        )
    elif at_limit:
        limit = (
            f"speculation mode {policy.mode.value} is not adjusted by the operator"
            if not adaptive
            else f"budget at its floor {budget_lo:.1f} ms and maxDraftTokens at {k}"
            + (f" ({plain.describe()})" if plain is not None and budget_lo == plain.ms else "")
        )
        conditions[ConditionType.slo_feasible] = Cond(
            "False", POLICY_AT_LIMIT, f"SLO breached and {limit}"
        )
    else:
        conditions[ConditionType.slo_feasible] = Cond(
            "True", FEASIBLE, "the policy can keep TPOT under the SLO"
        )
    infeasible = breached and (bool(obs.infeasible) or slo_below_plain or at_limit)
    memory = replace(
        memory, infeasible_since=(memory.infeasible_since or now) if infeasible else None
    )

    # ---- replicas
    new_replicas = replicas
    a = spec.autoscaling
    if a.enabled:
        memory = replace(
            memory,
            far_under_since=(memory.far_under_since or now)
            if r < cfg.scale_down_ratio and not infeasible
            else None,
        )
        cooled = _since(memory.last_scale_change, now) >= cfg.scale_cooldown_s
        if replicas < a.min_replicas or replicas > a.max_replicas:
            new_replicas = max(a.min_replicas, min(a.max_replicas, replicas))
            reasons.append(f"replicas {replicas} outside {a.min_replicas}..{a.max_replicas}")
        elif (
            infeasible
            and _since(memory.infeasible_since, now) >= cfg.scale_up_after_s
            and cooled
            and replicas < a.max_replicas
        ):
            new_replicas = replicas + 1
            reasons.append(
                f"SLO infeasible for {now - (memory.infeasible_since or now):.0f} s: "
                f"scale {replicas}→{new_replicas}"
            )
        elif (
            memory.far_under_since is not None
            and now - memory.far_under_since >= cfg.scale_down_after_s
            and cooled
            and replicas > a.min_replicas
        ):
            new_replicas = replicas - 1
            reasons.append(
                f"{pct} TPOT {obs.tpot_ms:.1f} ms < {cfg.scale_down_ratio:g}×SLO for "
                f"{now - memory.far_under_since:.0f} s: scale {replicas}→{new_replicas}"
            )
        if new_replicas != replicas:
            memory = replace(memory, last_scale_change=now, far_under_since=None)

    history = None
    if reasons:
        history = HistoryEntry(
            time=now,
            generation=new_policy.generation,
            tpot_budget_ms=new_policy.tpot_budget_ms,
            max_draft_tokens=new_policy.max_draft_tokens,
            replicas=new_replicas,
            observed_tpot_ms=round(obs.tpot_ms, 3),
            reason="; ".join(reasons),
        )
    return Decision(
        policy=new_policy,
        replicas=new_replicas,
        conditions=conditions,
        memory=memory,
        history=history,
        metrics_ok=True,
        policy_changed=policy_changed,
        plain_step_ms=plain.ms if plain else None,
    )
