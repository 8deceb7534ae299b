"""Container environment: literal values, downward-API fieldRefs and `$(VAR)` expansion.

Pure functions over the pod dict, so they are unit-tested without an API server. Only the
sources this agent can fill are supported; anything else raises `UnsupportedPodError` naming
the field, which the agent reports as the container's waiting reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_LABEL_REF = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class UnsupportedPodError(ValueError):
    """The pod uses a feature the local node agent cannot provide (message names the field)."""


def field_ref_value(pod: Mapping[str, Any], field_path: str, pod_ip: str) -> str:
    """Value of a downward-API fieldRef for this pod (pod_ip: the address the agent gave it)."""
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    simple: dict[str, str | None] = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": pod_ip,
        "status.hostIP": "127.0.0.1",
    }
    if field_path in simple:
        return simple[field_path] or ""
    m = _LABEL_REF.match(field_path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    raise UnsupportedPodError(
        f"env[].valueFrom.fieldRef.fieldPath: {field_path!r} is not supported"
    )


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known vars are substituted, `$$` escapes, unknown stay."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_REF.sub(sub, value)


def resolve_env(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    pod_ip: str,
    config_maps: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, str]:
    """The container's env in declaration order (later entries may reference earlier ones)."""
    out: dict[str, str] = {}
    cms = config_maps or {}
    name = container.get("name", "?")
    for i, item in enumerate(container.get("env") or []):
        key = item["name"]
        where = f"containers[{name}].env[{i}] ({key})"
        if "valueFrom" not in item:
            out[key] = expand(str(item.get("value", "")), out)
            continue
        src = item["valueFrom"]
        if "fieldRef" in src:
            out[key] = field_ref_value(pod, src["fieldRef"]["fieldPath"], pod_ip)
        elif "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            data = cms.get(ref["name"])
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise UnsupportedPodError(
                    f"{where}: configMapKeyRef {ref['name']}/{ref['key']} not found"
                )
            out[key] = data[ref["key"]]
        else:
            kinds = ", ".join(sorted(src))
            raise UnsupportedPodError(f"{where}: valueFrom {kinds} is not supported")
    return out


def command_line(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """command + args with `$(VAR)` expanded (an image entrypoint cannot be known: required)."""
    command: Sequence[str] = container.get("command") or []
    if not command:
        raise UnsupportedPodError(
            f"containers[{container.get('name', '?')}].command: required (images are ignored)"
        )
    return [expand(str(v), env) for v in [*command, *(container.get("args") or [])]]


def bind_to_pod_ip(argv: Sequence[str], pod_ip: str) -> list[str]:
    """Replace a wildcard listen address (`--host 0.0.0.0`, `--host=::`) with the pod IP."""
    wildcard = {"0.0.0.0", "::", "[::]"}
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--host", "--bind", "--address") and i + 1 < len(out) and out[i + 1] in wildcard:
            out[i + 1] = pod_ip
        for flag in ("--host=", "--bind=", "--address="):
            if arg.startswith(flag) and arg[len(flag) :] in wildcard:
                out[i] = flag + pod_ip
    return out
