"""PromQL for one SpecService and a small Prometheus HTTP client (httpx, timeouts, retries).

Label names. Engine pods carry the label `specserve.io/service=<name>`. Prometheus'
kubernetes_sd exposes it as `__meta_kubernetes_pod_label_specserve_io_service`; the usual
`labelmap: __meta_kubernetes_pod_label_(.+)` relabel rule (and a Prometheus-Operator PodMonitor
with `podTargetLabels: [specserve.io/service]`, which the operator creates) turn it into the
series label `specserve_io_service`. The namespace comes from `__meta_kubernetes_namespace` →
`namespace` (the Prometheus-Operator default). Both names can be changed with the operator
environment variables SPECSERVE_PROM_SERVICE_LABEL and SPECSERVE_PROM_NAMESPACE_LABEL.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from adaspec import metric_names as m
from specserve.control import Observation

DEFAULT_SERVICE_LABEL = "specserve_io_service"
DEFAULT_NAMESPACE_LABEL = "namespace"
_WINDOW_RE = re.compile(r"^[1-9][0-9]*(ms|s|m|h)$")


class PrometheusError(RuntimeError):
    """Prometheus could not be reached or refused the query (the message says which)."""


@dataclass(frozen=True)
class Scope:
    """Which series belong to one SpecService."""

    namespace: str
    service: str
    namespace_label: str = DEFAULT_NAMESPACE_LABEL
    service_label: str = DEFAULT_SERVICE_LABEL

    def matchers(self) -> str:
        def esc(v: str) -> str:
            return v.replace("\\", "\\\\").replace('"', '\\"')

        return (
            f'{self.namespace_label}="{esc(self.namespace)}", '
            f'{self.service_label}="{esc(self.service)}"'
        )


@dataclass(frozen=True)
class Queries:
    """The PromQL the controller needs, built for one scope and rate window."""

    scope: Scope
    window: str = "1m"
    percentile: float = 90.0

    def __post_init__(self) -> None:
        if not _WINDOW_RE.match(self.window):
            raise ValueError(f"window: {self.window!r} is not a PromQL duration like 2m")

    def _sel(self, metric: str) -> str:
        return f"{metric}{{{self.scope.matchers()}}}"

    def _rate(self, metric: str) -> str:
        return f"sum(rate({self._sel(metric)}[{self.window}]))"

    def tpot_quantile(self, q: float) -> str:
        """Per-request TPOT quantile in seconds, pooled over the service's pods."""
        bucket = self._sel(m.REQUEST_TPOT + "_bucket")
        return f"histogram_quantile({q:g}, sum by (le) (rate({bucket}[{self.window}])))"

    def tpot_p90(self) -> str:
        return self.tpot_quantile(0.9)

    def tpot_slo(self) -> str:
        return self.tpot_quantile(self.percentile / 100.0)

    def ttft_slo(self) -> str:
        """Per-request TTFT at the SLO percentile, seconds."""
        bucket = self._sel(m.REQUEST_TTFT + "_bucket")
        q = self.percentile / 100.0
        return f"histogram_quantile({q:g}, sum by (le) (rate({bucket}[{self.window}])))"

    def request_rate(self) -> str:
        """Finished requests per second (one TPOT observation per finished request)."""
        return self._rate(m.REQUEST_TPOT + "_count")

    def acceptance_rate(self) -> str:
        return f"{self._rate(m.DRAFT_ACCEPTED)} / {self._rate(m.DRAFT_VERIFIED)}"

    def mean_draft_length(self) -> str:
        return f"{self._rate(m.SPEC_LENGTH + '_sum')} / {self._rate(m.SPEC_LENGTH + '_count')}"

    def guard_refusal_rate(self) -> str:
        """Draft steps per second the engines' SLO guard refused."""
        return self._rate(m.SLO_GUARD_REFUSALS)

    def infeasible(self) -> str:
        """1 when any pod's SLO guard says even plain decoding breaks the budget."""
        return f"max({self._sel(m.SLO_INFEASIBLE)})"

    def mean_running(self) -> str:
        """Requests in an engine's running batch: time average over the window, mean over pods
        (the load the plain-step floor is predicted at)."""
        return f"avg(avg_over_time({self._sel(m.REQUESTS_RUNNING)}[{self.window}]))"

    def sample_age(self) -> str:
        """Seconds since the newest scrape of any of the service's pods."""
        return f"time() - max(timestamp({self._sel(m.POLICY_GENERATION)}))"

    def engine_policy_generation(self) -> str:
        return f"min({self._sel(m.POLICY_GENERATION)})"


@dataclass(frozen=True)
class Sample:
    value: float
    timestamp: float


