"""PromQL builders and the Prometheus client, with recorded API bodies served through
httpx.MockTransport (fault injection: timeouts, 5xx, bad queries, malformed bodies)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from specserve import control, prom
from specserve.prom import PrometheusClient, PrometheusError, Queries, RetryPolicy, Scope

DATA = Path(__file__).parent / "data" / "prom"
SCOPE = Scope("team-a", "chat")


def body(name: str) -> dict[str, object]:
    result: dict[str, object] = json.loads((DATA / name).read_text(encoding="utf-8"))
    return result


def client(handler: Callable[[httpx.Request], httpx.Response], **kw: object) -> PrometheusClient:
    sleeps: list[float] = []
    c = PrometheusClient(
        "http://prom.test:9090/",
        transport=httpx.MockTransport(handler),
        sleep=sleeps.append,
        **kw,  # type: ignore[arg-type]
    )
    c.sleeps = sleeps  # type: ignore[attr-defined]
    return c


def test_tpot_query_scopes_to_the_service_pods() -> None:
    q = Queries(SCOPE, window="2m")
    assert q.tpot_p90() == (
        "histogram_quantile(0.9, sum by (le) (rate(specserve_request_tpot_seconds_bucket"
        '{namespace="team-a", specserve_io_service="chat"}[2m])))'
    )
    assert Queries(SCOPE, percentile=99.0).tpot_slo().startswith("histogram_quantile(0.99,")
    assert "specserve_request_ttft_seconds_bucket{" in q.ttft_slo()
    assert "specserve_draft_tokens_accepted_total" in q.acceptance_rate()
    assert "specserve_draft_tokens_verified_total" in q.acceptance_rate()
    assert q.request_rate().startswith("sum(rate(specserve_request_tpot_seconds_count{")
    assert "timestamp(specserve_policy_generation{" in q.sample_age()


def test_label_values_are_escaped_and_labels_configurable() -> None:
    s = Scope('n"s', "a\\b", namespace_label="kubernetes_namespace", service_label="svc")
    assert s.matchers() == 'kubernetes_namespace="n\\"s", svc="a\\\\b"'


def test_bad_window_is_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        Queries(SCOPE, window="2 minutes")


def test_vector_and_scalar_results() -> None:
    seen: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req.url.params["query"])
        return httpx.Response(200, json=body("tpot_p90.json"))

    with client(handler) as c:
        sample = c.scalar("q1")
        assert sample is not None and sample.value == pytest.approx(0.04125)
    assert seen == ["q1"]
    with client(lambda r: httpx.Response(200, json=body("scalar.json"))) as c:
        s = c.scalar("1")
        assert s is not None and s.value == 12.5


@pytest.mark.parametrize("name", ["quantile_nan.json", "empty_vector.json"])
def test_no_data_is_none(name: str) -> None:
    with client(lambda r: httpx.Response(200, json=body(name))) as c:
        assert c.scalar("q") is None


def test_bad_query_fails_at_once_with_prometheus_message() -> None:
    calls = 0

    def handler(req: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(400, json=body("bad_data_400.json"))

    with client(handler) as c, pytest.raises(PrometheusError, match=r"bad_data.*parse error"):
        c.scalar("up{")
    assert calls == 1


def test_gateway_errors_are_retried_with_backoff() -> None:
    replies = [httpx.Response(503, text="unavailable"), httpx.Response(502, text="bad gateway")]

    def handler(req: httpx.Request) -> httpx.Response:
        return replies.pop(0) if replies else httpx.Response(200, json=body("tpot_p90.json"))

    c = client(handler)
    sample = c.scalar("q")
    assert sample is not None
    assert c.sleeps == [0.2, 0.4]  # type: ignore[attr-defined]


def test_timeouts_exhaust_retries() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=req)

    c = client(handler, retry=RetryPolicy(attempts=3, backoff_s=0.1))
    with pytest.raises(PrometheusError, match=r"timeout .*after 3 attempts"):
        c.scalar("q")
    assert c.sleeps == [0.1, 0.2]  # type: ignore[attr-defined]


def test_connection_refused_is_a_prometheus_error() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=req)

    with client(handler) as c, pytest.raises(PrometheusError, match="cannot reach"):
        c.query("q")


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (httpx.Response(200, text="<html>proxy</html>"), "not JSON"),
        (httpx.Response(200, json=[1, 2]), "not a JSON object"),
        (httpx.Response(200, json={"status": "success"}), "no data"),
        (httpx.Response(200, json=body("matrix.json")), "resultType 'matrix'"),
        (
            httpx.Response(
                200, json={"status": "success", "data": {"resultType": "vector", "result": [{}]}}
            ),
            "malformed vector",
        ),
    ],
)
def test_malformed_responses(reply: httpx.Response, match: str) -> None:
    with client(lambda r: reply) as c, pytest.raises(PrometheusError, match=match):
        c.query("q")


def test_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="prometheus url"):
        PrometheusClient("prometheus:9090")


def _routes(overrides: dict[str, str] | None = None) -> Callable[[httpx.Request], httpx.Response]:
    """Answer each controller query with its recorded body (by a marker in the PromQL)."""
    table = {
        "time() -": "sample_age.json",
        "request_ttft_seconds_bucket": "ttft_p90.json",
        "histogram_quantile": "tpot_p90.json",
        "accepted_total": "acceptance.json",
        "spec_length_sum": "mean_draft_length.json",
        "tpot_seconds_count": "request_rate.json",
        "slo_infeasible": "infeasible_zero.json",
        "guard_refusals_total": "request_rate.json",
        "min(specserve_policy_generation": "policy_generation.json",
        "requests_running": "request_rate.json",
    }
    table.update(overrides or {})

    def handler(req: httpx.Request) -> httpx.Response:
        query = req.url.params["query"]
        for marker, name in table.items():
            if marker in query:
                return httpx.Response(200, json=body(name))
        return httpx.Response(400, json=body("bad_data_400.json"))

    return handler


def test_collect_builds_an_observation() -> None:
    with client(_routes()) as c:
        o = prom.collect(c, Queries(SCOPE))
    assert o.error is None
    assert o.tpot_ms == pytest.approx(41.25) and o.tpot_p90_ms == pytest.approx(41.25)
    assert o.request_rate == pytest.approx(3.2)
    assert o.acceptance_rate == pytest.approx(0.7125)
    assert o.mean_draft_length == pytest.approx(2.85)
    assert o.infeasible is False
    assert o.sample_age_s == pytest.approx(7.877)
    assert o.engine_policy_generation == 4
    assert o.ttft_ms == pytest.approx(312.5)
    assert o.guard_refusal_rate == pytest.approx(3.2)
    assert o.mean_running == pytest.approx(3.2)


def test_collect_without_series_is_missing_and_failures_are_errors() -> None:
    with client(_routes({"time() -": "empty_vector.json"})) as c:
        o = prom.collect(c, Queries(SCOPE))
    assert o == control.Observation()
    with client(_routes({"histogram_quantile": "quantile_nan.json"})) as c:
        o = prom.collect(c, Queries(SCOPE))
    assert o.tpot_ms is None and o.sample_age_s is not None
    reason = control.metrics_problem(o, control.ControllerConfig())
    assert reason is not None and reason[0] == control.METRICS_MISSING

    def down(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    with client(down) as c:
        o = prom.collect(c, Queries(SCOPE))
    assert o.error is not None and "cannot reach" in o.error
    assert o.error_reason == control.PROMETHEUS_ERROR
