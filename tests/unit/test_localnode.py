"""Local node agent: the pure parts (paths, env, probes, status, volumes, addresses) and one
PodWorker run with real local processes against an in-memory API (the real API server is in
tests/e2e)."""

from __future__ import annotations

import http.server
import json
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from specserve import resources
from specserve.api import SpecServiceSpec
from specserve.localnode import volumes
from specserve.localnode.addresses import AddressPool
from specserve.localnode.env import (
    UnsupportedPodError,
    bind_to_pod_ip,
    command_line,
    expand,
    resolve_env,
)
from specserve.localnode.node import lease_object, node_status
from specserve.localnode.paths import PATH_MAP_ENV, PathMap
from specserve.localnode.podrun import PodWorker, prepare_container, volume_dirs
from specserve.localnode.probes import ProbeSpec, ProbeTracker, http_check, parse_probe
from specserve.localnode.process import LocalProcess
from specserve.localnode.status import (
    ContainerView,
    State,
    pod_phase,
    pod_status,
    termination_message,
)

# ----------------------------------------------------------------------------- paths


def test_path_map_rewrites_mount_prefixes_on_path_boundaries() -> None:
    pm = PathMap.of({"/etc/specserve/policy": "/h/policy", "/tmp": "/h/tmp", "/": "/h/root"})
    assert pm.map_path("/etc/specserve/policy/policy.json") == "/h/policy/policy.json"
    assert pm.map_path("/etc/specserve/policy") == "/h/policy"
    assert pm.map_path("/tmp") == "/h/tmp"
    # a sibling with the same prefix is not inside the mount: the root mount covers it
    assert pm.map_path("/etc/specserve/policyx") == "/h/root/etc/specserve/policyx"
    assert pm.rewrite("--out=/tmp/p.json") == "--out=/h/tmp/p.json"
    assert pm.rewrite("relative/tmp") == "relative/tmp"
    assert json.loads(pm.to_env())["/tmp"] == "/h/tmp"


def test_path_map_without_root_leaves_other_paths() -> None:
    pm = PathMap.of({"/tmp/": "/h/tmp"})
    assert pm.map_path("/tmpfoo/x") == "/tmpfoo/x"
    assert pm.map_path("/tmp/") == "/h/tmp/"
    with pytest.raises(ValueError, match="mountPath"):
        PathMap.of({"tmp": "/x"})


# ----------------------------------------------------------------------------- env

POD: dict[str, Any] = {
    "metadata": {
        "name": "p-1",
        "namespace": "ns",
        "uid": "u-1",
        "labels": {"app": "eng"},
        "annotations": {"a/b": "c"},
    },
    "spec": {"nodeName": "n1"},
}


def test_downward_api_and_expansion() -> None:
    container = {
        "name": "c",
        "env": [
            {"name": "A", "value": "x"},
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "AB", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['a/b']"}}},
            {"name": "CM", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}},
            {"name": "B", "value": "$(A)-$(NAME)-$$(A)-$(MISSING)"},
        ],
    }
    env = resolve_env(POD, container, "127.0.10.7", {"cm": {"k": "v"}})
    assert env == {
        "A": "x",
        "NAME": "p-1",
        "NS": "ns",
        "IP": "127.0.10.7",
        "NODE": "n1",
        "APP": "eng",
        "AB": "c",
        "CM": "v",
        "B": "x-p-1-$(A)-$(MISSING)",
    }
    assert expand("$(IP):8000", env) == "127.0.10.7:8000"


def test_unsupported_env_sources_name_the_field() -> None:
    secret = {"name": "c", "env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": "s"}}}]}
    with pytest.raises(UnsupportedPodError, match=r"env\[0\] \(S\).*secretKeyRef"):
        resolve_env(POD, secret, "127.0.10.2")
    bad_field = {
        "name": "c",
        "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.phase"}}}],
    }
    with pytest.raises(UnsupportedPodError, match=r"status\.phase"):
        resolve_env(POD, bad_field, "127.0.10.2")
    missing_cm = {
        "name": "c",
        "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}}],
    }
    with pytest.raises(UnsupportedPodError, match="cm/k not found"):
        resolve_env(POD, missing_cm, "127.0.10.2", {})
    with pytest.raises(UnsupportedPodError, match="command: required"):
        command_line({"name": "c", "args": ["x"]}, {})


