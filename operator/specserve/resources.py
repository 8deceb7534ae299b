"""Pure builders of the objects a SpecService owns (plain dicts, ready to POST).

Names are deterministic functions of the SpecService (and, for the profiling Job, of what the
profile depends on), so an operator restarted at any point finds the objects it already made
instead of creating second ones. Every object carries an ownerReference to the SpecService, so
deleting the SpecService garbage-collects them.

Engine container contract (fixed with the engine, DESIGN §3):
  adaspec profile --target T --draft D --out /tmp/profile.json --print-json
                  --termination-log /dev/termination-log [--batch-sizes 1,2 --context-lens 128,512]
  adaspec serve --host 0.0.0.0 --port 8000 --target T --draft D
                --policy-file /etc/specserve/policy/policy.json
                --profile-file /etc/specserve/profile/profile.json
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from adaspec.contract import Policy
from specserve import api
from specserve.api import SpecServiceSpec

ENGINE_NAME = "specserve-engine"
PROFILER_NAME = "specserve-profiler"
MANAGED_BY = "specserve-operator"
SERVICE_LABEL = "specserve.io/service"
PROFILE_KEY_ANNOTATION = "specserve.io/profile-key"
SPEC_HASH_ANNOTATION = "specserve.io/spec-hash"
POLICY_FILE = "/etc/specserve/policy/policy.json"
PROFILE_FILE = "/etc/specserve/profile/profile.json"
TERMINATION_LOG = "/dev/termination-log"
NON_ROOT_UID = 1000

Body = dict[str, Any]


# ----------------------------------------------------------------------------- names


def engine_name(name: str) -> str:
    return f"{name}-engine"


def service_name(name: str) -> str:
    return name


def policy_configmap_name(name: str) -> str:
    return f"{name}-policy"


def profile_configmap_name(name: str) -> str:
    return f"{name}-profile"


def profile_job_name(name: str, key: str) -> str:
    return f"{name}-profile-{key[:8]}"


def selector_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": ENGINE_NAME, SERVICE_LABEL: name}


def selector_string(name: str) -> str:
    """status.selector (the scale subresource's labelSelectorPath wants the string form)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(name).items()))


def common_labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/part-of": "specserve",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        SERVICE_LABEL: name,
    }


# ----------------------------------------------------------------------------- hashes


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def profile_key(spec: SpecServiceSpec) -> str:
    """Hash of everything a profile depends on: models, image, hardware shape and grid.

    A change of any of these makes a new Job name (re-profiling); anything else keeps it.
    """
    e = spec.engine
    return _digest(
        {
            "target": spec.target_model.wire(),
            "draft": spec.draft_model.wire(),
            "image": e.image,
            "backend": e.backend,
            "gpus": e.gpus,
            "tp": e.tensor_parallel_size,
            "resources": e.resources,
            "nodeSelector": e.node_selector,
            "batchSizes": spec.profiling.batch_sizes,
            "contextLens": spec.profiling.context_lens,
        }
    )


def pod_spec_hash(spec: SpecServiceSpec, profile_digest: str | None) -> str:
    """Hash of what the engine pods run; a change rolls the Deployment.

    Excludes replicas/autoscaling (scaling must not restart pods), and the SLO and speculation
    settings (the engine applies those from the policy file without restart).
    """
    return _digest(
        {
            "target": spec.target_model.wire(),
            "draft": spec.draft_model.wire(),
            "engine": spec.engine.wire(),
            "profilingEnabled": spec.profiling.enabled,
            "profile": profile_digest,
        }
    )[:16]


def content_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- pieces


def owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    meta = owner["metadata"]
    return {
        "apiVersion": f"{api.GROUP}/{api.VERSION}",
        "kind": api.KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(
    owner: Mapping[str, Any], name: str, component: str, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    meta = owner["metadata"]
    out: dict[str, Any] = {
        "name": name,
        "namespace": meta["namespace"],
        "labels": common_labels(meta["name"], component),
        "ownerReferences": [owner_reference(owner)],
    }
    if annotations:
        out["annotations"] = annotations
    return out


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": NON_ROOT_UID,
        "runAsGroup": NON_ROOT_UID,
        "fsGroup": NON_ROOT_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def engine_resources(spec: SpecServiceSpec) -> dict[str, Any]:
    """spec.engine.resources with `nvidia.com/gpu: gpus` added to requests and limits."""
    res: dict[str, Any] = {k: dict(v) for k, v in spec.engine.resources.items() if v}
    if spec.engine.gpus > 0:
        for key in ("limits", "requests"):
            res.setdefault(key, {})["nvidia.com/gpu"] = str(spec.engine.gpus)
    return res


def _model_args(spec: SpecServiceSpec) -> list[str]:
    # revisions are rejected by validation until the engine can pin one (see validation.py)
    return ["--target", spec.target_model.name, "--draft", spec.draft_model.name]


def _backend_args(spec: SpecServiceSpec) -> list[str]:
    """Engine-only flags: the profiler always times the torch backend on the pod's hardware."""
    if spec.engine.backend == "vllm":
        tp = str(spec.engine.tensor_parallel_size)
        return ["--backend", "vllm", "--tensor-parallel-size", tp]
    return []


def _scheduling(spec: SpecServiceSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if spec.engine.node_selector:
        out["nodeSelector"] = dict(spec.engine.node_selector)
    if spec.engine.tolerations:
        out["tolerations"] = [t.wire() for t in spec.engine.tolerations]
    return out


_TMP_VOLUME = {"name": "tmp", "emptyDir": {}}
_TMP_MOUNT = {"name": "tmp", "mountPath": "/tmp"}
_HOME_ENV = [{"name": "HOME", "value": "/tmp"}]


# ----------------------------------------------------------------------------- objects


def profiling_job(owner: Mapping[str, Any], spec: SpecServiceSpec) -> Body:
    name = owner["metadata"]["name"]
    key = profile_key(spec)
    p = spec.profiling
    args = [
        "profile",
        *_model_args(spec),
        "--out",
        "/tmp/profile.json",
        "--print-json",
        "--termination-log",
        TERMINATION_LOG,
        "--batch-sizes",
        ",".join(str(b) for b in p.batch_sizes),
        "--context-lengths",
        ",".join(str(c) for c in p.context_lens),
    ]
    labels = common_labels(name, PROFILER_NAME)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(
            owner, profile_job_name(name, key), PROFILER_NAME, {PROFILE_KEY_ANNOTATION: key}
        ),
        "spec": {
            "backoffLimit": p.backoff_limit,
            "activeDeadlineSeconds": p.timeout_seconds,
            "template": {
                "metadata": {"labels": labels, "annotations": {PROFILE_KEY_ANNOTATION: key}},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security(),
                    "containers": [
                        {
                            "name": "profiler",
                            "image": spec.engine.image,
                            "imagePullPolicy": spec.engine.image_pull_policy,
                            "command": ["adaspec"],
                            "args": args,
                            "env": list(_HOME_ENV),
                            "resources": engine_resources(spec),
                            "terminationMessagePath": TERMINATION_LOG,
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                            "securityContext": _container_security(),
                            "volumeMounts": [dict(_TMP_MOUNT)],
                        }
                    ],
                    "volumes": [dict(_TMP_VOLUME)],
                    **_scheduling(spec),
                },
            },
        },
    }


def engine_deployment(
    owner: Mapping[str, Any], spec: SpecServiceSpec, profile_digest: str | None
) -> Body:
    name = owner["metadata"]["name"]
    port = spec.engine.port
    spec_hash = pod_spec_hash(spec, profile_digest)
    args = [
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        *_model_args(spec),
        *_backend_args(spec),
        "--policy-file",
        POLICY_FILE,
    ]
    volumes: list[dict[str, Any]] = [
        dict(_TMP_VOLUME),
        {"name": "policy", "configMap": {"name": policy_configmap_name(name)}},
    ]
    mounts: list[dict[str, Any]] = [
        dict(_TMP_MOUNT),
        {"name": "policy", "mountPath": "/etc/specserve/policy", "readOnly": True},
    ]
    if spec.profiling.enabled:
        args += ["--profile-file", PROFILE_FILE]
        volumes.append({"name": "profile", "configMap": {"name": profile_configmap_name(name)}})
        mounts.append({"name": "profile", "mountPath": "/etc/specserve/profile", "readOnly": True})
    if spec.engine.backend == "vllm":
        # vLLM's workers exchange tensors through /dev/shm; the runtime default (64 MiB) is small.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    args += list(spec.engine.extra_args)
    labels = {**common_labels(name, ENGINE_NAME), **selector_labels(name)}

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": "http"},
            "periodSeconds": period,
            "timeoutSeconds": 3,
            "failureThreshold": failures,
        }

    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(
            owner, engine_name(name), ENGINE_NAME, {SPEC_HASH_ANNOTATION: spec_hash}
        ),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(name)},
            # No capacity is given up during a rollout: the SLO holds while pods roll.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        SPEC_HASH_ANNOTATION: spec_hash,
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security(),
                    "terminationGracePeriodSeconds": 30,
                    "containers": [
                        {
                            "name": "engine",
                            "image": spec.engine.image,
                            "imagePullPolicy": spec.engine.image_pull_policy,
                            "command": ["adaspec"],
                            "args": args,
                            "env": [
                                *_HOME_ENV,
                                {"name": "SPECSERVE_SERVICE", "value": name},
                                {
                                    "name": "POD_NAME",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                },
                                {
                                    "name": "POD_NAMESPACE",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                                },
                            ],
                            "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
                            "startupProbe": probe("/health", 10, 180),
                            "readinessProbe": probe("/ready", 5, 3),
                            "livenessProbe": probe("/health", 10, 6),
                            "resources": engine_resources(spec),
                            "securityContext": _container_security(),
                            "volumeMounts": mounts,
                        }
                    ],
                    "volumes": volumes,
                    **_scheduling(spec),
                },
            },
        },
    }


