"""httpGet probes: parsing (named ports resolved), a pure result tracker, and one HTTP check."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from specserve.localnode.env import UnsupportedPodError


@dataclass(frozen=True)
class ProbeSpec:
    """One probe of one container, with Kubernetes' defaults."""

    kind: str  # startup | readiness | liveness
    path: str
    port: int
    scheme: str = "HTTP"
    initial_delay_s: float = 0.0
    period_s: float = 10.0
    timeout_s: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3

    def url(self, host: str) -> str:
        return f"{self.scheme.lower()}://{host}:{self.port}{self.path}"


def resolve_port(container: Mapping[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    if port.isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise UnsupportedPodError(
        f"containers[{container.get('name', '?')}]: probe port {port!r} is not a declared port name"
    )


def parse_probe(container: Mapping[str, Any], kind: str) -> ProbeSpec | None:
    """The container's `<kind>Probe` as a ProbeSpec, or None when absent."""
    raw = container.get(f"{kind}Probe")
    if not raw:
        return None
    if "httpGet" not in raw:
        handlers = ", ".join(k for k in ("exec", "tcpSocket", "grpc") if k in raw) or "none"
        raise UnsupportedPodError(
            f"containers[{container.get('name', '?')}].{kind}Probe: only httpGet is supported "
            f"(got {handlers})"
        )
    http = raw["httpGet"]
    return ProbeSpec(
        kind=kind,
        path=http.get("path") or "/",
        port=resolve_port(container, http["port"]),
        scheme=http.get("scheme", "HTTP"),
        initial_delay_s=float(raw.get("initialDelaySeconds", 0)),
        period_s=float(raw.get("periodSeconds", 10)),
        timeout_s=float(raw.get("timeoutSeconds", 1)),
        success_threshold=int(raw.get("successThreshold", 1)),
        failure_threshold=int(raw.get("failureThreshold", 3)),
    )


@dataclass
class ProbeTracker:
    """Consecutive-result bookkeeping for one probe (pure: feed results, read state).

    `healthy` flips to True after success_threshold successes in a row and back to False after
    failure_threshold failures in a row, as the kubelet does. `due(now)` says when to probe next.
    """

    spec: ProbeSpec
    started_at: float
    healthy: bool = False
    successes: int = 0
    failures: int = 0
    last_probe_at: float | None = None
    last_error: str = field(default="")

    def due(self, now: float) -> bool:
        if now < self.started_at + self.spec.initial_delay_s:
            return False
        return self.last_probe_at is None or now - self.last_probe_at >= self.spec.period_s

    def record(self, now: float, ok: bool, error: str = "") -> bool:
        """Record one result; returns True when `healthy` changed."""
        self.last_probe_at = now
        before = self.healthy
        if ok:
            self.successes += 1
            self.failures = 0
            self.last_error = ""
            if self.successes >= self.spec.success_threshold:
                self.healthy = True
        else:
            self.failures += 1
            self.successes = 0
            self.last_error = error
            if self.failures >= self.spec.failure_threshold:
                self.healthy = False
        return before != self.healthy

    @property
    def failed_out(self) -> bool:
        """Failure threshold reached (liveness/startup: restart the container)."""
        return self.failures >= self.spec.failure_threshold


def http_check(spec: ProbeSpec, host: str) -> tuple[bool, str]:
    """One probe request: success is a 2xx/3xx answer within the timeout."""
    try:
        r = httpx.get(spec.url(host), timeout=spec.timeout_s, follow_redirects=False)
    except httpx.HTTPError as e:
        return False, f"{type(e).__name__}: {e}"
    if 200 <= r.status_code < 400:
        return True, ""
    return False, f"HTTP probe failed with statuscode: {r.status_code}"
