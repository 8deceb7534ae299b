"""CLI dispatch, operator settings from the environment, kopf wiring, and the dict-level
Kubernetes client against a small local HTTP server that speaks the API's status codes."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from kubernetes import client as k8s

from specserve import cli, kube, settings


def test_cli_help_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "operator" in out and "crd" in out
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_operator_arguments_parse() -> None:
    import argparse

    from specserve import operator

    p = argparse.ArgumentParser()
    operator.add_arguments(p)
    a = p.parse_args(["-n", "a", "-n", "b", "--liveness", "http://0.0.0.0:8080/healthz"])
    assert a.namespace == ["a", "b"] and not a.all_namespaces
    with pytest.raises(SystemExit):
        p.parse_args(["-n", "a", "--all-namespaces"])


def test_settings_from_env() -> None:
    s = settings.from_env(
        {
            "SPECSERVE_PROMETHEUS_URL": "http://prom:9090",
            "SPECSERVE_TICK_SECONDS": "1",
            "SPECSERVE_CONTROLLER": '{"tighten_dwell_s": 10}',
        }
    )
    assert s.prometheus_url == "http://prom:9090" and s.tick_s == 1.0
    assert s.controller.tighten_dwell_s == 10
    assert settings.from_env({}).prometheus_url is None


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"SPECSERVE_PROMETHEUS_URL": "prom:9090"}, "SPECSERVE_PROMETHEUS_URL"),
        ({"SPECSERVE_TICK_SECONDS": "soon"}, "SPECSERVE_TICK_SECONDS"),
        ({"SPECSERVE_CONTROL_INTERVAL_SECONDS": "0"}, "SPECSERVE_CONTROL_INTERVAL_SECONDS"),
        ({"SPECSERVE_PROM_WINDOW": "2 min"}, "SPECSERVE_PROM_WINDOW"),
        ({"SPECSERVE_CONTROLLER": "{"}, "SPECSERVE_CONTROLLER"),
        ({"SPECSERVE_CONTROLLER": '{"gain": 2}'}, "SPECSERVE_CONTROLLER: unknown field"),
        ({"SPECSERVE_CONTROLLER": '{"band_low": 0.99}'}, "SPECSERVE_CONTROLLER"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(settings.SettingsError, match=name):
        settings.from_env(env)


def test_handlers_register_and_back_off_exponentially() -> None:
    import kopf

    from specserve import handlers

    assert [handlers.backoff_delay(i) for i in range(4)] == [2.0, 4.0, 8.0, 16.0]
    assert handlers.backoff_delay(30) == 300.0
    registry = kopf.get_default_registry()
    ids = {h.id for h in registry._changing.get_all_handlers()}
    assert "reconcile" in ids and "deleted" in ids
    timers = {h.id for h in registry._spawning.get_all_handlers()}
    assert "tick" in timers


# ----------------------------------------------------------------------------- Kube


class _Api(BaseHTTPRequestHandler):
    objects: ClassVar[dict[str, dict[str, Any]]] = {}
    log: ClassVar[list[tuple[str, str, str]]] = []

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.log.append(("GET", self.path, ""))
        if self.path.startswith("/apis/monitoring.coreos.com/v1"):
            self._send(200, {"resources": [{"kind": "PodMonitor"}]})
        elif self.path in self.objects:
            self._send(200, self.objects[self.path])
        elif "?labelSelector=" in self.path:
            self._send(200, {"items": list(self.objects.values())})
        else:
            self._send(404, {"kind": "Status", "message": f"{self.path} not found"})

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        obj = json.loads(self.rfile.read(length))
        path = f"{self.path}/{obj['metadata']['name']}"
        self.log.append(("POST", self.path, self.headers["Content-Type"]))
        if obj["metadata"]["name"] == "racer":  # someone else created it between GET and POST
            self.objects[path] = obj
            self._send(409, {"kind": "Status", "message": "already exists", "code": 409})
            return
        self.objects[path] = obj
        self._send(201, obj)

    def do_PATCH(self) -> None:
        length = int(self.headers["Content-Length"])
        patch = json.loads(self.rfile.read(length))
        self.log.append(("PATCH", self.path, self.headers["Content-Type"]))
        if self.path.endswith("/forbidden"):
            self._send(403, {"kind": "Status", "message": "RBAC says no", "code": 403})
            return
        self._send(200, patch)


@pytest.fixture
def api() -> Iterator[kube.Kube]:
    _Api.objects, _Api.log = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    conf = k8s.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield kube.Kube(k8s.ApiClient(conf), timeout_s=5)
    finally:
        server.shutdown()
        server.server_close()


def cm(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "ns"}, "data": {"k": "v"}}  # fmt: skip


def test_kube_ensure_looks_up_then_creates_then_finds(api: kube.Kube) -> None:
    obj, created = api.ensure(cm("a"))
    assert created and obj["data"] == {"k": "v"}
    obj, created = api.ensure(cm("a"))
    assert not created
    assert [m for m, _, _ in _Api.log] == ["GET", "POST", "GET"]
    assert _Api.log[1][1] == "/api/v1/namespaces/ns/configmaps"


def test_kube_ensure_409_returns_the_winner(api: kube.Kube) -> None:
    obj, created = api.ensure(cm("racer"))
    assert not created and obj["metadata"]["name"] == "racer"
    assert [m for m, _, _ in _Api.log] == ["GET", "POST", "GET"]


def test_kube_errors_carry_status_and_message(api: kube.Kube) -> None:
    assert api.get("apps/v1", "Deployment", "ns", "missing") is None
    with pytest.raises(kube.KubeError) as err:
        api.patch("v1", "ConfigMap", "ns", "forbidden", {"data": {}})
    assert err.value.status == 403 and "RBAC says no" in str(err.value)


def test_kube_scale_and_discovery(api: kube.Kube) -> None:
    api.scale("ns", "chat", 3)
    method, path, ctype = _Api.log[-1]
    assert (method, ctype) == ("PATCH", "application/merge-patch+json")
    assert path == "/apis/specserve.io/v1alpha1/namespaces/ns/specservices/chat/scale"
    assert api.has_api("monitoring.coreos.com/v1", "PodMonitor")
    assert api.list("v1", "Pod", "ns", "job-name=x") == []
