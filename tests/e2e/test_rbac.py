"""The chart's RBAC is least privilege: the ServiceAccount may do exactly what the operator does
(the lifecycle tests run the operator with this ServiceAccount's token) and nothing more."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_support import CHART, RELEASE, RELEASE_NS, SERVICE_ACCOUNT, Cluster, wait_for
from kubernetes import client

SA_USER = f"system:serviceaccount:{RELEASE_NS}:{SERVICE_ACCOUNT}"

# (apiGroup, resource, verb): what operator/specserve and kopf call, and nothing else.
EXPECTED = {
    *{("specserve.io", "specservices", v) for v in ("get", "list", "watch", "patch")},
    ("specserve.io", "specservices/status", "patch"),
    ("specserve.io", "specservices/scale", "patch"),
    ("batch", "jobs", "get"),
    ("batch", "jobs", "create"),
    ("", "pods", "list"),
    *{("apps", "deployments", v) for v in ("get", "create", "patch")},
    ("", "services", "get"),
    ("", "services", "create"),
    *{("", "configmaps", v) for v in ("get", "create", "patch")},
    ("", "events", "create"),
}
CLUSTER_ONLY = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}

DENIED = [
    ("delete", "specservices.specserve.io", ""),
    ("update", "specservices.specserve.io", ""),
    ("create", "specservices.specserve.io", ""),
    ("delete", "deployments.apps", ""),
    ("delete", "jobs.batch", ""),
    ("create", "pods", ""),
    ("delete", "pods", ""),
    ("get", "pods", "log"),
    ("create", "pods", "exec"),
    ("get", "secrets", ""),
    ("list", "secrets", ""),
    ("delete", "configmaps", ""),
    ("patch", "services", ""),
    ("create", "serviceaccounts", "token"),
    ("list", "nodes", ""),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", ""),
    ("impersonate", "serviceaccounts", ""),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", ""),
]


def can_i(cluster: Cluster, verb: str, resource: str, ns: str, user: str, sub: str = "") -> bool:
    args = ["auth", "can-i", verb, resource, "-n", ns]
    if sub:
        args.append(f"--subresource={sub}")
    res = cluster.kubectl(*args, as_user=user, check=False)
    answer = res.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl auth can-i: {res.stdout}{res.stderr}"
    return answer == "yes"


def _resource(group: str, resource: str) -> tuple[str, str]:
    plural, _, sub = resource.partition("/")
    return (f"{plural}.{group}" if group else plural), sub


def _granted(rules: list[dict[str, list[str]]]) -> set[tuple[str, str, str]]:
    out = set()
    for rule in rules:
        for g in rule.get("apiGroups") or []:
            for r in rule.get("resources") or []:
                for v in rule.get("verbs") or []:
                    out.add((g, r, v))
    return out


def test_cluster_role_grants_exactly_what_the_operator_uses(cluster: Cluster, chart: str) -> None:
    rbac: Any = client.RbacAuthorizationV1Api(cluster.api)
    role = rbac.read_cluster_role(f"{RELEASE}-operator")
    granted = _granted([cluster.api.sanitize_for_serialization(r) for r in role.rules])
    assert not any("*" in item for item in granted)
    assert granted == EXPECTED | CLUSTER_ONLY


def test_service_account_allowed_and_denied_verbs(
    cluster: Cluster, chart: str, namespace: str
) -> None:
    for group, resource, verb in sorted(EXPECTED):
        res, sub = _resource(group, resource)
        assert can_i(cluster, verb, res, namespace, SA_USER, sub), (verb, resource)
    for verb, res, sub in DENIED:
        assert not can_i(cluster, verb, res, namespace, SA_USER, sub), (verb, res, sub)


@pytest.fixture
def namespaced_release(cluster: Cluster, chart: str) -> Iterator[tuple[str, str, str]]:
    """A second release in namespaced mode watching one namespace (CRD already installed)."""
    suffix = secrets.token_hex(2)
    release, home, watched = f"specserve-ns-{suffix}", f"e2e-home-{suffix}", f"e2e-team-{suffix}"
    for ns in (home, watched):
        cluster.core.create_namespace({"metadata": {"name": ns}})
    cluster.helm("install", release, str(CHART), "--namespace", home, "--skip-crds",
                 "--set", "operator.enabled=false", "--set", "grafana.dashboard.enabled=false",
                 "--set", "rbac.scope=namespaced", "--set", f"rbac.watchNamespaces={{{watched}}}",
                 "--wait", "--timeout", "60s")  # fmt: skip
    yield release, home, watched
    cluster.helm("uninstall", release, "--namespace", home, check=False)
    for ns in (home, watched):
        cluster.core.delete_namespace(ns)


def test_namespaced_mode_grants_nothing_outside_the_watched_namespace(
    cluster: Cluster, namespaced_release: tuple[str, str, str], namespace: str
) -> None:
    release, home, watched = namespaced_release
    user = f"system:serviceaccount:{home}:{release}"
    wait_for(lambda: can_i(cluster, "create", "jobs.batch", watched, user), 10,
             "the RoleBinding to take effect")  # fmt: skip
    for group, resource, verb in sorted(EXPECTED):
        res, sub = _resource(group, resource)
        assert can_i(cluster, verb, res, watched, user, sub), (verb, resource)
        assert not can_i(cluster, verb, res, namespace, user, sub), (verb, resource, "elsewhere")
    assert not can_i(cluster, "list", "customresourcedefinitions.apiextensions.k8s.io", "default",
                     user)  # fmt: skip
    roles = cluster.kubectl("get", "clusterroles", "-o", "name").stdout
    assert release not in roles
