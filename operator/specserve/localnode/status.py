"""Pod status documents built from what the agent knows about its processes (pure)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

MESSAGE_LIMIT = 4096  # the kubelet's cap on a termination message
LOG_FALLBACK_LIMIT = 2048
LOG_FALLBACK_LINES = 80

State = Literal["waiting", "running", "terminated"]


def rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerView:
    """What the agent knows about one container right now."""

    name: str
    image: str
    state: State = "waiting"
    reason: str = "ContainerCreating"
    message: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    ready: bool = False
    started: bool = False
    restart_count: int = 0
    pid: int | None = None
    last_terminated: dict[str, Any] | None = None

    def terminated_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "exitCode": self.exit_code if self.exit_code is not None else -1,
            "reason": self.reason,
            "containerID": self.container_id,
        }
        if self.message:
            doc["message"] = self.message
        if self.started_at is not None:
            doc["startedAt"] = rfc3339(self.started_at)
        if self.finished_at is not None:
            doc["finishedAt"] = rfc3339(self.finished_at)
        return doc

    @property
    def container_id(self) -> str:
        return f"localnode://{self.pid}" if self.pid else ""

    def status_doc(self) -> dict[str, Any]:
        state: dict[str, Any]
        if self.state == "running":
            state = {"running": {"startedAt": rfc3339(self.started_at or 0.0)}}
        elif self.state == "terminated":
            state = {"terminated": self.terminated_doc()}
        else:
            waiting: dict[str, Any] = {"reason": self.reason}
            if self.message:
                waiting["message"] = self.message
            state = {"waiting": waiting}
        doc: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
        }
        if self.container_id:
            doc["containerID"] = self.container_id
        return doc


def exit_reason(exit_code: int) -> str:
    return "Completed" if exit_code == 0 else "Error"


def termination_message(file_text: str | None, log_tail: str, policy: str, exit_code: int) -> str:
    """What the kubelet would put in state.terminated.message."""
    text = (file_text or "")[:MESSAGE_LIMIT]
    if text.strip() or policy != "FallbackToLogsOnError" or exit_code == 0:
        return text
    lines = log_tail.splitlines()[-LOG_FALLBACK_LINES:]
    return "\n".join(lines)[-LOG_FALLBACK_LIMIT:]


def pod_phase(restart_policy: str, containers: Sequence[ContainerView]) -> str:
    """Pending / Running / Succeeded / Failed from the containers' states."""
    if any(c.state == "running" for c in containers):
        return "Running"
    if containers and all(c.state == "terminated" for c in containers):
        ok = all(c.exit_code == 0 for c in containers)
        if restart_policy == "Never":
            return "Succeeded" if ok else "Failed"
        if restart_policy == "OnFailure" and ok:
            return "Succeeded"
        return "Running"  # about to restart
    if any(c.restart_count > 0 for c in containers):
        return "Running"  # waiting in restart back-off
    return "Pending"


def _condition(
    ctype: str, ok: bool, now: float, previous: Mapping[str, Mapping[str, Any]], reason: str = ""
) -> dict[str, Any]:
    status = "True" if ok else "False"
    prev = previous.get(ctype)
    since = (
        prev.get("lastTransitionTime")
        if prev and prev.get("status") == status and prev.get("lastTransitionTime")
        else rfc3339(now)
    )
    doc: dict[str, Any] = {
        "type": ctype,
        "status": status,
        "lastProbeTime": None,
        "lastTransitionTime": since,
    }
    if not ok and reason:
        doc["reason"] = reason
    return doc


def pod_status(
    *,
    restart_policy: str,
    containers: Sequence[ContainerView],
    pod_ip: str | None,
    start_time: float,
    now: float,
    previous: Mapping[str, Any] | None = None,
    message: str = "",
) -> dict[str, Any]:
    """The full `status` for a status-subresource patch."""
    prev_conditions = {c["type"]: c for c in (previous or {}).get("conditions") or []}
    phase = pod_phase(restart_policy, containers)
    all_ready = bool(containers) and all(c.ready for c in containers)
    if phase in ("Succeeded", "Failed"):
        all_ready = False
    not_ready = "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"
    status: dict[str, Any] = {
        "phase": phase,
        "hostIP": "127.0.0.1",
        "startTime": rfc3339(start_time),
        "qosClass": "BestEffort",
        "conditions": [
            _condition("Initialized", True, now, prev_conditions),
            _condition("Ready", all_ready, now, prev_conditions, not_ready),
            _condition("ContainersReady", all_ready, now, prev_conditions, not_ready),
            _condition("PodScheduled", True, now, prev_conditions),
        ],
        "containerStatuses": [c.status_doc() for c in containers],
    }
    if pod_ip:
        status["podIP"] = pod_ip
        status["podIPs"] = [{"ip": pod_ip}]
    if message:
        status["message"] = message
    return status


def without_times(status: Mapping[str, Any]) -> Any:
    """The status minus volatile fields, to decide whether a patch is needed."""
    if isinstance(status, Mapping):
        return {k: without_times(v) for k, v in status.items() if k not in ("lastProbeTime",)}
    if isinstance(status, list):
        return [without_times(v) for v in status]
    return status
