"""Builders of the objects a SpecService owns: names, contracts with the engine CLI, security,
owner references, and which spec changes roll the engine pods."""

from __future__ import annotations

from typing import Any

from adaspec.contract import parse_policy
from specserve import resources as r
from specserve.api import SpecServiceSpec

OWNER = {"metadata": {"name": "chat", "namespace": "team-a", "uid": "u-1"}}


def spec(**over: Any) -> SpecServiceSpec:
    raw: dict[str, Any] = {
        "targetModel": {"name": "Qwen/Qwen2.5-7B-Instruct"},
        "draftModel": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
        "slo": {"tpotMs": 40},
        "engine": {
            "image": "reg/engine:1",
            "gpus": 2,
            "tensorParallelSize": 2,
            "resources": {"requests": {"cpu": "4", "memory": "32Gi"}},
            "nodeSelector": {"gpu": "h200"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "extraArgs": ["--max-num-seqs", "64"],
        },
        "profiling": {"batchSizes": [1, 4], "contextLens": [256], "timeoutSeconds": 900},
        "replicas": 2,
    }
    raw.update(over)
    return SpecServiceSpec.model_validate(raw)


def container(obj: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any] = obj["spec"]["template"]["spec"]["containers"][0]
    return c


def test_profiling_job_runs_the_engine_profile_contract() -> None:
    s = spec()
    job = r.profiling_job(OWNER, s)
    key = r.profile_key(s)
    assert job["metadata"]["name"] == f"chat-profile-{key[:8]}"
    assert len(job["metadata"]["name"]) <= 63
    assert job["spec"]["backoffLimit"] == 2
    assert job["spec"]["activeDeadlineSeconds"] == 900
    c = container(job)
    assert c["image"] == "reg/engine:1"
    assert [c["command"][0], *c["args"][:4]] == [
        "adaspec", "profile", "--target", "Qwen/Qwen2.5-7B-Instruct", "--draft",
    ]  # fmt: skip
    args = c["args"]
    for flag, value in [
        ("--out", "/tmp/profile.json"),
        ("--termination-log", "/dev/termination-log"),
        ("--batch-sizes", "1,4"),
        ("--context-lengths", "256"),
    ]:
        assert args[args.index(flag) + 1] == value
    assert "--print-json" in args
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["nodeSelector"] == {"gpu": "h200"}
    assert job["metadata"]["ownerReferences"] == [
        {"apiVersion": "specserve.io/v1alpha1", "kind": "SpecService", "name": "chat",
         "uid": "u-1", "controller": True, "blockOwnerDeletion": True}
    ]  # fmt: skip


def test_engine_deployment_contract() -> None:
    s = spec()
    dep = r.engine_deployment(OWNER, s, "digest1")
    assert dep["metadata"]["name"] == "chat-engine"
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "specserve-engine",
        "specserve.io/service": "chat",
    }
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "specserve-engine"
    assert labels["specserve.io/service"] == "chat"
    c = container(dep)
    args = c["args"]
    assert args[:5] == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    assert args[args.index("--policy-file") + 1] == "/etc/specserve/policy/policy.json"
    assert args[args.index("--profile-file") + 1] == "/etc/specserve/profile/profile.json"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[-2:] == ["--max-num-seqs", "64"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert c["resources"]["requests"] == {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "2"}
    pod = dep["spec"]["template"]["spec"]
    cms = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    assert cms == {"chat-policy", "chat-profile"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann[r.SPEC_HASH_ANNOTATION] == r.pod_spec_hash(s, "digest1")
    assert ann["prometheus.io/port"] == "8000"


def test_torch_backend_without_gpus_has_no_gpu_resources_or_backend_flag() -> None:
    s = spec(engine={"backend": "torch", "gpus": 0})
    dep = r.engine_deployment(OWNER, s, None)
    c = container(dep)
    assert c["resources"] == {}
    assert "--backend" not in c["args"]
    assert not any(v["name"] == "dshm" for v in dep["spec"]["template"]["spec"]["volumes"])


def test_what_rolls_the_pods_and_what_does_not() -> None:
    base = r.pod_spec_hash(spec(), "p1")
    assert r.pod_spec_hash(spec(replicas=5), "p1") == base
    assert r.pod_spec_hash(spec(slo={"tpotMs": 20}), "p1") == base
    assert r.pod_spec_hash(spec(speculation={"maxDraftTokens": 3}), "p1") == base
    assert r.pod_spec_hash(spec(autoscaling={"enabled": True, "maxReplicas": 9}), "p1") == base
    assert r.pod_spec_hash(spec(), "p2") != base  # a new profile
    other_image = spec()
    other_image.engine.image = "reg/engine:2"
    assert r.pod_spec_hash(other_image, "p1") != base


def test_profile_key_depends_on_models_hardware_and_grid_only() -> None:
    k = r.profile_key(spec())
    assert r.profile_key(spec(replicas=7, slo={"tpotMs": 10})) == k
    assert r.profile_key(spec(profiling={"batchSizes": [1, 2]})) != k
    assert r.profile_key(spec(draftModel={"name": "other"})) != k


def test_service_configmaps_and_podmonitor() -> None:
    s = spec()
    svc = r.engine_service(OWNER, s)
    assert svc["metadata"]["name"] == "chat"
    assert svc["spec"]["selector"] == r.selector_labels("chat")
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    pol = r.initial_policy(s)
    cm = r.policy_configmap(OWNER, pol)
    assert cm["metadata"]["name"] == "chat-policy"
    assert parse_policy(cm["data"]["policy.json"]) == pol
    assert '"tpotBudgetMs"' in cm["data"]["policy.json"]  # camelCase on the wire
    prof = r.profile_configmap(OWNER, "{}", "abc")
    assert prof["metadata"]["annotations"][r.PROFILE_KEY_ANNOTATION] == "abc"
    pm = r.pod_monitor(OWNER, s)
    assert pm["spec"]["selector"]["matchLabels"] == r.selector_labels("chat")
    for obj in (svc, cm, prof, pm):
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "u-1"
        assert obj["metadata"]["namespace"] == "team-a"


def test_selector_string_matches_the_pod_labels() -> None:
    assert r.selector_string("chat") == (
        "app.kubernetes.io/name=specserve-engine,specserve.io/service=chat"
    )
