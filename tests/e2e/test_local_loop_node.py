"""The local node agent against a real 1.20.2 control plane: Deployment pods run as local
processes on distinct loopback IPs behind real Endpoints, ConfigMap updates reach the running
process, a Job completes with its termination message, a deleted pod is stopped and replaced."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import config as k8s_config

from specserve.controlplane import default_assets_dir, missing_assets, running_control_plane
from specserve.kube import Kube
from specserve.localnode.agent import NodeAgent
from specserve.localnode.api import NodeApi
from specserve.localnode.stack import service_endpoints, wait_for

pytestmark = pytest.mark.e2e

NS = "default"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kube, NodeAgent]]:
    assets = default_assets_dir()
    if missing_assets(assets):
        pytest.skip(f"envtest binaries missing in {assets} (run `make envtest`)")
    with running_control_plane(assets) as cp:
        api_client = k8s_config.new_client_from_config(config_file=str(cp.kubeconfig))
        agent = NodeAgent(
            NodeApi(api_client),
            node_name="e2e-local-node",
            work_dir=tmp_path_factory.mktemp("localnode"),
            pod_network="127.0.20.0/24",
            backoff_base_s=0.5,
        )
        agent.start()
        try:
            yield Kube(api_client), agent
        finally:
            agent.stop()


def web_deployment(name: str, replicas: int, port: int) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [
                        {
                            "name": "web",
                            "image": "ignored:latest",
                            "command": [sys.executable, "-m", "http.server"],
                            "args": ["--bind", "0.0.0.0", "--directory", "/srv", str(port)],
                            "ports": [{"name": "http", "containerPort": port}],
                            "readinessProbe": {
                                "httpGet": {"path": "/page.txt", "port": "http"},
                                "periodSeconds": 1,
                            },
                            "volumeMounts": [{"name": "page", "mountPath": "/srv"}],
                        }
                    ],
                    "volumes": [{"name": "page", "configMap": {"name": f"{name}-page"}}],
                },
            },
        },
    }


def ready_pods(kube: Kube, app: str) -> list[dict[str, Any]]:
    pods = kube.request(
        "GET", f"/api/v1/namespaces/{NS}/pods", query={"labelSelector": f"app={app}"}
    )
    return [
        p
        for p in pods["items"]
        if not p["metadata"].get("deletionTimestamp")
        and any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p.get("status", {}).get("conditions") or []
        )
    ]


def test_deployment_pods_get_distinct_ips_endpoints_and_configmap_updates(
    cluster: tuple[Kube, NodeAgent],
) -> None:
    kube, _ = cluster
    cm_path = f"/api/v1/namespaces/{NS}/configmaps"
    kube.request("POST", cm_path, {"metadata": {"name": "web-page"}, "data": {"page.txt": "v1"}})
    kube.request(
        "POST",
        f"/api/v1/namespaces/{NS}/services",
        {
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 18080, "targetPort": "http"}]},
        },
    )
    kube.request(
        "POST", f"/apis/apps/v1/namespaces/{NS}/deployments", web_deployment("web", 2, 18080)
    )
    pods = wait_for("2 ready pods", lambda: (p := ready_pods(kube, "web")) and len(p) == 2 and p)
    ips = sorted(p["status"]["podIP"] for p in pods)
    assert len(set(ips)) == 2 and all(ip.startswith("127.0.20.") for ip in ips)

    # v1 Endpoints refuse loopback IPs (API validation), EndpointSlices accept them: the
    # Service's real endpoints are in its EndpointSlices.
    assert wait_for("endpoint slices", lambda: service_endpoints(kube, NS, "web") == ips and ips)
    for ip in ips:
        assert httpx.get(f"http://{ip}:18080/page.txt").text == "v1"

    kube.request(
        "PATCH",
        f"{cm_path}/web-page",
        {"data": {"page.txt": "v2"}},
        content_type="application/merge-patch+json",
    )

    def page(ip: str) -> str:
        return httpx.get(f"http://{ip}:18080/page.txt").text

    for ip in ips:
        wait_for(f"v2 on {ip}", lambda ip=ip: page(ip) == "v2", timeout=20)  # type: ignore[misc]

    # deleting a pod stops its process (SIGTERM) and the ReplicaSet replaces it
    victim = pods[0]["metadata"]["name"]
    victim_ip = pods[0]["status"]["podIP"]
    kube.request("DELETE", f"/api/v1/namespaces/{NS}/pods/{victim}")
    wait_for(
        "victim gone",
        lambda: kube.get("v1", "Pod", NS, victim) is None,
        timeout=30,
    )
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{victim_ip}:18080/page.txt", timeout=2)
    new = wait_for(
        "replacement ready",
        lambda: (
            (p := ready_pods(kube, "web"))
            and len(p) == 2
            and victim not in {x["metadata"]["name"] for x in p}
            and p
        ),
    )
    assert len({p["status"]["podIP"] for p in new}) == 2


def test_job_completes_with_termination_message(cluster: tuple[Kube, NodeAgent]) -> None:
    kube, _ = cluster
    script = "import sys; open(sys.argv[1], 'w').write('{\"profile\": \"ok\"}')"
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "probe-job", "namespace": NS},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "ignored",
                            "command": [sys.executable, "-c", script],
                            "args": ["/dev/termination-log"],
                            "terminationMessagePath": "/dev/termination-log",
                        }
                    ],
                }
            },
        },
    }
    kube.request("POST", f"/apis/batch/v1/namespaces/{NS}/jobs", job)

    def complete() -> bool:
        j = kube.get("batch/v1", "Job", NS, "probe-job") or {}
        return any(
            c["type"] == "Complete" and c["status"] == "True"
            for c in j.get("status", {}).get("conditions") or []
        )

    wait_for("job complete", complete)
    pods = kube.request(
        "GET", f"/api/v1/namespaces/{NS}/pods", query={"labelSelector": "job-name=probe-job"}
    )
    term = pods["items"][0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["message"] == '{"profile": "ok"}'


def test_node_is_registered_with_capacity_and_lease(cluster: tuple[Kube, NodeAgent]) -> None:
    kube, agent = cluster
    node = kube.request("GET", "/api/v1/nodes/e2e-local-node")
    ready = {c["type"]: c for c in node["status"]["conditions"]}["Ready"]
    assert ready["status"] == "True"
    assert node["status"]["allocatable"]["cpu"] == agent.cpu
    lease = kube.request(
        "GET", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/e2e-local-node"
    )
    assert lease["spec"]["holderIdentity"] == "e2e-local-node"
    assert Path(agent.work_dir).is_dir()