def engine_service(owner: Mapping[str, Any], spec: SpecServiceSpec) -> Body:
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, service_name(name), ENGINE_NAME),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [
                {"name": "http", "port": spec.engine.port, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


def policy_configmap(owner: Mapping[str, Any], policy: Policy) -> Body:
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, policy_configmap_name(name), ENGINE_NAME),
        "data": {"policy.json": policy.to_json()},
    }


def profile_configmap(owner: Mapping[str, Any], profile_json: str, key: str) -> Body:
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(
            owner, profile_configmap_name(name), PROFILER_NAME, {PROFILE_KEY_ANNOTATION: key}
        ),
        "data": {"profile.json": profile_json},
    }


def pod_monitor(owner: Mapping[str, Any], spec: SpecServiceSpec) -> Body:
    """Prometheus-Operator PodMonitor; podTargetLabels turns the pod label
    `specserve.io/service` into the series label `specserve_io_service` (see specserve.prom)."""
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _metadata(owner, engine_name(name), ENGINE_NAME),
        "spec": {
            "selector": {"matchLabels": selector_labels(name)},
            "podTargetLabels": [SERVICE_LABEL],
            "podMetricsEndpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}],
        },
    }


def initial_policy(spec: SpecServiceSpec, generation: int = 1, reason: str = "") -> Policy:
    """The first policy: budget = SLO, draft limits from the spec."""
    s = spec.speculation
    return Policy(
        generation=generation,
        mode=s.mode,
        tpot_slo_ms=spec.slo.tpot_ms,
        tpot_budget_ms=spec.slo.tpot_ms,
        max_draft_tokens=s.max_draft_tokens,
        fixed_draft_tokens=min(s.fixed_draft_tokens, s.max_draft_tokens),
        reason=reason or "initial policy from spec",
    )
