"""The committed CRD equals the one generated from specserve.api, and it is a structural,
Kubernetes-1.20-compatible schema that agrees with the pydantic models on sample objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from specserve import crdgen
from specserve.api import SpecServiceSpec

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "specservices.specserve.io.yaml"


def _crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_FILE.read_text(encoding="utf-8"))


def _schema() -> dict[str, Any]:
    return _crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_matches_generated() -> None:
    assert CRD_FILE.read_text(encoding="utf-8") == crdgen.render(), (
        "crds/ is stale: run `python -m specserve.crdgen > crds/specservices.specserve.io.yaml`"
    )


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.get("properties", {}).items():
            out.extend(_walk(value, f"{path}.{key}"))
        if isinstance(node.get("items"), dict):
            out.extend(_walk(node["items"], path + "[]"))
        if isinstance(node.get("additionalProperties"), dict):
            out.extend(_walk(node["additionalProperties"], path + "{}"))
    return out


def test_schema_is_structural_and_has_no_cel() -> None:
    forbidden = {"$ref", "anyOf", "oneOf", "allOf", "not", "title", "x-kubernetes-validations"}
    for path, node in _walk(_schema()):
        assert not forbidden & node.keys(), f"{path}: {forbidden & node.keys()}"
        assert "type" in node, f"{path}: every node needs a type in a structural schema"
        if node["type"] == "object":
            has_shape = "properties" in node or "additionalProperties" in node
            assert (
                has_shape
                or node.get("x-kubernetes-preserve-unknown-fields")
                or path in {".metadata"}
            ), f"{path}: object without properties must preserve unknown fields"
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path


def test_no_defaults_a_1_20_api_server_refuses() -> None:
    # kube-apiserver 1.20.2 reads `default: ''` as null: "must be of type string".
    for path, node in _walk(_schema()):
        assert node.get("default", 0) != "", path
    status = _schema()["properties"]["status"]
    assert not [p for p, n in _walk(status) if "default" in n]


def test_preserve_unknown_only_where_needed() -> None:
    preserved = [p for p, n in _walk(_schema()) if n.get("x-kubernetes-preserve-unknown-fields")]
    assert preserved == [".spec.engine.resources"]


def test_subresources_printer_columns_and_names() -> None:
    crd = _crd()
    version = crd["spec"]["versions"][0]
    assert crd["metadata"]["name"] == "specservices.specserve.io"
    assert crd["spec"]["names"]["shortNames"] == ["ssvc"]
    assert crd["spec"]["scope"] == "Namespaced"
    assert version["name"] == "v1alpha1"
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["SLO", "P90 TPOT", "K", "Replicas", "Phase", "Age"]
    props = _schema()["properties"]
    for col in version["additionalPrinterColumns"]:
        # every printer column points at a field that exists in the schema
        node: Any = {"properties": {"metadata": {}, **props}}
        for part in col["jsonPath"].lstrip(".").split("."):
            if part == "creationTimestamp":
                break
            node = node["properties"][part]
        assert node is not None


def test_defaults_enums_and_bounds() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    assert spec["speculation"]["default"] == {}
    assert spec["speculation"]["properties"]["mode"]["enum"] == ["adaptive", "fixed", "off"]
    assert spec["speculation"]["properties"]["maxDraftTokens"]["maximum"] == 16
    assert spec["slo"]["properties"]["percentile"]["default"] == 90.0
    assert spec["slo"]["properties"]["tpotMs"]["exclusiveMinimum"] is True
    assert spec["profiling"]["properties"]["batchSizes"]["default"] == [1, 2, 4, 8]
    assert spec["engine"]["properties"]["backend"]["enum"] == ["vllm", "torch"]
    assert spec["replicas"]["default"] == 1
    assert _schema()["required"] == ["spec"]
    conditions = _schema()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


GOOD = {
    "targetModel": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
    "draftModel": {"name": "Qwen/Qwen2.5-0.5B-Instruct-draft"},
    "slo": {"tpotMs": 50},
}
BAD = [
    {**GOOD, "slo": {"tpotMs": 0}},
    {**GOOD, "slo": {"tpotMs": 50, "percentile": 100}},
    {**GOOD, "speculation": {"mode": "sometimes"}},
    {**GOOD, "speculation": {"maxDraftTokens": 17}},
    {**GOOD, "replicas": -1},
    {**GOOD, "engine": {"backend": "tgi"}},
    {**GOOD, "profiling": {"batchSizes": []}},
    {**GOOD, "prometheus": {"url": "prometheus:9090"}},
    {k: v for k, v in GOOD.items() if k != "slo"},
    {**GOOD, "engine": {"tolerations": [{"effect": "Sometimes"}]}},
]


@pytest.mark.parametrize("spec", [GOOD, {**GOOD, "engine": {"resources": {"limits": {"cpu": 2}}}}])
def test_schema_and_models_accept_the_same_good_spec(spec: dict[str, Any]) -> None:
    jsonschema.Draft4Validator(_schema()["properties"]["spec"]).validate(spec)
    SpecServiceSpec.model_validate(spec)


@pytest.mark.parametrize("spec", BAD)
def test_schema_and_models_reject_the_same_bad_spec(spec: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(_schema()["properties"]["spec"]).validate(spec)
    with pytest.raises(ValueError):
        SpecServiceSpec.model_validate(spec)


def test_cli_writes_the_crd(tmp_path: Path) -> None:
    from specserve.cli import main

    out = tmp_path / "crd.yaml"
    assert main(["crd", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == crdgen.render()
