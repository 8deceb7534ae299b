"""The reconcile logic against an in-memory API fake (409 on duplicate create, merge patch,
label selectors). Restart safety is tested by crashing the operator at every API call of a
reconcile and running a fresh Reconciler on the same store: never a second Job or Deployment.
Real-API-server behaviour (schema, GC, status subresource) is covered by tests/e2e."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytest

from adaspec.contract import (
    AcceptanceCalibration,
    FitQuality,
    Hardware,
    ModelIdentity,
    Profile,
    StepTimeModel,
    TimeModel,
    parse_policy,
)
from specserve import control, resources
from specserve.api import ConditionType, Phase
from specserve.kube import KubeError
from specserve.reconcile import Reconciler
from specserve.settings import OperatorSettings

Body = dict[str, Any]
NS = "team-a"
NAME = "chat"


def merge(target: Body, patch: Mapping[str, Any]) -> Body:
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, Mapping) and isinstance(target.get(k), dict):
            merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v)
    return target


class CrashError(Exception):
    """The operator process died here."""


class FakeKube:
    def __init__(self) -> None:
        self.store: dict[tuple[str, str, str], Body] = {}
        self.creates: Counter[str] = Counter()
        self.calls = 0
        self.crash_at: int | None = None
        self.hide_next_get = False
        self.pod_monitors = False

    def _tick(self) -> None:
        self.calls += 1
        if self.crash_at is not None and self.calls > self.crash_at:
            raise CrashError(f"killed at call {self.calls}")

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Body | None:
        self._tick()
        if self.hide_next_get:  # another writer creates it right after our lookup
            self.hide_next_get = False
            return None
        obj = self.store.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def create(self, obj: Mapping[str, Any]) -> Body:
        self._tick()
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        if key in self.store:
            raise KubeError(409, "AlreadyExists")
        stored = copy.deepcopy(dict(obj))
        stored["metadata"]["uid"] = f"uid-{len(self.store)}"
        self.store[key] = stored
        self.creates[obj["kind"]] += 1
        return copy.deepcopy(stored)

    def ensure(self, obj: Mapping[str, Any]) -> tuple[Body, bool]:
        found = self.get(obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"],
                         obj["metadata"]["name"])  # fmt: skip
        if found is not None:
            return found, False
        try:
            return self.create(obj), True
        except KubeError as e:
            assert e.status == 409
        again = self.get(obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"],
                         obj["metadata"]["name"])  # fmt: skip
        assert again is not None
        return again, False

    def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str = "",
        content_type: str = "",
    ) -> Body:
        self._tick()
        obj = self.store.get((kind, namespace, name))
        if obj is None:
            raise KubeError(404, "NotFound")
        return copy.deepcopy(merge(obj, patch))

    def list(
        self, api_version: str, kind: str, namespace: str, label_selector: str = ""
    ) -> list[Body]:
        self._tick()
        want = dict(p.split("=", 1) for p in label_selector.split(",") if p)
        return [
            copy.deepcopy(o)
            for (k, ns, _), o in self.store.items()
            if k == kind
            and ns == namespace
            and all(o["metadata"].get("labels", {}).get(a) == b for a, b in want.items())
        ]

    def has_api(self, group_version: str, kind: str) -> bool:
        self._tick()
        return self.pod_monitors

    def scale(self, namespace: str, name: str, replicas: int) -> Body:
        self._tick()
        self.scaled = replicas
        return {"spec": {"replicas": replicas}}

    # ---- test helpers: what controllers and kubelets would do
    def one(self, kind: str) -> Body:
        found = [o for (k, _, _), o in self.store.items() if k == kind]
        assert len(found) == 1, f"{len(found)} {kind}s"
        return found[0]

    def finish_job(self, message: str, exit_code: int = 0) -> None:
        job = self.one("Job")
        ok = exit_code == 0
        job["status"] = {
            "conditions": [
                {"type": "Complete" if ok else "Failed", "status": "True",
                 "reason": None if ok else "BackoffLimitExceeded",
                 "message": None if ok else "Job has reached the specified backoff limit"}
            ]
        }  # fmt: skip
        pod_name = job["metadata"]["name"] + "-x7k2p"
        self.store[("Pod", NS, pod_name)] = {
            "metadata": {"name": pod_name, "namespace": NS,
                         "labels": {"job-name": job["metadata"]["name"]}},
            "status": {"containerStatuses": [{"name": "profiler", "state": {"terminated": {
                "exitCode": exit_code, "message": message,
                "finishedAt": "2026-11-29T03:00:00Z"}}}]},
        }  # fmt: skip

    def make_available(self, ready: int = 1) -> None:
        dep = self.one("Deployment")
        dep["status"] = {"replicas": ready, "readyReplicas": ready, "availableReplicas": ready}


def profile_json() -> str:
    fit = FitQuality(r2=0.98, mape=0.03, n_train=40, n_test=10)
    return Profile(
        created_at="2026-11-29T03:00:00Z",
        hardware=Hardware(device="cpu", threads=2),
        target=ModelIdentity(name="t"),
        draft=ModelIdentity(name="d"),
        time_model=TimeModel(
            draft=StepTimeModel(intercept_ms=4.0, per_row_ms=0.5, fit=fit),
            verify=StepTimeModel(intercept_ms=30.0, per_row_ms=1.0, per_token_ms=0.8, fit=fit),
        ),
        calibration=AcceptanceCalibration(
            bin_edges=[0.0, 0.5, 1.0], accept_prob=[0.3, 0.8], auc=0.81
        ),
    ).to_json()


def cr(**spec_over: Any) -> Body:
    spec: Body = {
        "targetModel": {"name": "t"},
        "draftModel": {"name": "d"},
        "slo": {"tpotMs": 50},
        "engine": {"backend": "torch", "gpus": 0, "image": "specserve/engine:test"},
    }
    spec.update(spec_over)
    return {
        "apiVersion": "specserve.io/v1alpha1",
        "kind": "SpecService",
        "metadata": {"name": NAME, "namespace": NS, "uid": "cr-uid", "generation": 1},
        "spec": spec,
    }


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def reconciler(kube: FakeKube, clock: Clock | None = None, **kw: Any) -> Reconciler:
    events: list[tuple[str, str]] = []
    r = Reconciler(
        kube,
        OperatorSettings(prometheus_url="http://prom.test:9090"),
        emit=lambda body, t, reason, msg: events.append((t, reason)),
        clock=clock or Clock(),
        **kw,
    )
    r.events = events  # type: ignore[attr-defined]
    return r


def apply(body: Body, status: Body) -> Body:
    out = copy.deepcopy(body)
    out["status"] = merge(out.get("status") or {}, status)
    return out


def conds(status: Body) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_happy_path_profile_then_deploy() -> None:
    kube = FakeKube()
    rec = reconciler(kube)
    body = cr()
    st = rec.converge(body)
    assert st["phase"] == Phase.profiling
    assert conds(st)["Profiled"] == ("False", "Profiling")
    assert "observedGeneration" not in st  # the timer keeps polling
    job = kube.one("Job")
    assert job["metadata"]["ownerReferences"][0]["uid"] == "cr-uid"
    body = apply(body, st)
    assert rec.needs_converge(body)
    st = rec.tick(body)  # Job still running: no second Job, still Profiling
    assert kube.creates["Job"] == 1 and st["phase"] == Phase.profiling

    kube.finish_job(profile_json())
    st = rec.tick(apply(body, st))
    body = apply(body, st)
    assert conds(st)["Profiled"] == ("True", "ProfileReady")
    assert st["profile"]["configMap"] == "chat-profile"
    assert st["profile"]["calibrationAuc"] == 0.81
    cm = kube.store[("ConfigMap", NS, "chat-profile")]
    assert Profile.model_validate_json(cm["data"]["profile.json"]).hardware.device == "cpu"
    policy = parse_policy(kube.store[("ConfigMap", NS, "chat-policy")]["data"]["policy.json"])
    assert policy.tpot_budget_ms == 50.0 and policy.generation == 1
    assert kube.creates["Deployment"] == 1 and kube.creates["Service"] == 1
    assert st["phase"] == Phase.deploying
    assert conds(st)["Available"] == ("False", "EngineStarting")
    assert st["observedGeneration"] == 1
    assert st["selector"] == "app.kubernetes.io/name=specserve-engine,specserve.io/service=chat"
    assert [e[1] for e in rec.events] == [  # type: ignore[attr-defined]
        "ProfilingStarted",
        "Profiled",
        "Deploying",
    ]

    kube.make_available()
    st = rec.tick(body)
    assert st["phase"] == Phase.ready
    assert conds(apply(body, st)["status"])["Available"] == ("True", "EngineAvailable")


def test_restart_at_every_call_never_duplicates_children() -> None:
    # Count the calls of a full, uninterrupted reconcile first.
    probe = FakeKube()
    rec = reconciler(probe)
    body = apply(cr(), rec.converge(cr()))
    probe.finish_job(profile_json())
    probe.calls = 0
    rec.tick(body)
    total = probe.calls
    assert total > 5
    for crash_at in range(total):
        kube = FakeKube()
        first = reconciler(kube)
        body = apply(cr(), first.converge(cr()))
        kube.finish_job(profile_json())
        kube.calls, kube.crash_at = 0, crash_at
        with pytest.raises(CrashError):
            first.tick(body)
        kube.crash_at = None
        st = reconciler(kube).tick(body)  # a fresh operator process, same cluster
        assert st["observedGeneration"] == 1, crash_at
        for kind in ("Job", "Deployment", "Service"):
            assert kube.creates[kind] == 1, (crash_at, kind)
        assert ("ConfigMap", NS, "chat-policy") in kube.store
        assert ("ConfigMap", NS, "chat-profile") in kube.store


def test_create_race_409_returns_the_existing_object() -> None:
    kube = FakeKube()
    rec = reconciler(kube)
    rec.converge(cr())
    kube.hide_next_get = True  # our lookup misses, the POST then hits 409
    st = rec.converge(cr())
    assert kube.creates["Job"] == 1 and st["phase"] == Phase.profiling


def test_foreign_service_is_adopted_with_a_warning() -> None:
    kube = FakeKube()
    kube.store[("Service", NS, NAME)] = {"metadata": {"name": NAME, "namespace": NS}}
    rec = reconciler(kube)
    rec.converge(cr(profiling={"enabled": False}))
    assert ("Warning", "ChildNotOwned") in rec.events  # type: ignore[attr-defined]
    assert "Service" not in kube.creates


def test_profiling_failure_sets_reason_and_stops() -> None:
    kube = FakeKube()
    rec = reconciler(kube)
    body = apply(cr(), rec.converge(cr()))
    kube.finish_job("Traceback ...\nRuntimeError: CUDA out of memory", exit_code=1)
    st = rec.tick(body)
    assert st["phase"] == Phase.failed
    status, reason = conds(st)["Profiled"]
    assert (status, reason) == ("False", "ProfilingFailed")
    message = next(c["message"] for c in st["conditions"] if c["type"] == "Profiled")
    assert "BackoffLimitExceeded" in message and "CUDA out of memory" in message
    assert "Deployment" not in kube.creates
    body = apply(body, st)
    assert not rec.needs_converge(body)
    assert rec.tick(body) == {}  # Failed waits for a spec change


def test_invalid_profile_json_is_reported() -> None:
    kube = FakeKube()
    rec = reconciler(kube)
    body = apply(cr(), rec.converge(cr()))
    kube.finish_job('{"schemaVersion": 1}')
    st = rec.tick(body)
    assert conds(st)["Profiled"] == ("False", "ProfileInvalid")
    assert st["phase"] == Phase.failed


def test_invalid_spec_touches_nothing_and_names_the_field() -> None:
    kube = FakeKube()
    rec = reconciler(kube)
    st = rec.converge(cr(autoscaling={"enabled": True, "minReplicas": 3, "maxReplicas": 2}))
    assert st["phase"] == Phase.failed
    assert conds(st)["Validated"] == ("False", "InvalidSpec")
    message = st["conditions"][0]["message"]
    assert "spec.autoscaling.minReplicas" in message
    assert kube.store == {}


def _deployed(kube: FakeKube, rec: Reconciler, body: Body) -> Body:
    body = apply(body, rec.converge(body))
    kube.finish_job(profile_json())
    body = apply(body, rec.tick(body))
    kube.make_available()
    return apply(body, rec.tick(body))


def test_spec_change_rolls_pods_but_scaling_does_not() -> None:
    kube = FakeKube()
    rec = reconciler(kube)
    body = _deployed(kube, rec, cr())
    hash0 = kube.one("Deployment")["spec"]["template"]["metadata"]["annotations"][
        resources.SPEC_HASH_ANNOTATION
    ]
    scaled = copy.deepcopy(body)
    scaled["spec"]["replicas"] = 3
    scaled["metadata"]["generation"] = 2
    rec.converge(scaled)
    dep = kube.one("Deployment")
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["template"]["metadata"]["annotations"][
        resources.SPEC_HASH_ANNOTATION] == hash0  # fmt: skip
    new_args = copy.deepcopy(scaled)
    new_args["spec"]["engine"]["extraArgs"] = ["--max-batch", "16"]
    new_args["metadata"]["generation"] = 3
    rec.converge(new_args)
    dep = kube.one("Deployment")
    assert dep["spec"]["template"]["metadata"]["annotations"][
        resources.SPEC_HASH_ANNOTATION] != hash0  # fmt: skip
    assert dep["spec"]["template"]["spec"]["containers"][0]["args"][-2:] == ["--max-batch", "16"]
    assert kube.creates["Deployment"] == 1 and kube.creates["Job"] == 1
    assert "RollingUpdate" in [e[1] for e in rec.events]  # type: ignore[attr-defined]


def test_slo_change_writes_a_new_policy_generation_without_rolling() -> None:
    kube = FakeKube()
    rec = reconciler(kube)
    body = _deployed(kube, rec, cr())
    hash0 = kube.one("Deployment")["metadata"]["annotations"][resources.SPEC_HASH_ANNOTATION]
    tighter = copy.deepcopy(body)
    tighter["spec"]["slo"] = {"tpotMs": 30}
    tighter["metadata"]["generation"] = 2
    st = rec.converge(tighter)
    policy = parse_policy(kube.store[("ConfigMap", NS, "chat-policy")]["data"]["policy.json"])
    assert policy.generation == 2 and policy.tpot_budget_ms == 30.0
    assert "SLO 50→30 ms" in st["policyHistory"][-1]["reason"]
    assert kube.one("Deployment")["metadata"]["annotations"][
        resources.SPEC_HASH_ANNOTATION] == hash0  # fmt: skip


def test_profiling_disabled_deploys_directly() -> None:
    kube = FakeKube()
    rec = reconciler(kube)
    st = rec.converge(cr(profiling={"enabled": False}))
    assert conds(st)["Profiled"] == ("False", "ProfilingDisabled")
    assert "Job" not in kube.creates and kube.creates["Deployment"] == 1
    args = kube.one("Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--profile-file" not in args


def test_timer_runs_the_controller_and_acts() -> None:
    kube = FakeKube()
    clock = Clock()
    seen: list[str] = []
    plain_too_slow = [False]

    def observe(url: str, queries: Any) -> control.Observation:
        seen.append(queries.tpot_slo())
        return control.Observation(
            tpot_ms=80.0, tpot_p90_ms=80.0, request_rate=3.0, acceptance_rate=0.6,
            mean_draft_length=2.0, infeasible=plain_too_slow[0], sample_age_s=3.0,
            engine_policy_generation=1,
        )  # fmt: skip

    rec = reconciler(kube, clock, observe=observe)
    body = _deployed(
        kube, rec, cr(autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 3})
    )
    assert seen  # the Ready tick already evaluated once
    assert conds(body["status"])["SLOMet"] == ("False", "SLOBreached")
    assert body["status"]["phase"] == Phase.degraded
    policy = parse_policy(kube.store[("ConfigMap", NS, "chat-policy")]["data"]["policy.json"])
    assert policy.generation == 1  # dwell: the initial policy was written just now
    assert body["status"]["observed"]["tpotP90Ms"] == 80.0
    n = len(seen)
    clock.t += 5  # within the control interval: no new evaluation
    rec.tick(body)
    assert len(seen) == n
    clock.t += 26  # past the interval and the dwell: tighten
    body = apply(body, rec.tick(body))
    policy = parse_policy(kube.store[("ConfigMap", NS, "chat-policy")]["data"]["policy.json"])
    assert policy.generation == 2 and policy.tpot_budget_ms < 50.0
    assert body["status"]["policy"]["generation"] == 2
    assert "tighten" in body["status"]["policyHistory"][-1]["reason"]
    plain_too_slow[0] = True  # now even plain decoding breaks the budget
    clock.t += 16
    body = apply(body, rec.tick(body))
    assert conds(body["status"])["SLOFeasible"] == ("False", "PlainDecodingTooSlow")
    clock.t += 31  # infeasible for > scale_up_after_s → scale through the scale subresource
    body = apply(body, rec.tick(body))
    assert kube.scaled == 2
    assert "scale 1→2" in body["status"]["policyHistory"][-1]["reason"]
    assert len(body["status"]["policyHistory"]) <= 10


def _breach_observer(tpot_ms: float, running: float) -> Any:
    def observe(url: str, queries: Any) -> control.Observation:
        return control.Observation(
            tpot_ms=tpot_ms, tpot_p90_ms=tpot_ms, request_rate=3.0, sample_age_s=3.0,
            infeasible=False, engine_policy_generation=1, mean_running=running,
        )  # fmt: skip

    return observe


def test_the_profiled_time_model_floors_the_budget() -> None:
    # profile_json(): plain step = 30 + (1.0 + 0.8)·B ms → 39 ms at B = 5 running requests
    kube, clock = FakeKube(), Clock()
    rec = reconciler(kube, clock, observe=_breach_observer(200.0, running=5.0))
    body = _deployed(kube, rec, cr())
    clock.t += 31  # past the control interval and the dwell
    body = apply(body, rec.tick(body))
    policy = parse_policy(kube.store[("ConfigMap", NS, "chat-policy")]["data"]["policy.json"])
    assert policy.tpot_budget_ms == pytest.approx(39.0)  # 25 ms without the floor
    assert "predicted plain decoding step 39.0 ms at 5.0 running" in policy.reason

    kube, clock = FakeKube(), Clock()  # an SLO below the plain step: held, and said so
    rec = reconciler(kube, clock, observe=_breach_observer(60.0, running=5.0))
    body = _deployed(kube, rec, cr(slo={"tpotMs": 35}))
    clock.t += 31
    body = apply(body, rec.tick(body))
    assert conds(body["status"])["SLOFeasible"] == ("False", "SLOBelowPlainStep")
    feasible = next(c for c in body["status"]["conditions"] if c["type"] == "SLOFeasible")
    assert "39.0 ms" in feasible["message"]
    policy = parse_policy(kube.store[("ConfigMap", NS, "chat-policy")]["data"]["policy.json"])
    assert policy.generation == 1 and policy.tpot_budget_ms == 35.0


def test_without_a_profile_there_is_no_floor() -> None:
    kube, clock = FakeKube(), Clock()
    rec = reconciler(kube, clock, observe=_breach_observer(200.0, running=5.0))
    body = apply(cr(profiling={"enabled": False}), rec.converge(cr(profiling={"enabled": False})))
    kube.make_available()
    body = apply(body, rec.tick(body))
    clock.t += 31
    body = apply(body, rec.tick(body))
    policy = parse_policy(kube.store[("ConfigMap", NS, "chat-policy")]["data"]["policy.json"])
    assert policy.tpot_budget_ms == pytest.approx(25.0)  # max_step_down only


def test_timer_without_prometheus_reports_not_configured() -> None:
    kube = FakeKube()
    rec = Reconciler(kube, OperatorSettings(), clock=Clock())
    body = _deployed(kube, rec, cr())
    assert conds(body["status"])["MetricsAvailable"] == ("False", "PrometheusNotConfigured")
    assert body["status"]["phase"] == Phase.ready  # no verdict is not a breach


def test_deleted_deployment_is_recreated_by_the_timer() -> None:
    kube = FakeKube()
    rec = reconciler(kube)
    body = _deployed(kube, rec, cr())
    del kube.store[("Deployment", NS, "chat-engine")]
    rec.tick(body)
    assert ("Deployment", NS, "chat-engine") in kube.store


def test_pod_monitor_only_when_the_api_exists() -> None:
    kube = FakeKube()
    reconciler(kube).converge(cr(profiling={"enabled": False}))
    assert "PodMonitor" not in kube.creates
    kube2 = FakeKube()
    kube2.pod_monitors = True
    reconciler(kube2).converge(cr(profiling={"enabled": False}))
    pm = kube2.one("PodMonitor")
    assert pm["spec"]["podTargetLabels"] == ["specserve.io/service"]


def test_condition_types_are_the_documented_ones() -> None:
    assert [c.value for c in ConditionType] == [
        "Validated", "Profiled", "Available", "MetricsAvailable", "SLOMet", "SLOFeasible",
    ]  # fmt: skip