@dataclass
class RetryPolicy:
    attempts: int = 3
    backoff_s: float = 0.2
    retry_statuses: frozenset[int] = field(default_factory=lambda: frozenset({502, 503, 504}))


class PrometheusClient:
    """Instant queries against /api/v1/query. Retries connection errors, timeouts and 5xx
    gateway errors with exponential backoff; 4xx (bad query) fails at once."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"prometheus url: {base_url!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._client = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 2.0)),
            transport=transport,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> PrometheusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(self, promql: str) -> list[tuple[dict[str, str], Sample]]:
        """Run an instant query; returns (labels, sample) per series of a vector/scalar."""
        payload = self._get("/api/v1/query", {"query": promql})
        data = payload.get("data")
        if not isinstance(data, dict):
            raise PrometheusError("malformed response: no data object")
        kind, result = data.get("resultType"), data.get("result")
        try:
            if kind == "scalar":
                ts, val = result  # type: ignore[misc]
                return [({}, Sample(_float(val), float(ts)))]
            if kind == "vector" and isinstance(result, list):
                return [
                    (dict(s.get("metric", {})), Sample(_float(s["value"][1]), float(s["value"][0])))
                    for s in result
                ]
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise PrometheusError(f"malformed {kind} result: {e}") from e
        raise PrometheusError(f"unexpected resultType {kind!r} (want vector or scalar)")

    def scalar(self, promql: str) -> Sample | None:
        """A single value, or None when the query returns no series or NaN (no data)."""
        series = self.query(promql)
        if not series:
            return None
        sample = series[0][1]
        return None if math.isnan(sample.value) or math.isinf(sample.value) else sample

    def _get(self, path: str, params: dict[str, str]) -> dict[str, object]:
        last: str = "no attempt made"
        for attempt in range(self.retry.attempts):
            if attempt:
                self._sleep(self.retry.backoff_s * 2 ** (attempt - 1))
            try:
                resp = self._client.get(path, params=params)
            except httpx.TimeoutException as e:
                last = f"timeout talking to {self.base_url}: {type(e).__name__}"
                continue
            except httpx.TransportError as e:
                last = f"cannot reach {self.base_url}: {e}"
                continue
            if resp.status_code in self.retry.retry_statuses:
                last = f"HTTP {resp.status_code} from {self.base_url}"
                continue
            try:
                body = resp.json()
            except ValueError:
                raise PrometheusError(
                    f"HTTP {resp.status_code} from {self.base_url}: response is not JSON"
                ) from None
            if not isinstance(body, dict):
                raise PrometheusError("malformed response: not a JSON object")
            if body.get("status") != "success":
                raise PrometheusError(
                    f"query failed ({body.get('errorType', resp.status_code)}): "
                    f"{body.get('error', 'no error message')}"
                )
            return body
        raise PrometheusError(f"{last} (after {self.retry.attempts} attempts)")


def _float(value: object) -> float:
    # Prometheus encodes sample values as strings, including "NaN", "+Inf", "-Inf".
    return float(value)  # type: ignore[arg-type]


def collect(client: PrometheusClient, queries: Queries) -> Observation:
    """Run the controller's queries; any Prometheus failure becomes Observation(error=…)."""
    try:
        age = client.scalar(queries.sample_age())
        if age is None:
            return Observation()
        tpot = client.scalar(queries.tpot_slo())
        p90 = tpot if queries.percentile == 90.0 else client.scalar(queries.tpot_p90())
        rate = client.scalar(queries.request_rate())
        accept = client.scalar(queries.acceptance_rate())
        mean_len = client.scalar(queries.mean_draft_length())
        infeasible = client.scalar(queries.infeasible())
        gen = client.scalar(queries.engine_policy_generation())
        ttft = client.scalar(queries.ttft_slo())
        refusals = client.scalar(queries.guard_refusal_rate())
        running = client.scalar(queries.mean_running())
    except PrometheusError as e:
        return Observation(error=str(e))
    return Observation(
        tpot_ms=None if tpot is None else tpot.value * 1000.0,
        tpot_p90_ms=None if p90 is None else p90.value * 1000.0,
        request_rate=None if rate is None else rate.value,
        acceptance_rate=None if accept is None else accept.value,
        mean_draft_length=None if mean_len is None else mean_len.value,
        infeasible=None if infeasible is None else infeasible.value >= 0.5,
        sample_age_s=max(0.0, age.value),
        engine_policy_generation=None if gen is None else int(gen.value),
        ttft_ms=None if ttft is None else ttft.value * 1000.0,
        guard_refusal_rate=None if refusals is None else refusals.value,
        mean_running=None if running is None else running.value,
    )
