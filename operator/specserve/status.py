"""Pure helpers that read child objects and write SpecService status pieces.

Everything here takes and returns plain dicts (the wire form), so the handlers stay a thin
sequence of API calls and these rules are unit-tested without an API server.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from adaspec.contract import Policy, Profile, SpecMode
from specserve import control
from specserve.api import POLICY_HISTORY_LIMIT, ConditionType, Phase

Body = dict[str, Any]
JobState = Literal["running", "succeeded", "failed"]


# ----------------------------------------------------------------------------- time


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# ----------------------------------------------------------------------------- conditions


def set_condition(
    conditions: Iterable[Mapping[str, Any]],
    ctype: ConditionType,
    status: str,
    reason: str,
    message: str,
    *,
    now: float,
    generation: int | None = None,
) -> list[Body]:
    """Upsert one condition; lastTransitionTime changes only when the status flips."""
    out: list[Body] = []
    found = False
    for cond in conditions:
        if cond.get("type") != ctype.value:
            out.append(dict(cond))
            continue
        found = True
        changed = cond.get("status") != status
        out.append(
            _condition(
                ctype,
                status,
                reason,
                message,
                rfc3339(now) if changed else cond.get("lastTransitionTime") or rfc3339(now),
                generation,
            )
        )
    if not found:
        out.append(_condition(ctype, status, reason, message, rfc3339(now), generation))
    order = [c.value for c in ConditionType]
    return sorted(out, key=lambda c: order.index(c["type"]) if c["type"] in order else 99)


def _condition(
    ctype: ConditionType,
    status: str,
    reason: str,
    message: str,
    when: str,
    generation: int | None,
) -> Body:
    cond: Body = {
        "type": ctype.value,
        "status": status,
        "reason": reason,
        "message": message[:1024],
        "lastTransitionTime": when,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def get_condition(conditions: Iterable[Mapping[str, Any]], ctype: ConditionType) -> Body | None:
    for cond in conditions:
        if cond.get("type") == ctype.value:
            return dict(cond)
    return None


def is_true(conditions: Iterable[Mapping[str, Any]], ctype: ConditionType) -> bool:
    cond = get_condition(conditions, ctype)
    return cond is not None and cond.get("status") == "True"


# ----------------------------------------------------------------------------- profiling Job


def job_state(job: Mapping[str, Any]) -> tuple[JobState, str]:
    """(state, detail) from a Job's status conditions (Complete / Failed)."""
    for cond in job.get("status", {}).get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return "succeeded", "Job complete"
        if cond.get("type") == "Failed":
            reason = cond.get("reason") or "Failed"
            return "failed", f"{reason}: {cond.get('message') or 'no message'}"
    st = job.get("status", {})
    return "running", f"active={st.get('active', 0)} failed={st.get('failed', 0)}"


def _terminations(pods: Iterable[Mapping[str, Any]]) -> list[tuple[str, int, str]]:
    """(finishedAt, exitCode, message) of every terminated container, oldest first."""
    out = []
    for pod in pods:
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get(
                "terminated"
            )
            if term:
                out.append(
                    (
                        term.get("finishedAt") or "",
                        int(term.get("exitCode", -1)),
                        term.get("message") or "",
                    )
                )
    return sorted(out)


def termination_message(pods: Iterable[Mapping[str, Any]]) -> str | None:
    """The Profile JSON from the newest successful profiler container, if any."""
    ok = [msg for _, code, msg in _terminations(pods) if code == 0 and msg.strip()]
    return ok[-1].strip() if ok else None


def failure_detail(pods: Iterable[Mapping[str, Any]], limit: int = 400) -> str:
    """The tail of the newest failed container's message (FallbackToLogsOnError: its logs)."""
    failed = [(code, msg) for _, code, msg in _terminations(pods) if code != 0]
    if not failed:
        return ""
    code, msg = failed[-1]
    msg = msg.strip()
    tail = msg[-limit:] if len(msg) > limit else msg
    return f"exit code {code}: {tail}" if tail else f"exit code {code}"


def profile_summary(profile: Profile, config_map: str, job: str | None, key: str) -> Body:
    tm = profile.time_model

    def at_b1(m: Any, tokens: int) -> float:
        return round(float(m.intercept_ms + m.per_row_ms + m.per_token_ms * tokens), 3)

    out: Body = {
        "configMap": config_map,
        "key": key[:16],
        "createdAt": profile.created_at,
        "device": profile.hardware.device,
        "draftStepMs": at_b1(tm.draft, 1),
        "verifyStepMs": at_b1(tm.verify, 2),
    }
    if job:
        out["job"] = job
    if tm.draft.fit is not None:
        out["draftFitR2"] = round(tm.draft.fit.r2, 4)
    if tm.verify.fit is not None:
        out["verifyFitR2"] = round(tm.verify.fit.r2, 4)
    if profile.calibration.auc is not None:
        out["calibrationAuc"] = round(profile.calibration.auc, 4)
    return out


# ----------------------------------------------------------------------------- Deployment


def deployment_counts(dep: Mapping[str, Any]) -> tuple[int, int, int]:
    """(replicas, readyReplicas, availableReplicas) as reported by the Deployment."""
    st = dep.get("status") or {}
    return (
        int(st.get("replicas") or 0),
        int(st.get("readyReplicas") or 0),
        int(st.get("availableReplicas") or 0),
    )