def test_bind_to_pod_ip_replaces_only_wildcards() -> None:
    assert bind_to_pod_ip(["serve", "--host", "0.0.0.0", "--port", "8000"], "127.0.10.3") == [
        "serve",
        "--host",
        "127.0.10.3",
        "--port",
        "8000",
    ]
    assert bind_to_pod_ip(["--host=::"], "127.0.10.3") == ["--host=127.0.10.3"]
    assert bind_to_pod_ip(["--host", "127.0.0.5"], "127.0.10.3") == ["--host", "127.0.0.5"]


def _owner() -> dict[str, Any]:
    return {"metadata": {"name": "demo", "namespace": "ns", "uid": "uid-1"}}


def _spec(**over: Any) -> SpecServiceSpec:
    raw: dict[str, Any] = {
        "targetModel": {"name": "qwen2.5-coder-1.5b-instruct"},
        "draftModel": {"name": "qwen2.5-coder-0.5b-instruct"},
        "slo": {"tpotMs": 400},
        "engine": {"backend": "torch", "gpus": 0},
        **over,
    }
    return SpecServiceSpec.model_validate(raw)


def test_operator_engine_pod_is_rewritten_for_a_local_process(tmp_path: Path) -> None:
    """The operator's real Deployment template: paths, host and downward API all resolved."""
    dep = resources.engine_deployment(_owner(), _spec(), "digest")
    pod = {
        "metadata": {"name": "demo-engine-abc", "namespace": "ns", "uid": "u-2"},
        "spec": {**dep["spec"]["template"]["spec"], "nodeName": "local-node"},
    }
    vols = volume_dirs(pod, tmp_path)
    prepared = prepare_container(
        pod, pod["spec"]["containers"][0], "127.0.10.9", vols, tmp_path, {"PATH": "/bin"}, {}
    )
    argv = prepared.argv
    assert argv[0] == "adaspec" and argv[1] == "serve"
    assert argv[argv.index("--host") + 1] == "127.0.10.9"
    assert argv[argv.index("--policy-file") + 1] == str(vols["policy"] / "policy.json")
    assert argv[argv.index("--profile-file") + 1] == str(vols["profile"] / "profile.json")
    assert prepared.env["HOME"] == str(vols["tmp"])
    assert prepared.env["POD_NAME"] == "demo-engine-abc"
    assert prepared.env["POD_NAMESPACE"] == "ns"
    assert prepared.env["PATH"] == "/bin"
    assert json.loads(prepared.env[PATH_MAP_ENV])["/etc/specserve/policy"] == str(vols["policy"])
    assert prepared.probes["readiness"].port == 8000  # the named port "http"
    assert prepared.probes["readiness"].path == "/ready"


def test_operator_profiling_job_maps_the_termination_log(tmp_path: Path) -> None:
    job = resources.profiling_job(_owner(), _spec())
    pod = {
        "metadata": {"name": "demo-profile-x", "namespace": "ns", "uid": "u-3"},
        "spec": job["spec"]["template"]["spec"],
    }
    vols = volume_dirs(pod, tmp_path)
    prepared = prepare_container(
        pod, pod["spec"]["containers"][0], "127.0.10.4", vols, tmp_path, {}, {}
    )
    argv = prepared.argv
    assert argv[argv.index("--termination-log") + 1] == str(prepared.termination_file)
    assert argv[argv.index("--out") + 1] == str(vols["tmp"] / "profile.json")
    assert prepared.termination_policy == "FallbackToLogsOnError"


def test_unsupported_volume_is_refused(tmp_path: Path) -> None:
    pod = {"spec": {"volumes": [{"name": "s", "secret": {"secretName": "x"}}]}}
    with pytest.raises(UnsupportedPodError, match=r"volumes\[s\]: secret"):
        volume_dirs(pod, tmp_path)


# ----------------------------------------------------------------------------- probes


