"""The whole loop on one machine with the weight-free engine backend (`--backend scripted`):
real control plane, local node agent, real Prometheus (chart rules loaded), the operator as a
child process and real engine server processes. Scenarios (issue 4): (a) Ready + the Service
answers, (b) SLO change → new policy generation reaches the engine without a restart,
(c) Prometheus outage → policy held, MetricsAvailable=False, recovery, (d) engine pod killed →
replaced, (e) operator restarted mid-rollout → no duplicates. The same scenarios with the real
model pair are in test_local_loop_models.py (marker slow)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from specserve.controlplane import default_assets_dir, missing_assets
from specserve.localnode.stack import LocalStack, service_endpoints, wait_for
from specserve.promlocal import find_binaries, find_helm

NS = "default"
CR_PATH = f"/apis/specserve.io/v1alpha1/namespaces/{NS}/specservices"
OPERATOR_ENV = {
    "SPECSERVE_TICK_SECONDS": "1",
    "SPECSERVE_CONTROL_INTERVAL_SECONDS": "2",
    "SPECSERVE_PROM_WINDOW": "20s",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    if missing_assets(default_assets_dir()):
        pytest.skip("Kubernetes 1.20.2 binaries missing (run `make envtest`)")
    if find_binaries() is None or find_helm() is None:
        pytest.skip("prometheus (specserve.promlocal.ensure_binaries) or helm missing")
    s = LocalStack(
        tmp_path_factory.mktemp("loop"), pod_network="127.0.50.0/24", scrape_interval="1s"
    )
    s.start(operator_env=OPERATOR_ENV)
    try:
        yield s
    finally:
        s.stop()


def specservice(name: str, slo_ms: float = 500.0, **engine: Any) -> dict[str, Any]:
    return {
        "apiVersion": "specserve.io/v1alpha1",
        "kind": "SpecService",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "targetModel": {"name": "scripted-target"},
            "draftModel": {"name": "scripted-draft"},
            "slo": {"tpotMs": slo_ms},
            "engine": {
                "backend": "torch",
                "gpus": 0,
                "extraArgs": ["--backend", "scripted"],
                **engine,
            },
            "profiling": {"enabled": False},
        },
    }


def status(stack: LocalStack, name: str) -> dict[str, Any]:
    got: dict[str, Any] = stack.kube.request("GET", f"{CR_PATH}/{name}").get("status") or {}
    return got


def condition(st: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c["type"] == ctype), {})


def ready(stack: LocalStack, name: str) -> dict[str, Any] | None:
    st = status(stack, name)
    return st if st.get("phase") == "Ready" else None


def engine_pods(stack: LocalStack, name: str) -> list[dict[str, Any]]:
    pods = stack.kube.request(
        "GET",
        f"/api/v1/namespaces/{NS}/pods",
        query={
            "labelSelector": f"specserve.io/service={name},app.kubernetes.io/name=specserve-engine"
        },
    )
    return [p for p in pods["items"] if not p["metadata"].get("deletionTimestamp")]


def engine_metric(ip: str, metric: str) -> float:
    for line in httpx.get(f"http://{ip}:8000/metrics", timeout=5).text.splitlines():
        if line.startswith(metric + " ") or line.startswith(metric + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{metric} not exported by {ip}")


def complete(ip: str, max_tokens: int = 12, model: str = "scripted") -> str:
    r = httpx.post(
        f"http://{ip}:8000/v1/completions",
        json={"model": model, "prompt": "def f():", "max_tokens": max_tokens},
        timeout=30,
    )
    r.raise_for_status()
    text: str = r.json()["choices"][0]["text"]
    return text


class Load:
    """Background requests through the Service's endpoints (round robin), `workers` in flight."""

    def __init__(
        self,
        stack: LocalStack,
        name: str,
        model: str = "scripted",
        workers: int = 1,
        max_tokens: int = 8,
    ) -> None:
        self.stack, self.name, self.model = stack, name, model
        self.max_tokens = max_tokens
        self.errors: list[str] = []
        self.sent = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                eps = service_endpoints(self.stack.kube, NS, self.name)
                if eps:
                    complete(eps[i % len(eps)], max_tokens=self.max_tokens, model=self.model)
                    self.sent += 1
                    i += 1
            except Exception as e:  # endpoints move during the scenarios; keep going
                self.errors.append(str(e))
            self._stop.wait(0.25)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


@pytest.fixture(scope="module")
def alpha(stack: LocalStack) -> str:
    stack.kube.request("POST", CR_PATH, specservice("alpha"))
    wait_for("alpha Ready", lambda: ready(stack, "alpha"), timeout=120)
    return "alpha"


def test_a_ready_and_service_answers(stack: LocalStack, alpha: str) -> None:
    st = status(stack, alpha)
    assert condition(st, "Available")["status"] == "True"
    pods = engine_pods(stack, alpha)
    assert len(pods) == 1
    eps = wait_for("endpoints", lambda: service_endpoints(stack.kube, NS, alpha))
    assert eps == [pods[0]["status"]["podIP"]]
    assert complete(eps[0])
    gen = st["policy"]["generation"]
    assert wait_for(
        "engine applied policy", lambda: engine_metric(eps[0], "specserve_policy_generation") == gen
    )


