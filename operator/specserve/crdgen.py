"""Generate the SpecService CRD from the pydantic models in `specserve.api`.

    python -m specserve.crdgen > crds/specservices.specserve.io.yaml

pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3.0 schema that a
1.20 API server accepts. The conversion inlines `$ref`s, turns `Optional[X]` (anyOf X|null) into
X, rewrites numeric `exclusiveMinimum: n` into `minimum: n, exclusiveMinimum: true`, drops
`title`/`additionalProperties: false`, and adds defaults for nested objects (`{}`) so that the
API server fills nested defaults. Empty-string defaults are dropped (a 1.20 API server reads them
as null and refuses the CRD), and so are all defaults under status. No CEL
(`x-kubernetes-validations`): cross-field checks are made by the operator
(`specserve.validation`). A unit test keeps the committed YAML equal to this output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, NoDefault
from pydantic_core import core_schema

from specserve import api

_DROP_KEYS = {"title"}


class _WithFactoryDefaults(GenerateJsonSchema):
    """Include `default_factory` values (non-empty lists/maps) as schema defaults."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().get_default_value(schema)
        value = factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return {}  # the API server then applies the nested field defaults
        if value in ([], {}):
            return NoDefault
        return value


def _model_schema(model: type[BaseModel]) -> JsonSchemaValue:
    return model.model_json_schema(by_alias=True, schema_generator=_WithFactoryDefaults)


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Rewrite one JSON-Schema node into the structural OpenAPI v3.0 subset."""
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        ref = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**ref, **node}
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"unsupported union in schema: {options}")
        merged = dict(options[0])
        if "$ref" in merged:
            merged = {**defs[merged.pop("$ref").rsplit("/", 1)[-1]], **merged}
        node = {**merged, **node}
        if node.get("default", 0) is None:
            node.pop("default")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS or key == "$defs":
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key == "additionalProperties" and value is True:
            continue  # free-form objects carry x-kubernetes-preserve-unknown-fields instead
        if key == "exclusiveMinimum":
            out["minimum"] = value
            out["exclusiveMinimum"] = True
            continue
        if key == "exclusiveMaximum":
            out["maximum"] = value
            out["exclusiveMaximum"] = True
            continue
        if key == "default" and value == "":
            continue  # Kubernetes 1.20 decodes an empty-string default as null and refuses it
        if key == "properties":
            out[key] = {k: _structural(v, defs) for k, v in value.items()}
            continue
        out[key] = _structural(value, defs)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    free_form = "properties" not in out and "additionalProperties" not in out
    if out.get("type") == "object" and free_form:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _without_defaults(node: Any) -> Any:
    """Status is written whole by the operator; defaults there would only hide missing data."""
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_without_defaults(v) for v in node]
    return node


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = _model_schema(model)
    defs = raw.get("$defs", {})
    result: dict[str, Any] = _structural(raw, defs)
    return result


def crd() -> dict[str, Any]:
    spec_schema = openapi_schema(api.SpecServiceSpec)
    spec_schema["description"] = "Desired state: models, TPOT SLO, speculation, engine."
    status_schema = _without_defaults(openapi_schema(api.SpecServiceStatus))
    status_schema["description"] = "Observed state written by the operator."
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["all", "specserve"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {
                            "name": "SLO",
                            "type": "number",
                            "jsonPath": ".spec.slo.tpotMs",
                            "description": "TPOT SLO (ms)",
                        },
                        {
                            "name": "P90 TPOT",
                            "type": "number",
                            "jsonPath": ".status.observed.tpotP90Ms",
                            "description": "Observed P90 TPOT (ms)",
                        },
                        {
                            "name": "K",
                            "type": "integer",
                            "jsonPath": ".status.policy.maxDraftTokens",
                            "description": "Current maximum draft tokens",
                        },
                        {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A model pair served under a TPOT SLO with "
                            "adaptive speculative decoding.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated by `python -m specserve.crdgen` from specserve.api. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, help="write here instead of stdout")


def run(args: argparse.Namespace) -> int:
    text = render()
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specserve.crdgen", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