def test_probe_parsing_and_thresholds() -> None:
    c = {
        "name": "c",
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 2,
            "initialDelaySeconds": 1,
        },
        "livenessProbe": {"exec": {"command": ["true"]}},
    }
    spec = parse_probe(c, "readiness")
    assert spec is not None and spec.port == 8000 and spec.url("127.0.10.2").endswith(":8000/ready")
    assert parse_probe(c, "startup") is None
    with pytest.raises(UnsupportedPodError, match=r"only httpGet.*exec"):
        parse_probe(c, "liveness")
    t = ProbeTracker(spec=spec, started_at=100.0)
    assert not t.due(100.5)  # initial delay
    assert t.due(101.0)
    assert t.record(101.0, True) and t.healthy
    assert not t.due(105.0) and t.due(106.0)
    assert not t.record(106.0, False, "boom")  # one failure is below the threshold
    assert t.healthy and t.last_error == "boom"
    assert t.record(111.0, False) and not t.healthy and t.failed_out
    with pytest.raises(UnsupportedPodError, match="'web'"):
        parse_probe({"name": "c", "readinessProbe": {"httpGet": {"port": "web"}}}, "readiness")


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/ok" else 503)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_http_check_against_a_real_server(http_server: int) -> None:
    ok = ProbeSpec(kind="readiness", path="/ok", port=http_server)
    bad = ProbeSpec(kind="readiness", path="/no", port=http_server)
    assert http_check(ok, "127.0.0.1") == (True, "")
    assert http_check(bad, "127.0.0.1") == (False, "HTTP probe failed with statuscode: 503")
    closed = ProbeSpec(kind="readiness", path="/", port=1, timeout_s=0.5)
    passed, err = http_check(closed, "127.0.0.1")
    assert not passed and "ConnectError" in err


# ----------------------------------------------------------------------------- status


def _view(state: State, code: int | None = None, restarts: int = 0) -> ContainerView:
    return ContainerView(
        name="c",
        image="i",
        state=state,
        exit_code=code,
        restart_count=restarts,
    )


@pytest.mark.parametrize(
    ("policy", "views", "phase"),
    [
        ("Never", [_view("waiting")], "Pending"),
        ("Never", [_view("running")], "Running"),
        ("Never", [_view("terminated", 0)], "Succeeded"),
        ("Never", [_view("terminated", 3)], "Failed"),
        ("OnFailure", [_view("terminated", 0)], "Succeeded"),
        ("OnFailure", [_view("terminated", 1)], "Running"),
        ("Always", [_view("terminated", 0)], "Running"),
        ("Always", [_view("waiting", restarts=2)], "Running"),
        ("Never", [_view("terminated", 0), _view("running")], "Running"),
    ],
)
def test_pod_phase(policy: str, views: list[ContainerView], phase: str) -> None:
    assert pod_phase(policy, views) == phase


def test_termination_message_prefers_the_file_then_logs_on_error() -> None:
    assert termination_message('{"ok":1}', "log", "FallbackToLogsOnError", 1) == '{"ok":1}'
    logs = "\n".join(f"line {i}" for i in range(200))
    msg = termination_message("", logs, "FallbackToLogsOnError", 2)
    assert msg.endswith("line 199") and "line 119" not in msg
    assert termination_message("", logs, "File", 2) == ""
    assert termination_message(None, logs, "FallbackToLogsOnError", 0) == ""
    assert len(termination_message("x" * 10000, "", "File", 0)) == 4096


def test_pod_status_ready_and_transition_times() -> None:
    running = ContainerView(name="c", image="i", state="running", started_at=10.0, pid=42)
    first = pod_status(
        restart_policy="Always", containers=[running], pod_ip="127.0.10.2", start_time=5.0, now=20.0
    )
    ready = {c["type"]: c for c in first["conditions"]}["Ready"]
    assert first["phase"] == "Running" and first["podIP"] == "127.0.10.2"
    assert ready["status"] == "False" and ready["reason"] == "ContainersNotReady"
    assert first["containerStatuses"][0]["state"]["running"]["startedAt"] == "1970-01-01T00:00:10Z"
    running.ready = True
    second = pod_status(
        restart_policy="Always",
        containers=[running],
        pod_ip="127.0.10.2",
        start_time=5.0,
        now=30.0,
        previous=first,
    )
    conds = {c["type"]: c for c in second["conditions"]}
    assert conds["Ready"]["status"] == "True"
    assert conds["Ready"]["lastTransitionTime"] == "1970-01-01T00:00:30Z"
    assert conds["Initialized"]["lastTransitionTime"] == "1970-01-01T00:00:20Z"  # unchanged


