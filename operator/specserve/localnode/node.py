"""The Node object and its heartbeat documents (pure builders)."""

from __future__ import annotations

import datetime as dt
import os
import platform
from typing import Any

from specserve.localnode.status import rfc3339

AGENT_VERSION = "v1.20.2-specserve-localnode"
LOCAL_NODE_LABEL = "specserve.io/local-node"
LEASE_DURATION_S = 40


def micro_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def host_memory_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def node_object(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                LOCAL_NODE_LABEL: "true",
                **(labels or {}),
            },
        },
        "spec": {},
    }


def node_status(
    *, name: str, cpu: str, memory: str, gpus: int, pods: int, now: float, since: float
) -> dict[str, Any]:
    """Capacity (optionally a fake `nvidia.com/gpu`), Ready condition and node info."""
    capacity: dict[str, str] = {
        "cpu": cpu,
        "memory": memory,
        "pods": str(pods),
        "ephemeral-storage": "100Gi",
    }
    if gpus > 0:
        capacity["nvidia.com/gpu"] = str(gpus)

    def cond(ctype: str, status: str, reason: str, message: str) -> dict[str, Any]:
        return {
            "type": ctype,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": rfc3339(now),
            "lastTransitionTime": rfc3339(since),
        }

    return {
        "capacity": capacity,
        "allocatable": dict(capacity),
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "local node agent"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "local node agent"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "local node agent"),
            cond("Ready", "True", "KubeletReady", "specserve local node agent is posting status"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
            "kernelVersion": platform.release(),
            "osImage": "specserve local processes",
            "containerRuntimeVersion": "localnode://0",
            "kubeletVersion": AGENT_VERSION,
            "kubeProxyVersion": AGENT_VERSION,
            "operatingSystem": "linux",
            "architecture": "amd64",
        },
    }


def lease_object(name: str, now: float) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": "kube-node-lease"},
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": LEASE_DURATION_S,
            "renewTime": micro_time(now),
        },
    }