def availability(dep: Mapping[str, Any], desired: int) -> tuple[str, str, str]:
    """(status, reason, message) for condition Available."""
    _, ready, available = deployment_counts(dep)
    if desired == 0:
        return "False", "ScaledToZero", "spec.replicas is 0"
    for cond in (dep.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return "False", "ProgressDeadlineExceeded", cond.get("message") or ""
    if available >= 1:
        return "True", "EngineAvailable", f"{available}/{desired} engine replicas available"
    return "False", "EngineStarting", f"{ready}/{desired} engine replicas ready"


def phase_after_deploy(
    available: bool, full: bool, slo_met: bool | None, previous: str | None
) -> Phase:
    """Ready: serving within SLO (or no verdict yet) at full strength. Degraded: serving but
    short of replicas or breaching the SLO, or was serving and lost every replica."""
    if available:
        return Phase.ready if full and slo_met is not False else Phase.degraded
    if previous in (Phase.ready.value, Phase.degraded.value):
        return Phase.degraded
    return Phase.deploying


# ----------------------------------------------------------------------------- control memory


def memory_from_status(status: Mapping[str, Any]) -> control.Memory:
    c = status.get("control") or {}
    return control.Memory(
        last_policy_change=parse_time(c.get("lastPolicyChange")),
        last_scale_change=parse_time(c.get("lastScaleChange")),
        breach_since=parse_time(c.get("breachSince")),
        far_under_since=parse_time(c.get("farUnderSince")),
        infeasible_since=parse_time(c.get("infeasibleSince")),
    )


def memory_to_status(memory: control.Memory, last_evaluated: float | None) -> Body:
    pairs = {
        "lastEvaluated": last_evaluated,
        "lastPolicyChange": memory.last_policy_change,
        "lastScaleChange": memory.last_scale_change,
        "breachSince": memory.breach_since,
        "farUnderSince": memory.far_under_since,
        "infeasibleSince": memory.infeasible_since,
    }
    # JSON merge patch: None deletes a key that a previous tick set.
    return {k: (rfc3339(v) if v is not None else None) for k, v in pairs.items()}


def history_entry(entry: control.HistoryEntry) -> Body:
    out: Body = {
        "time": rfc3339(entry.time),
        "generation": entry.generation,
        "tpotBudgetMs": entry.tpot_budget_ms,
        "maxDraftTokens": entry.max_draft_tokens,
        "reason": entry.reason[:512],
    }
    if entry.replicas is not None:
        out["replicas"] = entry.replicas
    if entry.observed_tpot_ms is not None:
        out["observedTpotMs"] = entry.observed_tpot_ms
    return out


def append_history(history: Iterable[Mapping[str, Any]], entry: Body) -> list[Body]:
    items = [dict(h) for h in history] + [entry]
    return items[-POLICY_HISTORY_LIMIT:]


def observed_status(obs: control.Observation, now: float) -> Body:
    def r(v: float | None, nd: int = 3) -> float | None:
        return None if v is None else round(v, nd)

    return {
        "time": rfc3339(now),
        "tpotP90Ms": r(obs.tpot_p90_ms),
        "tpotSloPercentileMs": r(obs.tpot_ms),
        "ttftSloPercentileMs": r(obs.ttft_ms),
        "requestRate": r(obs.request_rate, 4),
        "acceptanceRate": r(obs.acceptance_rate, 4),
        "meanDraftLength": r(obs.mean_draft_length, 3),
        "enginePolicyGeneration": obs.engine_policy_generation,
    }


def policy_status(policy: Policy) -> Body:
    return policy.model_dump(by_alias=True, mode="json")


# ----------------------------------------------------------------------------- spec → policy


def policy_for_spec(
    current: Policy | None, slo_ms: float, mode: SpecMode, max_draft: int, fixed_draft: int
) -> tuple[Policy, str]:
    """The policy after a spec change: ('' reason) when nothing in the spec moved.

    A new SLO resets the budget to the SLO (the controller then corrects it again); a lower
    maxDraftTokens caps the current one; mode and fixedDraftTokens are taken as they are.
    """
    if current is None:
        return (
            Policy(
                generation=1,
                mode=mode,
                tpot_slo_ms=slo_ms,
                tpot_budget_ms=slo_ms,
                max_draft_tokens=max_draft,
                fixed_draft_tokens=min(fixed_draft, max_draft),
                reason="initial policy from spec",
            ),
            "initial policy from spec",
        )
    changes: list[str] = []
    update: dict[str, Any] = {}
    if current.tpot_slo_ms != slo_ms:
        changes.append(f"SLO {current.tpot_slo_ms:g}→{slo_ms:g} ms (budget reset)")
        update |= {"tpot_slo_ms": slo_ms, "tpot_budget_ms": slo_ms}
    if current.mode != mode:
        changes.append(f"mode {current.mode.value}→{mode.value}")
        update["mode"] = mode
    new_max = current.max_draft_tokens
    if current.max_draft_tokens > max_draft or current.mode != mode:
        new_max = max_draft
    if new_max != current.max_draft_tokens:
        changes.append(f"maxDraftTokens {current.max_draft_tokens}→{new_max}")
        update["max_draft_tokens"] = new_max
    new_fixed = min(fixed_draft, new_max)
    if new_fixed != current.fixed_draft_tokens:
        changes.append(f"fixedDraftTokens {current.fixed_draft_tokens}→{new_fixed}")
        update["fixed_draft_tokens"] = new_fixed
    if not changes:
        return current, ""
    reason = "spec changed: " + ", ".join(changes)
    update |= {"generation": current.generation + 1, "reason": reason}
    return Policy.model_validate({**current.model_dump(), **update}), reason
