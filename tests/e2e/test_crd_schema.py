"""The generated CRD on a real API server: served shape, defaults, and bad specs refused by the
schema with the offending field named (`kubectl apply` fails)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from e2e_support import GROUP, PLURAL, Cluster, specservice


def _apply(cluster: Cluster, ns: str, body: dict[str, Any], client_validation: bool) -> Any:
    """kubectl apply; without client validation the API server's schema is what refuses."""
    flags = [] if client_validation else ["--validate=false"]
    return cluster.kubectl("apply", "-n", ns, *flags, "-f", "-", input_text=yaml.safe_dump(body),
                           check=False)  # fmt: skip


def test_crd_is_served_with_subresources_short_name_and_columns(
    cluster: Cluster, chart: str
) -> None:
    crd = json.loads(cluster.kubectl("get", "crd", f"{PLURAL}.{GROUP}", "-o", "json").stdout)
    assert "ssvc" in crd["spec"]["names"]["shortNames"]
    assert crd["spec"]["scope"] == "Namespaced"
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    assert version["name"] == "v1alpha1"
    assert "status" in version["subresources"]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    for col in ("SLO", "P90 TPOT", "K", "Replicas", "Phase", "Age"):
        assert col in columns, columns
    established = [c for c in crd["status"]["conditions"] if c["type"] == "Established"]
    assert established and established[0]["status"] == "True"


def test_schema_defaults_are_applied(cluster: Cluster, chart: str, namespace: str) -> None:
    body = specservice("defaults")
    del body["spec"]["profiling"]
    cluster.create_ssvc(namespace, body)
    spec = cluster.get_ssvc(namespace, "defaults")["spec"]
    assert spec["replicas"] == 1
    assert spec["slo"]["percentile"] == 90
    assert spec["speculation"] == {"mode": "adaptive", "maxDraftTokens": 8, "fixedDraftTokens": 3}
    assert spec["profiling"]["enabled"] is True
    assert spec["engine"]["port"] == 8000
    out = cluster.kubectl("get", "ssvc", "-n", namespace).stdout
    assert out.split("\n")[0].split()[:2] == ["NAME", "SLO"], out


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"slo": {"tpotMs": -5}}, ["spec.slo.tpotMs"]),
        ({"speculation": {"mode": "turbo"}}, ["spec.speculation.mode", "turbo"]),
        ({"speculation": {"maxDraftTokens": 99}}, ["spec.speculation.maxDraftTokens"]),
        ({"replicas": "two"}, ["spec.replicas"]),
        ({"engine": {"backend": "tensorrt"}}, ["spec.engine.backend"]),
        ({"targetModel": None}, ["spec.targetModel", "Required value"]),
        # Kubernetes 1.20 prunes unknown fields on the server; kubectl's client-side validation
        # (and server-side field validation on 1.25+) refuses them, naming the field.
        ({"slo": {"tpotMs": 100, "percentil": 95}}, ["percentil"]),
    ],
    ids=["negative-tpot", "bad-mode", "too-many-drafts", "replicas-string", "bad-backend",
         "missing-target", "unknown-field"],
)  # fmt: skip
def test_schema_rejects_bad_specs_naming_the_field(
    cluster: Cluster, chart: str, namespace: str, patch: dict[str, Any], expected: list[str]
) -> None:
    body = specservice("bad")
    for key, value in patch.items():
        if value is None:
            del body["spec"][key]
        elif isinstance(value, dict):
            body["spec"][key] = {**body["spec"].get(key, {}), **value}
        else:
            body["spec"][key] = value
    res = _apply(cluster, namespace, body, client_validation="percentil" in expected)
    assert res.returncode != 0, f"accepted: {patch}\n{res.stdout}"
    for text in expected:
        assert text in res.stderr, res.stderr
    assert (
        cluster.custom.list_namespaced_custom_object(GROUP, "v1alpha1", namespace, PLURAL)["items"]
        == []
    )
