"""TEST HELPER — a fake kubelet: stands in for a node so pods "run" without containers.

The envtest control plane has no kubelet, so Deployments never become available and Jobs never
finish. This helper registers one Node (tainted and labelled so that only pods that select and
tolerate it land there, also on a real cluster), heartbeats it, and drives the status of pods
bound to it:
- a pod owned by a Job (the profiling Job) runs briefly and then terminates with the exit code and
  termination message that `job_outcome(pod)` returns. By default that is success with the
  fixture Profile JSON (tests/e2e/fixtures/profile.json). This is **fault/fixture injection by the
  test harness**: no real profiler runs here (a later issue runs real engine processes);
- every other pod becomes Running and Ready at once;
- a pod being deleted is removed at once (grace period 0), as a kubelet would confirm it.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

NODE_NAME = "specserve-e2e-fake-node"
NODE_LABEL = "specserve.io/e2e-fake-node"
FIXTURE_PROFILE = Path(__file__).parent / "fixtures" / "profile.json"

# What test SpecServices put in spec.engine to land on the fake node.
NODE_SELECTOR = {NODE_LABEL: "true"}
TOLERATIONS = [{"key": NODE_LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"}]


@dataclass(frozen=True)
class Termination:
    exit_code: int
    message: str


def fixture_profile_json() -> str:
    """The fixture Profile, compact (a termination message holds at most 4096 bytes)."""
    return json.dumps(
        json.loads(FIXTURE_PROFILE.read_text(encoding="utf-8")), separators=(",", ":")
    )


def succeed_with_fixture_profile(pod: Any) -> Termination:
    return Termination(0, fixture_profile_json())


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _owned_by_job(pod: Any) -> bool:
    return any(ref.kind == "Job" for ref in (pod.metadata.owner_references or []))


class FakeKubelet:
    """TEST HELPER (see module docstring). Start with `start()`, end with `stop()`."""

    def __init__(
        self,
        api: client.ApiClient,
        node_name: str = NODE_NAME,
        job_outcome: Callable[[Any], Termination] = succeed_with_fixture_profile,
        job_run_seconds: float = 0.3,
        heartbeat_seconds: float = 10.0,
    ) -> None:
        self.core: Any = client.CoreV1Api(api)
        self.node_name = node_name
        self.job_outcome = job_outcome
        self.job_run_seconds = job_run_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._seen: set[str] = set()  # pod uids whose status we already set (per phase key)
        self._lock = threading.Lock()
        self.errors: list[str] = []
        self._pod_ip = 10

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeKubelet:
        self._register_node()
        for target, name in (
            (self._watch_pods, "fake-kubelet-pods"),
            (self._heartbeat, "fake-kubelet-heartbeat"),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, delete_node: bool = True) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        self._threads.clear()
        if delete_node:
            try:
                self.core.delete_node(self.node_name)
            except ApiException as e:
                if e.status != 404:
                    raise

    # ------------------------------------------------------------------ node

    def _node_status(self) -> dict[str, Any]:
        capacity = {
            "cpu": "64",
            "memory": "256Gi",
            "pods": "110",
            "nvidia.com/gpu": "8",
            "ephemeral-storage": "500Gi",
        }
        now = _now()
        return {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "fake kubelet (test helper)",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node_name},
            ],
            "nodeInfo": {
                "kubeletVersion": "v1.20.2-fake",
                "kubeProxyVersion": "v1.20.2-fake",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": "",
                "osImage": "fake",
                "containerRuntimeVersion": "fake://0",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def _register_node(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    NODE_LABEL: "true",
                },
            },
            "spec": {"taints": [{"key": NODE_LABEL, "value": "true", "effect": "NoSchedule"}]},
        }
        try:
            self.core.create_node(body)
        except ApiException as e:
            if e.status != 409:
                raise
        self.core.patch_node_status(self.node_name, {"status": self._node_status()})

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                self.core.patch_node_status(self.node_name, {"status": self._node_status()})
            except Exception as e:  # keep beating; record for the test report
                self.errors.append(f"heartbeat: {e}")

    # ------------------------------------------------------------------ pods

    def _watch_pods(self) -> None:
        while not self._stop.is_set():
            w = watch.Watch()
            try:
                for event in w.stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=f"spec.nodeName={self.node_name}",
                    timeout_seconds=5,
                ):
                    if self._stop.is_set():
                        break
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._handle(event["object"])
            except Exception as e:  # a broken stream is retried; keep the reason
                if not self._stop.is_set():
                    self.errors.append(f"watch: {e}")
                    time.sleep(0.5)
            finally:
                w.stop()

    def _once(self, key: str) -> bool:
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            return True

    def _handle(self, pod: Any) -> None:
        meta = pod.metadata
        if meta.deletion_timestamp is not None:
            if self._once(f"{meta.uid}/deleted"):
                try:
                    self.core.delete_namespaced_pod(
                        meta.name, meta.namespace, grace_period_seconds=0
                    )
                except ApiException as e:
                    if e.status != 404:
                        self.errors.append(f"delete {meta.namespace}/{meta.name}: {e.reason}")
            return
        if pod.status.phase in ("Succeeded", "Failed"):
            return
        if not self._once(f"{meta.uid}/running"):
            return
        self._set_running(pod)
        if _owned_by_job(pod):
            timer = threading.Timer(self.job_run_seconds, self._terminate, args=(pod,))
            timer.daemon = True
            timer.start()

    def _patch_status(self, pod: Any, status: dict[str, Any]) -> None:
        try:
            self.core.patch_namespaced_pod_status(
                pod.metadata.name, pod.metadata.namespace, {"status": status}
            )
        except ApiException as e:
            if e.status != 404:
                self.errors.append(
                    f"status {pod.metadata.namespace}/{pod.metadata.name}: {e.reason}"
                )

    def _next_ip(self) -> str:
        with self._lock:
            self._pod_ip += 1
            return f"10.244.{self._pod_ip // 250}.{self._pod_ip % 250 + 1}"

    def _set_running(self, pod: Any) -> None:
        now = _now()
        cond = [
            {"type": t, "status": "True", "lastTransitionTime": now}
            for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
        ]
        self._patch_status(
            pod,
            {
                "phase": "Running",
                "conditions": cond,
                "hostIP": "127.0.0.1",
                "podIP": self._next_ip(),
                "startTime": now,
                "containerStatuses": [
                    {
                        "name": c.name,
                        "image": c.image,
                        "imageID": f"fake://{c.image}",
                        "containerID": f"fake://{pod.metadata.uid}/{c.name}",
                        "ready": True,
                        "started": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": now}},
                    }
                    for c in pod.spec.containers
                ],
            },
        )

    def _terminate(self, pod: Any) -> None:
        if self._stop.is_set():
            return
        outcome = self.job_outcome(pod)
        now = _now()
        ok = outcome.exit_code == 0
        cond = [
            {
                "type": t,
                "status": "False",
                "lastTransitionTime": now,
                "reason": "PodCompleted" if ok else "PodFailed",
            }
            for t in ("Ready", "ContainersReady")
        ]
        self._patch_status(
            pod,
            {
                "phase": "Succeeded" if ok else "Failed",
                "conditions": cond,
                "containerStatuses": [
                    {
                        "name": c.name,
                        "image": c.image,
                        "imageID": f"fake://{c.image}",
                        "containerID": f"fake://{pod.metadata.uid}/{c.name}",
                        "ready": False,
                        "started": False,
                        "restartCount": 0,
                        "state": {
                            "terminated": {
                                "exitCode": outcome.exit_code,
                                "reason": "Completed" if ok else "Error",
                                "message": outcome.message,
                                "startedAt": now,
                                "finishedAt": now,
                            }
                        },
                    }
                    for c in pod.spec.containers
                ],
            },
        )
