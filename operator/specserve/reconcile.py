"""The reconcile logic behind the kopf handlers, with its I/O behind two small seams
(`Kube`-like client and an event callback) so that it runs against a fake in unit tests.

Restart safety: every child has a deterministic name; every step looks up or creates
(409 AlreadyExists → read the existing object), and progress lives in the cluster (Job status,
ConfigMap annotations, SpecService status) — never in operator memory. Killing the operator
between any two calls and running `converge` again reaches the same objects, never second ones.

Two entry points:
  converge(body) — spec → children (validate, profiling Job, profile/policy ConfigMaps,
                   Deployment, Service, PodMonitor). Never blocks: while the Job runs it returns
                   phase Profiling and the periodic `tick` calls it again.
  tick(body)     — periodic: converge when the spec generation is not yet handled or profiling
                   is under way; otherwise Deployment availability and, every control interval,
                   the SLO controller (Prometheus → specserve.control → policy ConfigMap, scale).
Both return a status patch (JSON merge patch for .status).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol

from adaspec.contract import ContractError, Policy, TimeModel, parse_policy, parse_profile
from specserve import control, prom, resources
from specserve.api import ConditionType, Phase, SpecServiceSpec
from specserve.kube import KubeError
from specserve.settings import OperatorSettings
from specserve.status import (
    append_history,
    availability,
    deployment_counts,
    failure_detail,
    get_condition,
    history_entry,
    job_state,
    memory_from_status,
    memory_to_status,
    observed_status,
    parse_time,
    phase_after_deploy,
    policy_for_spec,
    policy_status,
    profile_summary,
    set_condition,
    termination_message,
)
from specserve.validation import validate_spec

Body = dict[str, Any]
log = logging.getLogger("specserve")


class KubeLike(Protocol):
    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Body | None: ...
    def ensure(self, obj: Mapping[str, Any]) -> tuple[Body, bool]: ...
    def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str = "",
        content_type: str = ...,
    ) -> Body: ...
    def list(
        self, api_version: str, kind: str, namespace: str, label_selector: str = ""
    ) -> list[Body]: ...
    def has_api(self, group_version: str, kind: str) -> bool: ...
    def scale(self, namespace: str, name: str, replicas: int) -> Body: ...


EmitFn = Callable[[Mapping[str, Any], str, str, str], None]
"""emit(owner body, type Normal|Warning, reason, message)"""

ObserveFn = Callable[[str, prom.Queries], control.Observation]
"""observe(prometheus url, queries) -> Observation"""


def observe_with_httpx(timeout_s: float) -> ObserveFn:
    def observe(url: str, queries: prom.Queries) -> control.Observation:
        with prom.PrometheusClient(url, timeout_s=timeout_s) as client:
            return prom.collect(client, queries)

    return observe


def _owned_by(obj: Mapping[str, Any], owner: Mapping[str, Any]) -> bool:
    uid = owner["metadata"].get("uid")
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


class Reconciler:
    def __init__(
        self,
        kube: KubeLike,
        settings: OperatorSettings,
        *,
        emit: EmitFn | None = None,
        observe: ObserveFn | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.emit: EmitFn = emit or (lambda *_: None)
        self.observe = observe or observe_with_httpx(settings.prom_timeout_s)
        self.clock = clock
        self._pod_monitor_api: bool | None = None

    # ================================================================== converge

    def converge(self, body: Mapping[str, Any]) -> Body:
        meta = body["metadata"]
        name = meta["name"]
        gen = meta.get("generation")
        status: Mapping[str, Any] = body.get("status") or {}
        now = self.clock()
        conds = list(status.get("conditions") or [])
        out: Body = {"selector": resources.selector_string(name)}

        v = validate_spec(body.get("spec"), name)
        if not v.ok or v.spec is None:
            old = get_condition(conds, ConditionType.validated) or {}
            if old.get("message") != v.message():
                self.emit(body, "Warning", "InvalidSpec", v.message())
            conds = set_condition(
                conds, ConditionType.validated, "False", "InvalidSpec", v.message(),
                now=now, generation=gen,
            )  # fmt: skip
            return {**out, "phase": Phase.failed, "conditions": conds, "observedGeneration": gen}
        spec = v.spec
        conds = set_condition(
            conds, ConditionType.validated, "True", "SpecValid", "spec accepted",
            now=now, generation=gen,
        )  # fmt: skip

        # ---- 1. profile
        profile_digest: str | None = None
        if spec.profiling.enabled:
            step = self._profile(body, spec, conds, now, gen)
            conds = step["conditions"]
            if "phase" in step:  # still running or failed: stop here
                result = {**out, "phase": step["phase"], "conditions": conds}
                if step["phase"] == Phase.failed:
                    result["observedGeneration"] = gen
                return result
            out["profile"] = step["summary"]
            profile_digest = step["digest"]
        else:
            conds = set_condition(
                conds, ConditionType.profiled, "False", "ProfilingDisabled",
                "spec.profiling.enabled is false: the engine uses its default time model",
                now=now, generation=gen,
            )  # fmt: skip
            out["profile"] = None

        # ---- 2. policy ConfigMap
        policy, reason = self._ensure_policy(body, spec)
        out["policy"] = policy_status(policy)
        if reason:  # a new policy generation was written: record it, restart the dwell timer
            entry = control.HistoryEntry(
                time=now,
                generation=policy.generation,
                tpot_budget_ms=policy.tpot_budget_ms,
                max_draft_tokens=policy.max_draft_tokens,
                replicas=spec.replicas,
                observed_tpot_ms=None,
                reason=reason,
            )
            out["policyHistory"] = append_history(
                status.get("policyHistory") or [], history_entry(entry)
            )
            memory = replace(memory_from_status(status), last_policy_change=now)
            out["control"] = memory_to_status(
                memory, parse_time((status.get("control") or {}).get("lastEvaluated"))
            )

        # ---- 3. Deployment, Service, PodMonitor
        dep = self._ensure_deployment(body, spec, profile_digest)
        svc, created = self.kube.ensure(resources.engine_service(body, spec))
        if not created and not _owned_by(svc, body):
            self.emit(
                body,
                "Warning",
                "ChildNotOwned",
                f"Service {svc['metadata']['name']} already exists and is not owned by this "
                "SpecService; it is left as it is (delete it to let the operator create its own)",
            )
        self._ensure_pod_monitor(body, spec)
        out["specHash"] = resources.pod_spec_hash(spec, profile_digest)

        # ---- 4. availability
        out.update(self._availability(dep, spec, conds, status, now, gen))
        out["observedGeneration"] = gen
        return out

    def _profile(
        self,
        body: Mapping[str, Any],
        spec: SpecServiceSpec,
        conds: list[Body],
        now: float,
        gen: int | None,
    ) -> Body:
        meta = body["metadata"]
        name, ns = meta["name"], meta["namespace"]
        key = resources.profile_key(spec)
        cm_name = resources.profile_configmap_name(name)
        job_name = resources.profile_job_name(name, key)

        def profiled(status: str, reason: str, message: str) -> list[Body]:
            return set_condition(
                conds, ConditionType.profiled, status, reason, message, now=now, generation=gen
            )

        cm = self.kube.get("v1", "ConfigMap", ns, cm_name)
        text = None
        if cm is not None:
            ann = (cm.get("metadata") or {}).get("annotations") or {}
            if ann.get(resources.PROFILE_KEY_ANNOTATION) == key:
                text = (cm.get("data") or {}).get("profile.json")
        if text is not None:
            try:
                profile = parse_profile(text)
            except ContractError:
                text = None  # a damaged ConfigMap: rebuild it from the Job below
        if text is None:
            job, created = self.kube.ensure(resources.profiling_job(body, spec))
            if created:
                self.emit(body, "Normal", "ProfilingStarted", f"profiling Job {job_name} created")
            state, detail = job_state(job)
            if state == "running":
                return {
                    "phase": Phase.profiling,
                    "conditions": profiled(
                        "False", "Profiling", f"profiling Job {job_name} running ({detail})"
                    ),
                }
            pods = self.kube.list("v1", "Pod", ns, f"job-name={job_name}")
            if state == "failed":
                why = failure_detail(pods)
                message = (
                    f"profiling Job {job_name} failed: {detail}"
                    + (f"; last container {why}" if why else "")
                    + f" (delete Job {job_name} and change the spec to profile again)"
                )
                old = get_condition(conds, ConditionType.profiled) or {}
                if old.get("reason") != "ProfilingFailed":
                    self.emit(body, "Warning", "ProfilingFailed", message)
                return {
                    "phase": Phase.failed,
                    "conditions": profiled("False", "ProfilingFailed", message),
                }
            raw = termination_message(pods)
            if raw is None:
                message = f"profiling Job {job_name} succeeded but left no termination message"
                self.emit(body, "Warning", "ProfileMissing", message)
                return {
                    "phase": Phase.failed,
                    "conditions": profiled("False", "ProfileMissing", message),
                }
            try:
                profile = parse_profile(raw)
            except ContractError as e:
                message = f"profiling Job {job_name}: {e}"
                self.emit(body, "Warning", "ProfileInvalid", message)
                return {
                    "phase": Phase.failed,
                    "conditions": profiled("False", "ProfileInvalid", message),
                }
            text = profile.to_json()
            cm_body = resources.profile_configmap(body, text, key)
            _, created = self.kube.ensure(cm_body)
            if not created:
                self.kube.patch(
                    "v1", "ConfigMap", ns, cm_name,
                    {"metadata": {"annotations": cm_body["metadata"]["annotations"]},
                     "data": cm_body["data"]},
                )  # fmt: skip
            self.emit(body, "Normal", "Profiled", f"profile stored in ConfigMap {cm_name}")
        return {
            "conditions": profiled(
                "True", "ProfileReady", f"profile {key[:8]} in ConfigMap {cm_name}"
            ),
            "summary": profile_summary(profile, cm_name, job_name, key),
            "digest": resources.content_digest(text),
        }

    def _profiled_time_model(self, ns: str, name: str, spec: SpecServiceSpec) -> TimeModel | None:
        """The time model of the profile the engines load (the ConfigMap converge wrote for
        this spec), for the controller's plain-step floor; None when not profiled or unusable."""
        if not spec.profiling.enabled:
            return None
        cm = self.kube.get("v1", "ConfigMap", ns, resources.profile_configmap_name(name))
        if cm is None:
            return None
        ann = (cm.get("metadata") or {}).get("annotations") or {}
        if ann.get(resources.PROFILE_KEY_ANNOTATION) != resources.profile_key(spec):
            return None  # a stale profile (spec changed): converge replaces it
        try:
            return parse_profile((cm.get("data") or {}).get("profile.json", "")).time_model
        except ContractError as e:
            log.warning("profile ConfigMap of %s/%s is invalid: %s", ns, name, e)
            return None

    def _read_policy(self, ns: str, name: str) -> tuple[Body | None, Policy | None]:
        cm = self.kube.get("v1", "ConfigMap", ns, resources.policy_configmap_name(name))
        if cm is None:
            return None, None
        try:
            return cm, parse_policy((cm.get("data") or {}).get("policy.json", ""))
        except ContractError as e:
            log.warning("policy ConfigMap of %s/%s is invalid, rewriting it: %s", ns, name, e)
            return cm, None

    def _write_policy(self, body: Mapping[str, Any], policy: Policy, exists: bool) -> None:
        meta = body["metadata"]
        cm = resources.policy_configmap(body, policy)
        if not exists:
            _, created = self.kube.ensure(cm)
            if created:
                return
        self.kube.patch(
            "v1",
            "ConfigMap",
            meta["namespace"],
            resources.policy_configmap_name(meta["name"]),
            {"data": cm["data"]},
        )

    def _ensure_policy(self, body: Mapping[str, Any], spec: SpecServiceSpec) -> tuple[Policy, str]:
        meta = body["metadata"]
        cm, current = self._read_policy(meta["namespace"], meta["name"])
        s = spec.speculation
        policy, reason = policy_for_spec(
            current, spec.slo.tpot_ms, s.mode, s.max_draft_tokens, s.fixed_draft_tokens
        )
        if reason:
            self._write_policy(body, policy, exists=cm is not None)
            if current is not None:
                self.emit(
                    body, "Normal", "PolicyChanged", f"generation {policy.generation}: {reason}"
                )
        return policy, reason

    def _ensure_deployment(
        self, body: Mapping[str, Any], spec: SpecServiceSpec, profile_digest: str | None
    ) -> Body:
        meta = body["metadata"]
        want = resources.engine_deployment(body, spec, profile_digest)
        dep, created = self.kube.ensure(want)
        if created:
            self.emit(body, "Normal", "Deploying", f"Deployment {want['metadata']['name']} created")
            return dep
        have_hash = ((dep.get("metadata") or {}).get("annotations") or {}).get(
            resources.SPEC_HASH_ANNOTATION
        )
        want_hash = want["metadata"]["annotations"][resources.SPEC_HASH_ANNOTATION]
        dname = want["metadata"]["name"]
        if have_hash != want_hash:
            # Replace the whole pod template (a merge patch would keep removed keys).
            patch = {
                "metadata": {"annotations": want["metadata"]["annotations"]},
                "spec": {
                    "replicas": spec.replicas,
                    "template": want["spec"]["template"],
                    "strategy": want["spec"]["strategy"],
                },
            }
            dep = self.kube.patch(
                "apps/v1", "Deployment", meta["namespace"], dname, patch,
                content_type="application/merge-patch+json",
            )  # fmt: skip
            self.emit(body, "Normal", "RollingUpdate", f"engine pod spec changed ({want_hash})")
        elif (dep.get("spec") or {}).get("replicas") != spec.replicas:
            dep = self.kube.patch(
                "apps/v1", "Deployment", meta["namespace"], dname,
                {"spec": {"replicas": spec.replicas}},
            )  # fmt: skip
        return dep

    def _ensure_pod_monitor(self, body: Mapping[str, Any], spec: SpecServiceSpec) -> None:
        if self._pod_monitor_api is None:
            try:
                self._pod_monitor_api = self.kube.has_api("monitoring.coreos.com/v1", "PodMonitor")
            except KubeError as e:
                log.info("cannot discover PodMonitor support: %s", e)
                return
        if not self._pod_monitor_api:
            return
        try:
            self.kube.ensure(resources.pod_monitor(body, spec))
        except KubeError as e:  # monitoring is optional: never block serving on it
            log.warning("PodMonitor for %s not created: %s", body["metadata"]["name"], e)

    def _availability(
        self,
        dep: Mapping[str, Any],
        spec: SpecServiceSpec,
        conds: list[Body],
        status: Mapping[str, Any],
        now: float,
        gen: int | None,
    ) -> Body:
        replicas, ready, available = deployment_counts(dep)
        st, reason, message = availability(dep, spec.replicas)
        conds = set_condition(
            conds, ConditionType.available, st, reason, message, now=now, generation=gen
        )
        slo = get_condition(conds, ConditionType.slo_met)
        slo_met = None if slo is None or slo["status"] == "Unknown" else slo["status"] == "True"
        phase = phase_after_deploy(
            st == "True", available >= spec.replicas, slo_met, status.get("phase")
        )
        return {
            "conditions": conds,
            "phase": phase,
            "replicas": replicas,
            "readyReplicas": ready,
        }

    # ================================================================== tick

    def needs_converge(self, body: Mapping[str, Any]) -> bool:
        status = body.get("status") or {}
        gen = body["metadata"].get("generation")
        return status.get("observedGeneration") != gen or status.get("phase") in (
            None,
            Phase.pending,
            Phase.profiling,
        )

    def tick(self, body: Mapping[str, Any]) -> Body:
        if self.needs_converge(body):
            return self.converge(body)
        status: Mapping[str, Any] = body.get("status") or {}
        if status.get("phase") == Phase.failed:
            return {}
        meta = body["metadata"]
        name, ns = meta["name"], meta["namespace"]
        v = validate_spec(body.get("spec"), name)
        if v.spec is None or not v.ok:
            return {}
        spec = v.spec
        now = self.clock()
        gen = meta.get("generation")
        dep = self.kube.get("apps/v1", "Deployment", ns, resources.engine_name(name))
        if dep is None:  # deleted behind our back: make it again
            return self.converge(body)
        conds = list(status.get("conditions") or [])
        out: Body = {}
        last = parse_time((status.get("control") or {}).get("lastEvaluated"))
        available = (availability(dep, spec.replicas)[0]) == "True"
        if available and (last is None or now - last >= self.settings.control_interval_s):
            out = self._control(body, spec, status, now, gen)
            conds = out.pop("conditions")
        avail = self._availability(dep, spec, conds, status, now, gen)
        out.update(avail)
        return out

    def _control(
        self,
        body: Mapping[str, Any],
        spec: SpecServiceSpec,
        status: Mapping[str, Any],
        now: float,
        gen: int | None,
    ) -> Body:
        meta = body["metadata"]
        name, ns = meta["name"], meta["namespace"]
        cm, policy = self._read_policy(ns, name)
        if policy is None:  # lost or damaged: converge writes it again
            policy, _ = self._ensure_policy(body, spec)
            cm = {}
        url = spec.prometheus.url or self.settings.prometheus_url
        queries = prom.Queries(
            prom.Scope(ns, name, self.settings.namespace_label, self.settings.service_label),
            window=self.settings.prom_window,
            percentile=spec.slo.percentile,
        )
        if url is None:
            obs = control.Observation(
                error="no Prometheus URL: set spec.prometheus.url or SPECSERVE_PROMETHEUS_URL",
                error_reason=control.PROMETHEUS_NOT_CONFIGURED,
            )
        else:
            obs = self.observe(url, queries)
        decision = control.step(
            spec=spec,
            policy=policy,
            replicas=spec.replicas,
            obs=obs,
            memory=memory_from_status(status),
            now=now,
            cfg=self.settings.controller,
            time_model=self._profiled_time_model(ns, name, spec) if obs.error is None else None,
        )
        conds = list(status.get("conditions") or [])
        old_metrics = get_condition(conds, ConditionType.metrics_available) or {}
        for ctype, c in decision.conditions.items():
            conds = set_condition(
                conds, ctype, c.status, c.reason, c.message, now=now, generation=gen
            )
        new_metrics = decision.conditions[ConditionType.metrics_available]
        if old_metrics.get("reason") != new_metrics.reason and new_metrics.status != "True":
            self.emit(body, "Warning", new_metrics.reason, new_metrics.message)
        out: Body = {
            "conditions": conds,
            "control": memory_to_status(decision.memory, now),
            "policy": policy_status(decision.policy),
        }
        if decision.metrics_ok:
            out["observed"] = observed_status(obs, now)
        if decision.policy_changed:
            self._write_policy(body, decision.policy, exists=cm is not None)
            self.emit(
                body,
                "Normal",
                "PolicyChanged",
                f"generation {decision.policy.generation}: {decision.policy.reason}",
            )
        if decision.replicas != spec.replicas:
            self.kube.scale(ns, name, decision.replicas)
            self.emit(body, "Normal", "Scaled", f"replicas {spec.replicas}→{decision.replicas}")
        if decision.history is not None:
            out["policyHistory"] = append_history(
                status.get("policyHistory") or [], history_entry(decision.history)
            )
        return out