def test_node_documents() -> None:
    st = node_status(name="n", cpu="2", memory="8Gi", gpus=2, pods=10, now=60.0, since=0.0)
    assert st["capacity"]["nvidia.com/gpu"] == "2" and st["allocatable"]["cpu"] == "2"
    ready = {c["type"]: c for c in st["conditions"]}["Ready"]
    assert ready["status"] == "True" and ready["lastHeartbeatTime"] == "1970-01-01T00:01:00Z"
    assert (
        "nvidia.com/gpu"
        not in node_status(name="n", cpu="2", memory="8Gi", gpus=0, pods=10, now=0.0, since=0.0)[
            "capacity"
        ]
    )
    assert lease_object("n", 1.5)["spec"]["renewTime"] == "1970-01-01T00:00:01.500000Z"


# ----------------------------------------------------------------------------- volumes


def test_configmap_volume_is_swapped_atomically(tmp_path: Path) -> None:
    d = tmp_path / "policy"
    assert volumes.write_atomic_dir(d, {"policy.json": '{"generation": 1}', "other": "o"})
    first_target = (d / "..data").resolve()
    assert (d / "policy.json").read_text() == '{"generation": 1}'
    assert (d / "policy.json").is_symlink()
    assert not volumes.write_atomic_dir(d, {"policy.json": '{"generation": 1}', "other": "o"})
    assert volumes.write_atomic_dir(d, {"policy.json": '{"generation": 2}'})
    assert (d / "policy.json").read_text() == '{"generation": 2}'
    assert not (d / "other").exists() and not first_target.exists()
    hidden = sorted(p.name for p in d.iterdir() if p.name.startswith(".."))
    assert len(hidden) == 2 and "..data" in hidden  # the link and one payload dir


def test_configmap_items_and_bad_paths() -> None:
    vol = {"name": "v", "configMap": {"name": "cm", "items": [{"key": "a", "path": "x/a.json"}]}}
    assert volumes.configmap_files(vol, {"a": "1", "b": "2"}) == {"x/a.json": "1"}
    with pytest.raises(UnsupportedPodError, match="key 'a' not in ConfigMap cm"):
        volumes.configmap_files(vol, {"b": "2"})
    with pytest.raises(UnsupportedPodError, match=r"without '\.\.'"):
        volumes.write_atomic_dir(Path("/nonexistent-unused"), {"../x": "1"})


# ----------------------------------------------------------------------------- addresses


def test_address_pool_gives_distinct_loopback_addresses() -> None:
    taken = {"127.0.10.1"}
    pool = AddressPool("127.0.10.0/29", probe_free=lambda ip, ports: ip not in taken)
    a = pool.allocate("a", [8000])
    b = pool.allocate("b", [8000])
    assert a != b and a != "127.0.10.1" and pool.allocate("a") == a
    pool.release("a")
    assert pool.allocate("c") == a
    with pytest.raises(ValueError, match=r"127\.0\.0\.0/8"):
        AddressPool("10.0.0.0/24")


# ----------------------------------------------------------------------------- processes


def test_local_process_exit_codes_and_grace(tmp_path: Path) -> None:
    p = LocalProcess(
        [sys.executable, "-c", "print('hi'); raise SystemExit(3)"], {}, tmp_path, tmp_path / "a.log"
    )
    deadline = time.time() + 10
    while p.exit_code() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.exit_code() == 3 and "hi" in p.log_tail()
    trap = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    q = LocalProcess([sys.executable, "-c", trap], {}, tmp_path, tmp_path / "b.log")
    while "up" not in q.log_tail() and time.time() < deadline:
        time.sleep(0.05)
    t0 = time.time()
    assert q.stop(0.5) == 137  # SIGTERM ignored -> SIGKILL after the grace period
    assert 0.4 < time.time() - t0 < 5


# ----------------------------------------------------------------------------- worker


