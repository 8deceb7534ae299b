"""The operator against a real API server: Job once, children with owner references, status and
conditions, rolling update, scale subresource, GC on delete, conflicts and crash-restarts.

The operator runs as a local process with the chart's ServiceAccount token (see conftest.py);
pods are driven by the fake kubelet test helper, and profiling pods finish with the fixture
Profile (fixture injection: no real profiler runs here).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from e2e_support import (
    GROUP,
    PLURAL,
    VERSION,
    Cluster,
    JobOutcomes,
    OperatorProcess,
    condition,
    specservice,
    wait_for,
)
from fake_kubelet import Termination, fixture_profile_json
from kubernetes.client.rest import ApiException

TIMEOUT = 60.0


def _ready(cluster: Cluster, ns: str, name: str, op: OperatorProcess) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = cluster.get_ssvc(ns, name)
        return obj if (obj.get("status") or {}).get("phase") == "Ready" else None

    def why() -> str:
        obj = cluster.get_ssvc(ns, name)
        return f"status: {json.dumps(obj.get('status'), indent=1)}\n{op.log_tail(40)}"

    result: dict[str, Any] = wait_for(check, TIMEOUT, f"{ns}/{name} phase Ready", on_timeout=why)
    return result


def _owned_by(obj: Any, owner: dict[str, Any]) -> bool:
    refs = obj.metadata.owner_references or []
    return any(r.uid == owner["metadata"]["uid"] and r.controller for r in refs)


def _jobs(cluster: Cluster, ns: str) -> list[Any]:
    return list(cluster.batch.list_namespaced_job(ns).items)


def test_happy_path_job_once_children_owned_and_ready(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    ns, name = namespace, "happy"
    cluster.create_ssvc(ns, specservice(name))
    obj = _ready(cluster, ns, name, operator)

    # exactly one profiling Job, finished, owned by the SpecService
    jobs = _jobs(cluster, ns)
    assert len(jobs) == 1, [j.metadata.name for j in jobs]
    assert jobs[0].status.succeeded == 1
    assert _owned_by(jobs[0], obj)

    # the profile from the Job pod's termination message, stored in <name>-profile
    cm = cluster.core.read_namespaced_config_map(f"{name}-profile", ns)
    assert json.loads(cm.data["profile.json"]) == json.loads(fixture_profile_json())
    assert _owned_by(cm, obj)
    policy_cm = cluster.core.read_namespaced_config_map(f"{name}-policy", ns)
    policy = json.loads(policy_cm.data["policy.json"])
    assert policy["tpotSloMs"] == 120 and policy["generation"] >= 1
    assert _owned_by(policy_cm, obj)

    dep = cluster.apps.read_namespaced_deployment(f"{name}-engine", ns)
    assert _owned_by(dep, obj)
    assert dep.status.available_replicas == 1
    svc = cluster.core.read_namespaced_service(name, ns)
    assert _owned_by(svc, obj)

    status = obj["status"]
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    for ctype in ("Validated", "Profiled", "Available"):
        cond = condition(obj, ctype)
        assert cond is not None and cond["status"] == "True", (ctype, status["conditions"])
    assert status["replicas"] == 1
    assert status["profile"]  # summary of the stored profile

    # the Job is still the only one after a few more reconcile ticks
    events = cluster.core.list_namespaced_event(ns).items
    reasons = {e.reason for e in events}
    assert {"ProfilingStarted", "Profiled", "Deploying"} <= reasons, reasons
    assert len(_jobs(cluster, ns)) == 1


def test_semantic_error_sets_validated_false_naming_the_field(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    ns, name = namespace, "minmax"
    body = specservice(name, autoscaling={"enabled": True, "minReplicas": 3, "maxReplicas": 2})
    cluster.create_ssvc(ns, body)

    def validated_false() -> dict[str, Any] | None:
        cond = condition(cluster.get_ssvc(ns, name), "Validated")
        return cond if cond and cond["status"] == "False" else None

    cond = wait_for(validated_false, TIMEOUT, "Validated=False", on_timeout=operator.log_tail)
    assert cond["reason"] == "InvalidSpec"
    assert "spec.autoscaling.minReplicas" in cond["message"]
    assert cluster.get_ssvc(ns, name)["status"]["phase"] == "Failed"
    # nothing was created for an invalid spec
    assert _jobs(cluster, ns) == []
    assert cluster.apps.list_namespaced_deployment(ns).items == []


def test_profiling_failure_sets_profiled_false(
    cluster: Cluster, operator: OperatorProcess, namespace: str, job_outcomes: JobOutcomes
) -> None:
    # fault injection: the fake kubelet ends this namespace's profiling pods with exit code 3
    job_outcomes.by_namespace[namespace] = lambda pod: Termination(3, "CUDA out of memory")
    ns, name = namespace, "profail"
    cluster.create_ssvc(ns, specservice(name))

    def profiled_false() -> dict[str, Any] | None:
        cond = condition(cluster.get_ssvc(ns, name), "Profiled")
        return cond if cond and cond["reason"] == "ProfilingFailed" else None

    cond = wait_for(profiled_false, TIMEOUT, "Profiled=False/ProfilingFailed",
                    on_timeout=operator.log_tail)  # fmt: skip
    assert cond["status"] == "False"
    assert "CUDA out of memory" in cond["message"]
    assert cluster.get_ssvc(ns, name)["status"]["phase"] == "Failed"
    assert cluster.apps.list_namespaced_deployment(ns).items == []
    assert len(_jobs(cluster, ns)) == 1


def test_spec_change_rolls_out_without_reprofiling_and_scale_subresource(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    ns, name = namespace, "roll"
    cluster.create_ssvc(ns, specservice(name))
    obj = _ready(cluster, ns, name, operator)
    dep0 = cluster.apps.read_namespaced_deployment(f"{name}-engine", ns)

    # an engine-only change: new pod template, same profile (no second Job)
    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, name, {"spec": {"engine": {"extraArgs": ["--log-level=debug"]}}}
    )

    def rolled() -> Any:
        dep = cluster.apps.read_namespaced_deployment(f"{name}-engine", ns)
        args = dep.spec.template.spec.containers[0].args or []
        return dep if "--log-level=debug" in args else None

    dep1 = wait_for(rolled, TIMEOUT, "the Deployment's pod template to change",
                    on_timeout=operator.log_tail)  # fmt: skip
    assert dep1.metadata.generation > dep0.metadata.generation
    obj = wait_for(
        lambda: (o := cluster.get_ssvc(ns, name))["status"].get("observedGeneration")
        == o["metadata"]["generation"] and o["status"].get("phase") == "Ready" and o,
        TIMEOUT, "observedGeneration to catch up",
    )  # fmt: skip
    assert obj["metadata"]["generation"] == 2
    assert len(_jobs(cluster, ns)) == 1

    # kubectl scale goes through the CRD's scale subresource to spec.replicas -> Deployment
    cluster.kubectl("scale", "-n", ns, f"specservice/{name}", "--replicas=3")

    def available() -> int:
        dep = cluster.apps.read_namespaced_deployment(f"{name}-engine", ns)
        return int(dep.status.available_replicas or 0)

    wait_for(lambda: available() == 3, TIMEOUT, "3 available engine replicas",
             on_timeout=operator.log_tail)  # fmt: skip
    wait_for(lambda: cluster.get_ssvc(ns, name)["status"].get("replicas") == 3, TIMEOUT,
             "status.replicas 3")  # fmt: skip
    scale = cluster.custom.get_namespaced_custom_object_scale(GROUP, VERSION, ns, PLURAL, name)
    assert scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] == 3


def test_delete_garbage_collects_children(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    ns, name = namespace, "gc"
    cluster.create_ssvc(ns, specservice(name))
    _ready(cluster, ns, name, operator)
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)

    def all_gone() -> bool:
        return (
            not cluster.apps.list_namespaced_deployment(ns).items
            and not _jobs(cluster, ns)
            and not cluster.core.list_namespaced_service(ns).items
            and not [
                c for c in cluster.core.list_namespaced_config_map(ns).items
                if c.metadata.name.startswith(name)
            ]
            and not cluster.core.list_namespaced_pod(ns).items
        )  # fmt: skip

    wait_for(all_gone, TIMEOUT, "the garbage collector to remove every child")
    with pytest.raises(ApiException) as e:
        cluster.get_ssvc(ns, name)
    assert e.value.status == 404


def test_conflicts_existing_children_and_stale_writes(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    ns, name = namespace, "conflict"
    # A Service with the engine Service's name exists already (e.g. from a crashed operator):
    # the operator's create gets 409 AlreadyExists and must adopt the situation, not fail.
    cluster.core.create_namespaced_service(ns, {
        "metadata": {"name": name},
        "spec": {"selector": {"app": "other"}, "ports": [{"port": 8000}]},
    })  # fmt: skip
    cluster.create_ssvc(ns, specservice(name))
    obj = _ready(cluster, ns, name, operator)
    assert len(cluster.core.list_namespaced_service(ns).items) == 1

    # Optimistic concurrency the operator relies on: a write with a stale resourceVersion is
    # refused with 409 Conflict by the API server, and the operator's status survives it.
    stale = dict(obj)
    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, name, {"metadata": {"labels": {"touched": "yes"}}}
    )
    with pytest.raises(ApiException) as e:
        cluster.custom.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, stale)
    assert e.value.status == 409
    assert cluster.get_ssvc(ns, name)["status"]["phase"] == "Ready"


def test_operator_killed_mid_rollout_creates_no_duplicates(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    ns, name = namespace, "crash"
    cluster.create_ssvc(ns, specservice(name))
    # crash 1: as soon as the profiling Job exists
    wait_for(lambda: _jobs(cluster, ns), TIMEOUT, "the profiling Job")
    operator.kill()
    operator.start()
    # crash 2: as soon as the engine Deployment exists (rollout in progress)
    wait_for(
        lambda: cluster.apps.list_namespaced_deployment(ns).items, TIMEOUT,
        "the engine Deployment", on_timeout=operator.log_tail,
    )  # fmt: skip
    operator.kill()
    operator.start()
    _ready(cluster, ns, name, operator)

    assert len(_jobs(cluster, ns)) == 1
    assert len(cluster.apps.list_namespaced_deployment(ns).items) == 1
    rs = cluster.apps.list_namespaced_replica_set(ns).items
    assert len(rs) == 1, [r.metadata.name for r in rs]  # no second rollout
    assert len(cluster.core.list_namespaced_service(ns).items) == 1
    cms = [c.metadata.name for c in cluster.core.list_namespaced_config_map(ns).items]
    assert sorted(c for c in cms if c.startswith(name)) == [f"{name}-policy", f"{name}-profile"]