def test_b_slo_change_reaches_engine_without_restart(stack: LocalStack, alpha: str) -> None:
    before = status(stack, alpha)["policy"]
    pod = engine_pods(stack, alpha)[0]
    ip = pod["status"]["podIP"]
    t0 = time.monotonic()
    stack.kube.request(
        "PATCH",
        f"{CR_PATH}/{alpha}",
        {"spec": {"slo": {"tpotMs": 250}}},
        content_type="application/merge-patch+json",
    )
    new = wait_for(
        "new policy generation",
        lambda: (
            (p := status(stack, alpha).get("policy") or {}).get("generation", 0)
            > before["generation"]
            and p
        ),
        timeout=60,
    )
    assert new["tpotSloMs"] == 250 and new["tpotBudgetMs"] <= 250
    wait_for(
        "engine reports the new generation",
        lambda: engine_metric(ip, "specserve_policy_generation") == new["generation"],
        timeout=60,
    )
    reached_s = time.monotonic() - t0
    assert engine_metric(ip, "specserve_policy_tpot_slo_seconds") == pytest.approx(0.25)
    after = engine_pods(stack, alpha)
    assert [p["metadata"]["name"] for p in after] == [pod["metadata"]["name"]]
    assert after[0]["status"]["containerStatuses"][0]["restartCount"] == 0
    print(
        f"policy generation {before['generation']} -> {new['generation']}: "
        f"reached the engine in {reached_s:.1f}s"
    )


def test_c_prometheus_outage_holds_policy_and_recovers(stack: LocalStack, alpha: str) -> None:
    assert stack.prometheus is not None
    with Load(stack, alpha):
        wait_for(
            "MetricsAvailable=True",
            lambda: condition(status(stack, alpha), "MetricsAvailable").get("status") == "True",
            timeout=90,
        )
        held = status(stack, alpha)["policy"]
        stack.prometheus.stop()
        down = wait_for(
            "MetricsAvailable=False",
            lambda: (
                (c := condition(status(stack, alpha), "MetricsAvailable")).get("status") == "False"
                and c
            ),
            timeout=60,
        )
        assert down["reason"] == "PrometheusError", down
        # no flapping while it is down, and the policy is held
        for _ in range(8):
            st = status(stack, alpha)
            assert condition(st, "MetricsAvailable")["status"] == "False"
            assert st["policy"]["generation"] == held["generation"]
            time.sleep(1)
        stack.prometheus.start()
        wait_for(
            "MetricsAvailable=True again",
            lambda: condition(status(stack, alpha), "MetricsAvailable").get("status") == "True",
            timeout=90,
        )
    assert status(stack, alpha)["phase"] == "Ready"


def test_d_engine_pod_killed_is_replaced(stack: LocalStack, alpha: str) -> None:
    old = engine_pods(stack, alpha)[0]
    stack.kube.request("DELETE", f"/api/v1/namespaces/{NS}/pods/{old['metadata']['name']}")

    def replaced() -> list[dict[str, Any]] | None:
        pods = engine_pods(stack, alpha)
        ok = (
            len(pods) == 1
            and pods[0]["metadata"]["name"] != old["metadata"]["name"]
            and condition(pods[0]["status"], "Ready").get("status") == "True"
        )
        return pods if ok else None

    new = wait_for("replacement pod ready", replaced, timeout=90)
    eps = wait_for(
        "endpoints moved",
        lambda: (
            (e := service_endpoints(stack.kube, NS, alpha)) == [new[0]["status"]["podIP"]] and e
        ),
    )
    assert complete(eps[0])
    st = wait_for("Ready again", lambda: ready(stack, alpha), timeout=60)
    assert st["readyReplicas"] == 1


def test_e_operator_restart_mid_rollout_no_duplicates(stack: LocalStack) -> None:
    stack.kube.request("POST", CR_PATH, specservice("beta"))
    wait_for("beta Ready", lambda: ready(stack, "beta"), timeout=120)
    old_hash = status(stack, "beta")["specHash"]
    stack.kube.request(
        "PATCH",
        f"{CR_PATH}/beta",
        {"spec": {"engine": {"extraArgs": ["--backend", "scripted", "--max-batch", "4"]}}},
        content_type="application/merge-patch+json",
    )
    dep_path = f"/apis/apps/v1/namespaces/{NS}/deployments/beta-engine"
    wait_for(
        "rollout started",
        lambda: (
            stack.kube.request("GET", dep_path)["metadata"]
            .get("annotations", {})
            .get("specserve.io/spec-hash")
            != old_hash
        ),
        timeout=60,
        every=0.2,
    )
    stack.stop_operator()  # mid-rollout: the new pod is not Ready yet
    stack.start_operator()
    st = wait_for(
        "rolled out and Ready",
        lambda: (
            (s := ready(stack, "beta"))
            and s.get("specHash") != old_hash
            and len(engine_pods(stack, "beta")) == 1
            and s
        ),
        timeout=120,
    )
    owned = lambda kind_path: [  # noqa: E731
        o
        for o in stack.kube.request(
            "GET", kind_path, query={"labelSelector": "specserve.io/service=beta"}
        )["items"]
    ]
    assert len(owned(f"/apis/apps/v1/namespaces/{NS}/deployments")) == 1
    assert len(owned(f"/api/v1/namespaces/{NS}/services")) == 1
    cms = [c["metadata"]["name"] for c in owned(f"/api/v1/namespaces/{NS}/configmaps")]
    assert sorted(cms) == sorted(set(cms)) and "beta-policy" in cms
    gens = [h["generation"] for h in st.get("policyHistory") or []]
    assert len(gens) == len(set(gens))
