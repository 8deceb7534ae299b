"""The node agent loop: register + heartbeat the Node, start/stop a PodWorker per bound pod.

Pods are found by polling (LIST pods with fieldSelector spec.nodeName=<node> every `sync_s`):
on a local API server that is cheap, and it needs no watch/resync/410 handling.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from specserve.localnode import node as nodedocs
from specserve.localnode.addresses import AddressPool
from specserve.localnode.podrun import PodApi, PodWorker, default_base_env

log = logging.getLogger("specserve.localnode")


class AgentApi(PodApi, Protocol):
    def ensure_node(self, node: Mapping[str, Any]) -> None: ...
    def patch_node_status(self, name: str, status: Mapping[str, Any]) -> None: ...
    def renew_lease(self, lease: Mapping[str, Any]) -> None: ...
    def pods_on_node(self, node: str) -> list[dict[str, Any]]: ...


class NodeAgent:
    def __init__(
        self,
        api: AgentApi,
        *,
        node_name: str = "local-node",
        work_dir: Path,
        cpu: str = "2",
        memory: str | None = None,
        gpus: int = 0,
        max_pods: int = 32,
        pod_network: str = "127.0.10.0/24",
        heartbeat_s: float = 10.0,
        sync_s: float = 0.5,
        backoff_base_s: float = 2.0,
    ) -> None:
        self.api = api
        self.node_name = node_name
        self.work_dir = work_dir
        self.cpu = cpu
        self.memory = memory or f"{nodedocs.host_memory_bytes() // 1024}Ki"
        self.gpus = gpus
        self.max_pods = max_pods
        self.pool = AddressPool(pod_network)
        self.heartbeat_s = heartbeat_s
        self.sync_s = sync_s
        self.backoff_base_s = backoff_base_s
        self.base_env = default_base_env()
        self.workers: dict[str, PodWorker] = {}
        self._started: list[PodWorker] = []  # every worker ever started, for stop()
        self._stop = threading.Event()
        self._since = time.time()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ node
    def register(self) -> None:
        self.api.ensure_node(nodedocs.node_object(self.node_name))
        self.heartbeat()

    def heartbeat(self) -> None:
        now = time.time()
        self.api.patch_node_status(
            self.node_name,
            nodedocs.node_status(
                name=self.node_name,
                cpu=self.cpu,
                memory=self.memory,
                gpus=self.gpus,
                pods=self.max_pods,
                now=now,
                since=self._since,
            ),
        )
        self.api.renew_lease(nodedocs.lease_object(self.node_name, now))

    # ------------------------------------------------------------------ pods
    def sync_once(self) -> None:
        pods = self.api.pods_on_node(self.node_name)
        seen: set[str] = set()
        for pod in pods:
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            worker = self.workers.get(uid)
            deleting = pod["metadata"].get("deletionTimestamp") is not None
            if worker is None:
                if deleting:  # never started here: nothing to stop
                    self._finalize_untracked(pod)
                    continue
                worker = PodWorker(
                    self.api,
                    pod,
                    self.pool,
                    self.work_dir,
                    self.base_env,
                    backoff_base_s=self.backoff_base_s,
                )
                self.workers[uid] = worker
                self._started.append(worker)
                worker.start()
            elif deleting and not worker.stopping:
                grace = pod["metadata"].get("deletionGracePeriodSeconds")
                if grace is None:
                    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
                log.info("pod %s: deleted, stopping (grace %ss)", worker.pod_name, grace)
                worker.request_stop(float(grace))
        for uid in [u for u in self.workers if u not in seen]:
            worker = self.workers.pop(uid)
            if not worker.stopping:  # removed behind our back (force delete)
                worker.request_stop(2.0, finalize=False)

    def _finalize_untracked(self, pod: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            self.api.finalize_pod(meta["namespace"], meta["name"], meta["uid"])
        except Exception as e:
            log.warning("pod %s: finalize failed: %s", meta["name"], e)

    # ------------------------------------------------------------------ loops
    def start(self) -> None:
        """Register the node and run the loops in background threads."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.register()
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._sync_loop, "sync")):
            t = threading.Thread(target=target, name=f"localnode-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info(
            "node %s registered (cpu=%s memory=%s gpus=%d), pods on %s",
            self.node_name,
            self.cpu,
            self.memory,
            self.gpus,
            self.pool.network,
        )

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.heartbeat()
            except Exception as e:
                log.warning("heartbeat failed: %s", e)

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception as e:
                log.warning("pod sync failed: %s", e)
            self._stop.wait(self.sync_s)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the loops and every process this agent started; pod objects are left as is."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5.0)
        workers = list(self._started)
        for w in workers:
            if not w.stopping:
                w.request_stop(grace_s, finalize=False)
        for w in workers:
            w.join(timeout=grace_s + 5.0)
        for w in workers:  # a worker that did not finish in time: no process may outlive us
            w.kill_processes()
        self.workers.clear()
        self._started.clear()
