"""Pure status helpers: conditions, Job/pod reading, phases, spec → policy."""

from __future__ import annotations

from adaspec.contract import Policy, SpecMode
from specserve import control, status
from specserve.api import ConditionType, Phase


def test_condition_transition_time_changes_only_on_flip() -> None:
    c = status.set_condition([], ConditionType.available, "False", "EngineStarting", "0/1", now=100)
    c = status.set_condition(c, ConditionType.available, "False", "EngineStarting", "0/2", now=200)
    assert c[0]["lastTransitionTime"] == status.rfc3339(100) and c[0]["message"] == "0/2"
    c = status.set_condition(c, ConditionType.available, "True", "EngineAvailable", "1/2", now=300)
    assert c[0]["lastTransitionTime"] == status.rfc3339(300)
    c = status.set_condition(c, ConditionType.validated, "True", "SpecValid", "", now=300)
    assert [x["type"] for x in c] == ["Validated", "Available"]  # documented order
    assert status.is_true(c, ConditionType.available)


def test_time_round_trip() -> None:
    assert status.parse_time(status.rfc3339(1_800_000_000)) == 1_800_000_000
    assert status.parse_time("not a time") is None
    assert status.parse_time(None) is None


def test_job_state() -> None:
    assert status.job_state({})[0] == "running"
    done = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert status.job_state(done)[0] == "succeeded"
    failed = {
        "status": {
            "conditions": [
                {"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                 "message": "Job was active longer than specified deadline"}
            ]
        }
    }  # fmt: skip
    state, detail = status.job_state(failed)
    assert state == "failed" and detail.startswith("DeadlineExceeded")


def pod(code: int, message: str, finished: str, last: bool = False) -> dict[str, object]:
    term = {"exitCode": code, "message": message, "finishedAt": finished}
    key = "lastState" if last else "state"
    return {"status": {"containerStatuses": [{key: {"terminated": term}}]}}


def test_termination_message_prefers_newest_success_and_failure_detail_tails() -> None:
    pods = [
        pod(1, "boom", "2026-11-29T03:00:00Z"),
        pod(0, '{"a": 1}\n', "2026-11-29T03:05:00Z"),
        pod(0, '{"a": 2}', "2026-11-29T03:01:00Z", last=True),
    ]
    assert status.termination_message(pods) == '{"a": 1}'
    assert status.termination_message([pod(1, "x", "t")]) is None
    long = "x" * 1000 + "THE END"
    detail = status.failure_detail([pod(137, long, "t")])
    assert detail.startswith("exit code 137") and detail.endswith("THE END") and len(detail) < 450


def test_phase_after_deploy() -> None:
    assert status.phase_after_deploy(True, True, None, "Deploying") == Phase.ready
    assert status.phase_after_deploy(True, True, False, "Ready") == Phase.degraded
    assert status.phase_after_deploy(True, False, True, "Ready") == Phase.degraded
    assert status.phase_after_deploy(False, False, None, "Deploying") == Phase.deploying
    assert status.phase_after_deploy(False, False, None, "Ready") == Phase.degraded


def test_availability_reasons() -> None:
    assert status.availability({}, 0)[1] == "ScaledToZero"
    stuck = {"status": {"conditions": [{"type": "Progressing",
                                         "reason": "ProgressDeadlineExceeded"}]}}  # fmt: skip
    assert status.availability(stuck, 1)[1] == "ProgressDeadlineExceeded"
    assert status.availability({"status": {"availableReplicas": 1}}, 2)[:2] == (
        "True",
        "EngineAvailable",
    )


def test_memory_round_trip_and_history_cap() -> None:
    mem = control.Memory(last_policy_change=1_800_000_000.0, breach_since=1_800_000_015.0)
    st = {"control": status.memory_to_status(mem, 1_800_000_030.0)}
    assert st["control"]["farUnderSince"] is None  # merge patch deletes it
    assert status.memory_from_status(st) == mem
    hist: list[dict[str, object]] = []
    for i in range(15):
        hist = status.append_history(hist, {"generation": i})
    assert len(hist) == 10 and hist[-1]["generation"] == 14


def test_policy_for_spec() -> None:
    first, why = status.policy_for_spec(None, 50.0, SpecMode.adaptive, 6, 3)
    assert first.generation == 1 and first.tpot_budget_ms == 50.0 and why
    same, why = status.policy_for_spec(first, 50.0, SpecMode.adaptive, 6, 3)
    assert same is first and why == ""
    tuned = Policy.model_validate({**first.model_dump(), "tpot_budget_ms": 41.0})
    kept, why = status.policy_for_spec(tuned, 50.0, SpecMode.adaptive, 8, 3)
    assert why == "" and kept.tpot_budget_ms == 41.0  # raising the cap keeps the tuned policy
    capped, why = status.policy_for_spec(tuned, 50.0, SpecMode.adaptive, 4, 3)
    assert capped.max_draft_tokens == 4 and capped.tpot_budget_ms == 41.0 and "6→4" in why
    new_slo, why = status.policy_for_spec(tuned, 30.0, SpecMode.fixed, 6, 2)
    assert new_slo.tpot_budget_ms == 30.0 and new_slo.mode is SpecMode.fixed
    assert new_slo.generation == 2 and "SLO 50→30 ms" in why and "mode adaptive→fixed" in why
