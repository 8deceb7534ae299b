"""A real Prometheus (Debian 2.42) discovering engine pods through kubernetes_sd against the
local 1.20.2 API server and scraping a real engine process (`adaspec serve --backend scripted`,
the weight-free backend) at its loopback pod IP; the chart's rules are loaded and evaluated."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from specserve import promlocal
from specserve.controlplane import default_assets_dir, missing_assets
from specserve.localnode.stack import CHART_DIR, LocalStack, wait_for

NS = "default"


def _need_prometheus() -> promlocal.PromBinaries:
    bins = promlocal.find_binaries()
    if bins is None:
        pytest.skip(
            "Prometheus not unpacked yet: "
            "python -c 'import specserve.promlocal as p; p.ensure_binaries()'"
        )
    return bins


def test_chart_rules_pass_promtool(tmp_path: Path) -> None:
    bins = _need_prometheus()
    if promlocal.find_helm() is None:
        pytest.skip("helm missing (scripts/k8s-tools.sh installs it)")
    groups = promlocal.chart_rule_groups(CHART_DIR)
    names = {r.get("record") or r.get("alert") for g in groups for r in g["rules"]}
    assert "specserve:tpot_seconds:p90" in names and "SpecServeSLOInfeasible" in names
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    assert "SUCCESS" in promlocal.promtool_check(bins.promtool, "rules", path)


def test_generated_scrape_config_passes_promtool(tmp_path: Path) -> None:
    bins = _need_prometheus()
    cfg = promlocal.prometheus_config(
        [promlocal.engine_scrape_config(http_sd_url="http://127.0.0.1:1/targets")]
    )
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert "SUCCESS" in promlocal.promtool_check(bins.promtool, "config", path)
    broken = dict(cfg, scrape_configs=[{"job_name": "x", "scrape_interval": "soon"}])
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(promlocal.PrometheusSetupError, match="promtool check config"):
        promlocal.promtool_check(bins.promtool, "config", path)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    _need_prometheus()
    if missing_assets(default_assets_dir()):
        pytest.skip("Kubernetes 1.20.2 binaries missing (run `make envtest`)")
    if promlocal.find_helm() is None:
        pytest.skip("helm missing (scripts/k8s-tools.sh installs it)")
    s = LocalStack(
        tmp_path_factory.mktemp("stack"), pod_network="127.0.30.0/24", scrape_interval="1s"
    )
    try:
        s.start_control_plane()
        s.start_node()
        s.start_prometheus()
        yield s
    finally:
        s.stop()


def engine_pod(name: str, service: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {
                "app.kubernetes.io/name": "specserve-engine",
                "specserve.io/service": service,
            },
        },
        "spec": {
            "containers": [
                {
                    "name": "engine",
                    "image": "specserve/engine:dev",
                    "command": ["adaspec"],
                    "args": [
                        "serve",
                        "--backend",
                        "scripted",
                        "--host",
                        "0.0.0.0",
                        "--port",
                        "8000",
                    ],
                    "ports": [{"name": "http", "containerPort": 8000}],
                    "readinessProbe": {
                        "httpGet": {"path": "/ready", "port": "http"},
                        "periodSeconds": 1,
                    },
                }
            ]
        },
    }


def test_prometheus_scrapes_engine_pod_through_kubernetes_sd(stack: LocalStack) -> None:
    assert stack.prometheus is not None
    prom = stack.prometheus
    stack.kube.request("POST", f"/api/v1/namespaces/{NS}/pods", engine_pod("eng-a", "svc-a"))
    # a pod without the engine label is not scraped
    other = engine_pod("other", "svc-a")
    other["metadata"]["labels"] = {"app": "other"}  # type: ignore[index]
    stack.kube.request("POST", f"/api/v1/namespaces/{NS}/pods", other)

    def pod_ip() -> str | None:
        p = stack.kube.get("v1", "Pod", NS, "eng-a") or {}
        ready = any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p.get("status", {}).get("conditions") or []
        )
        return p["status"]["podIP"] if ready else None

    ip = wait_for("engine pod ready", pod_ip, timeout=90)
    targets = wait_for(
        "target up",
        lambda: [t for t in prom.targets() if t["health"] == "up"],
        timeout=60,
    )
    assert [t["labels"]["instance"] for t in targets] == [f"{ip}:8000"]
    labels = targets[0]["labels"]
    assert labels["namespace"] == NS and labels["pod"] == "eng-a"
    assert labels["specserve_io_service"] == "svc-a" and labels["specservice"] == "svc-a"

    # real traffic through the engine's OpenAI API -> real TPOT histogram -> PromQL
    for _ in range(3):
        r = httpx.post(
            f"http://{ip}:8000/v1/completions",
            json={"model": "scripted", "prompt": "hi", "max_tokens": 16},
            timeout=30,
        )
        assert r.status_code == 200, r.text
    q = (
        "histogram_quantile(0.9, sum by (le) (rate("
        'specserve_request_tpot_seconds_bucket{specserve_io_service="svc-a"}[30s])))'
    )
    wait_for("p90 TPOT", lambda: prom.query(q), timeout=30)
    count = wait_for(
        "3 requests scraped",
        lambda: [
            r
            for r in prom.query('specserve_request_tpot_seconds_count{pod="eng-a"}')
            if float(r["value"][1]) >= 3
        ],
        timeout=30,
    )
    assert count[0]["metric"]["namespace"] == NS
    # the chart's recording rules run on the scraped series
    replicas = wait_for(
        "recording rule",
        lambda: prom.query('specserve:engine_replicas:count{specserve_io_service="svc-a"}'),
        timeout=30,
    )
    assert float(replicas[0]["value"][1]) == 1.0
    assert sys.executable  # the engine ran from this environment (resolved through the venv)


def test_pod_targets_carry_kubernetes_sd_meta_labels() -> None:
    pod = engine_pod("eng-x", "svc-x")
    pod["status"] = {
        "podIP": "127.0.10.4",
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    pending = {**engine_pod("eng-y", "svc-x"), "status": {"phase": "Pending"}}
    groups = promlocal.pod_targets([pod, pending])
    assert len(groups) == 1 and groups[0]["targets"] == ["127.0.10.4:8000"]
    labels = groups[0]["labels"]
    assert labels["__meta_kubernetes_pod_label_specserve_io_service"] == "svc-x"
    assert labels["__meta_kubernetes_pod_container_port_name"] == "http"
    assert labels["__meta_kubernetes_pod_ready"] == "true"
    assert labels["__meta_kubernetes_namespace"] == NS