class FakeApi:
    """In-memory stand-in for the three calls a PodWorker makes."""

    def __init__(self, config_maps: dict[str, dict[str, Any]]) -> None:
        self.cms = config_maps
        self.statuses: list[dict[str, Any]] = []
        self.finalized: list[str] = []

    def patch_pod_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.statuses.append(json.loads(json.dumps(status)))

    def finalize_pod(self, namespace: str, name: str, uid: str) -> None:
        self.finalized.append(name)

    def config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.cms.get(name)


def _wait(pred: Any, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_job_pod_completes_with_its_termination_message(tmp_path: Path) -> None:
    script = "import sys; open(sys.argv[1], 'w').write('{\"done\": true}')"
    pod = {
        "metadata": {"name": "job-1", "namespace": "ns", "uid": "uid-job-1"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "command": [sys.executable],
                    "args": ["-c", script, "/dev/termination-log"],
                    "terminationMessagePath": "/dev/termination-log",
                }
            ],
        },
    }
    api = FakeApi({})
    w = PodWorker(api, pod, AddressPool("127.0.11.0/28"), tmp_path, {}, tick_s=0.05)
    w.start()
    _wait(lambda: api.statuses and api.statuses[-1]["phase"] == "Succeeded")
    term = api.statuses[-1]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    assert json.loads(term["message"]) == {"done": True}
    w.request_stop(1.0)
    w.join(10)
    assert api.finalized == ["job-1"]


def test_serving_pod_gets_ready_sees_configmap_updates_and_stops(tmp_path: Path) -> None:
    pod = {
        "metadata": {"name": "web-1", "namespace": "ns", "uid": "uid-web-1"},
        "spec": {
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 5,
            "volumes": [{"name": "policy", "configMap": {"name": "pol"}}],
            "containers": [
                {
                    "name": "web",
                    "command": [sys.executable, "-m", "http.server"],
                    "args": ["--bind", "0.0.0.0", "--directory", "/etc/pol", "18731"],
                    "ports": [{"name": "http", "containerPort": 18731}],
                    "readinessProbe": {
                        "httpGet": {"path": "/policy.json", "port": "http"},
                        "periodSeconds": 1,
                    },
                    "volumeMounts": [{"name": "policy", "mountPath": "/etc/pol"}],
                }
            ],
        },
    }
    cms: dict[str, dict[str, Any]] = {
        "pol": {"metadata": {"resourceVersion": "1"}, "data": {"policy.json": '{"g": 1}'}}
    }
    api = FakeApi(cms)
    w = PodWorker(
        api, pod, AddressPool("127.0.12.0/28"), tmp_path, {}, tick_s=0.1, configmap_refresh_s=0.2
    )
    w.start()
    try:
        _wait(lambda: api.statuses and api.statuses[-1]["conditions"][1]["status"] == "True")
        ip = api.statuses[-1]["podIP"]
        assert ip.startswith("127.0.12.")
        import httpx

        assert httpx.get(f"http://{ip}:18731/policy.json").json() == {"g": 1}
        cms["pol"] = {"metadata": {"resourceVersion": "2"}, "data": {"policy.json": '{"g": 2}'}}
        _wait(lambda: httpx.get(f"http://{ip}:18731/policy.json").json() == {"g": 2}, 10)
    finally:
        w.request_stop(5.0)
        w.join(15)
    assert api.finalized == ["web-1"]
    last = api.statuses[-1]["containerStatuses"][0]["state"]
    assert "terminated" in last  # http.server exits on SIGTERM


def test_pods_starting_together_never_share_an_address() -> None:
    """Pods start on their own threads; a probe that yields (a real socket bind does) must not
    let two of them take the same address."""
    import threading
    import time as _time

    def slow_probe(ip: str, ports: list[int]) -> bool:
        _time.sleep(0.01)  # let the other threads run between the probe and the record
        return True

    pool = AddressPool("127.0.10.0/28", probe_free=slow_probe)
    got: list[str] = []
    start = threading.Barrier(6)

    def take(uid: str) -> None:
        start.wait()
        got.append(pool.allocate(uid, [8080]))

    threads = [threading.Thread(target=take, args=(f"pod-{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 6 and len(set(got)) == 6, got
