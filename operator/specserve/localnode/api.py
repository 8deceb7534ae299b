"""The few API calls the agent makes, dict in / dict out, over the operator's thin client."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from specserve.kube import MERGE_PATCH, Kube, KubeError

Body = dict[str, Any]


def api_client_from_kubeconfig(path: str | None) -> k8s.ApiClient:
    """An ApiClient for the kubeconfig at `path` ($KUBECONFIG / ~/.kube/config when None)."""
    return k8s_config.new_client_from_config(config_file=path)


def _q(s: str) -> str:
    return quote(s, safe="")


class NodeApi:
    def __init__(self, api_client: k8s.ApiClient) -> None:
        self.kube = Kube(api_client, timeout_s=10.0)

    # ------------------------------------------------------------------ node + lease
    def ensure_node(self, node: Mapping[str, Any]) -> None:
        try:
            self.kube.request("POST", "/api/v1/nodes", dict(node))
        except KubeError as e:
            if e.status != 409:
                raise
            patch = {"metadata": {"labels": node["metadata"]["labels"]}}
            self.kube.request(
                "PATCH",
                f"/api/v1/nodes/{_q(node['metadata']['name'])}",
                patch,
                content_type=MERGE_PATCH,
            )

    def patch_node_status(self, name: str, status: Mapping[str, Any]) -> None:
        self.kube.request(
            "PATCH",
            f"/api/v1/nodes/{_q(name)}/status",
            {"status": dict(status)},
            content_type=MERGE_PATCH,
        )

    def renew_lease(self, lease: Mapping[str, Any]) -> None:
        ns = lease["metadata"]["namespace"]
        name = lease["metadata"]["name"]
        path = f"/apis/coordination.k8s.io/v1/namespaces/{_q(ns)}/leases"
        try:
            self.kube.request(
                "PATCH", f"{path}/{_q(name)}", {"spec": lease["spec"]}, content_type=MERGE_PATCH
            )
        except KubeError as e:
            if e.status != 404:
                raise
            self.kube.request("POST", path, dict(lease))

    # ------------------------------------------------------------------ pods
    def pods_on_node(self, node: str) -> list[Body]:
        out = self.kube.request(
            "GET", "/api/v1/pods", query={"fieldSelector": f"spec.nodeName={node}"}
        )
        items: list[Body] = out.get("items") or []
        return items

    def patch_pod_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.kube.request(
            "PATCH",
            f"/api/v1/namespaces/{_q(namespace)}/pods/{_q(name)}/status",
            {"status": dict(status)},
            content_type=MERGE_PATCH,
        )

    def finalize_pod(self, namespace: str, name: str, uid: str) -> None:
        """Delete with grace 0 (the kubelet's last step); a pod already gone is fine."""
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        try:
            self.kube.request("DELETE", f"/api/v1/namespaces/{_q(namespace)}/pods/{_q(name)}", body)
        except KubeError as e:
            if e.status not in (404, 409):
                raise

    def config_map(self, namespace: str, name: str) -> Body | None:
        try:
            return self.kube.request(
                "GET", f"/api/v1/namespaces/{_q(namespace)}/configmaps/{_q(name)}"
            )
        except KubeError as e:
            if e.status == 404:
                return None
            raise
