"""`specserve node-agent`: run the local node agent until SIGINT/SIGTERM (dev/test tool)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import tempfile
import threading
from pathlib import Path
from types import FrameType

from specserve.localnode.agent import NodeAgent
from specserve.localnode.api import NodeApi, api_client_from_kubeconfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="kubeconfig path")
    p.add_argument("--node-name", default="local-node")
    p.add_argument("--cpu", default=str(os.cpu_count() or 2), help="cpu capacity (default: cores)")
    p.add_argument("--memory", default=None, help="memory capacity, e.g. 16Gi (default: host)")
    p.add_argument("--gpus", type=int, default=0, help="fake nvidia.com/gpu capacity")
    p.add_argument("--max-pods", type=int, default=32)
    p.add_argument("--pod-network", default="127.0.10.0/24", help="loopback range for pod IPs")
    p.add_argument("--work-dir", default=None, help="pod dirs (default: a new temp dir)")
    p.add_argument("--heartbeat", type=float, default=10.0, help="node heartbeat period (s)")
    p.add_argument("-v", "--verbose", action="store_true")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.gpus < 0:
        print("node-agent: --gpus must be >= 0")
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="specserve-localnode-"))
    api = NodeApi(api_client_from_kubeconfig(args.kubeconfig))
    agent = NodeAgent(
        api,
        node_name=args.node_name,
        work_dir=work,
        cpu=args.cpu,
        memory=args.memory,
        gpus=args.gpus,
        max_pods=args.max_pods,
        pod_network=args.pod_network,
        heartbeat_s=args.heartbeat,
    )
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.start()
    print(f"node-agent: node {args.node_name} up, pod dirs in {work}", flush=True)
    done.wait()
    agent.stop()
    return 0
