"""A thin, dict-in/dict-out Kubernetes client for the few kinds the operator touches.

It reuses the official client's configuration and transport (kubeconfig or in-cluster
service account, TLS, auth) but not its generated models: the builders in
`specserve.resources` produce plain dicts, and this layer posts them as they are.
Errors surface as `KubeError` with the HTTP status, so callers can treat 404/409 precisely.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from specserve import api

Body = dict[str, Any]
log = logging.getLogger("specserve")

# (apiVersion, kind) -> plural; "" group means the core API (/api/v1).
_PLURALS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("v1", "Event"): "events",
    ("apps/v1", "Deployment"): "deployments",
    ("batch/v1", "Job"): "jobs",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitors",
    (f"{api.GROUP}/{api.VERSION}", api.KIND): api.PLURAL,
}

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"


class KubeError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def load_config() -> None:
    """In-cluster service account when running in a pod, else $KUBECONFIG/~/.kube/config."""
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    if not k8s.Configuration.get_default_copy().verify_ssl:
        # Say it once, instead of urllib3 warning on every request.
        log.warning("TLS verification of the API server is off (insecure-skip-tls-verify)")
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    plural = _PLURALS[(api_version, kind)]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{quote(namespace, safe='')}/{plural}"


def object_path(api_version: str, kind: str, namespace: str, name: str) -> str:
    return f"{collection_path(api_version, kind, namespace)}/{quote(name, safe='')}"


class Kube:
    def __init__(self, api_client: k8s.ApiClient | None = None, timeout_s: float = 15.0) -> None:
        self._api = api_client or k8s.ApiClient()
        self._timeout = (min(timeout_s, 5.0), timeout_s)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Body:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        req = self._api.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self._api.call_api(*req, _request_timeout=self._timeout)
        raw = resp.read()
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw or "")
        if not 200 <= resp.status < 300:
            message = text
            with contextlib.suppress(ValueError, AttributeError):
                message = json.loads(text).get("message", text)
            raise KubeError(resp.status, message)
        if not text:
            return {}
        result: Body = json.loads(text)
        return result

    # -------------------------------------------------------------- objects

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Body | None:
        try:
            return self.request("GET", object_path(api_version, kind, namespace, name))
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def create(self, obj: Mapping[str, Any]) -> Body:
        meta = obj["metadata"]
        return self.request(
            "POST", collection_path(obj["apiVersion"], obj["kind"], meta["namespace"]), dict(obj)
        )

    def ensure(self, obj: Mapping[str, Any]) -> tuple[Body, bool]:
        """Look up, else create; a 409 AlreadyExists (another writer won the race) returns
        the existing object: (object, created)."""
        meta = obj["metadata"]
        found = self.get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        if found is not None:
            return found, False
        try:
            return self.create(obj), True
        except KubeError as e:
            if e.status != 409:
                raise
        existing = self.get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        if existing is None:  # deleted between the 409 and the read: try once more
            return self.create(obj), True
        return existing, False

    def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str = "",
        content_type: str = MERGE_PATCH,
    ) -> Body:
        path = object_path(api_version, kind, namespace, name)
        if subresource:
            path += "/" + subresource
        return self.request("PATCH", path, dict(patch), content_type=content_type)

    def list(
        self, api_version: str, kind: str, namespace: str, label_selector: str = ""
    ) -> list[Body]:
        query = {"labelSelector": label_selector} if label_selector else None
        result = self.request("GET", collection_path(api_version, kind, namespace), query=query)
        items: list[Body] = result.get("items", [])
        return items

    def has_api(self, group_version: str, kind: str) -> bool:
        """Whether the API server serves a kind (e.g. monitoring.coreos.com/v1 PodMonitor)."""
        try:
            res = self.request("GET", f"/apis/{group_version}")
        except KubeError as e:
            if e.status == 404:
                return False
            raise
        return any(r.get("kind") == kind for r in res.get("resources", []))

    def scale(self, namespace: str, name: str, replicas: int) -> Body:
        """Set a SpecService's spec.replicas through its scale subresource."""
        return self.patch(
            f"{api.GROUP}/{api.VERSION}",
            api.KIND,
            namespace,
            name,
            {"spec": {"replicas": replicas}},
            subresource="scale",
        )
