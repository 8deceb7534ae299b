"""CR -> engine Deployment created, and CR -> phase Ready, on a real Kubernetes API server.

Starts the same stack as the e2e tests (etcd + kube-apiserver + controller-manager + scheduler
1.20.2 from `make envtest`, the fake-kubelet test helper, the Helm chart's CRD and RBAC, and the
operator as a local process with the chart's ServiceAccount token), or uses $KUBECONFIG with
SPECSERVE_E2E_USE_KUBECONFIG=1. Then it creates N SpecServices one after another and times, from
the create call's return:
  deployment_s  until the engine Deployment exists;
  ready_s       until status.phase == Ready (Deployment available, conditions set).
Two scenarios: profiling disabled (pure operator path), and profiling enabled, where the fake
kubelet finishes the profiling pod after 0.3 s with a fixture Profile (simulated, not a real
profiler). Ready follows availability on the operator's timer tick (SPECSERVE_TICK_SECONDS, the
operator's default 2 s unless --tick-seconds is given), which dominates ready_s.

    .venv/bin/python bench/cr_ready_latency.py [--runs 5] [--tick-seconds 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))  # the e2e harness (fake kubelet, cluster handle)

from e2e_support import (  # noqa: E402
    CHART,
    GROUP,
    PLURAL,
    RELEASE,
    RELEASE_NS,
    SERVICE_ACCOUNT,
    VERSION,
    Cluster,
    OperatorProcess,
    open_cluster,
    service_account_token,
    specservice,
    wait_for,
)
from fake_kubelet import FakeKubelet  # noqa: E402

from specserve.controlplane import K8S_VERSION, EnvtestMissingError, write_kubeconfig  # noqa: E402


def measure_one(cluster: Cluster, ns: str, name: str, profiling: bool) -> dict[str, float]:
    body = specservice(name)
    body["spec"]["profiling"]["enabled"] = profiling
    cluster.create_ssvc(ns, body)
    t0 = time.perf_counter()
    deployment_s = ready_s = None
    deadline = t0 + 120
    while time.perf_counter() < deadline and ready_s is None:
        now = time.perf_counter() - t0
        if (
            deployment_s is None
            and cluster.apps.list_namespaced_deployment(
                ns, field_selector=f"metadata.name={name}-engine"
            ).items
        ):
            deployment_s = now
        if (cluster.get_ssvc(ns, name).get("status") or {}).get("phase") == "Ready":
            ready_s = time.perf_counter() - t0
            deployment_s = deployment_s if deployment_s is not None else ready_s
        time.sleep(0.01)
    if ready_s is None or deployment_s is None:
        raise TimeoutError(f"{ns}/{name} not Ready after 120 s")
    return {"deployment_s": deployment_s, "ready_s": ready_s}


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="specserve-crlat-"))
    try:
        with open_cluster(workdir) as cluster:
            return measure(cluster, args)
    except EnvtestMissingError as e:
        raise SystemExit(f"cr_ready_latency: {e}") from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    """Chart, fake kubelet and operator on `cluster`, then both scenarios; stops what it started."""
    kubelet = op = None
    try:
        kubelet = FakeKubelet(cluster.api).start()
        cluster.helm("install", RELEASE, str(CHART), "--namespace", RELEASE_NS,
                     "--create-namespace", "--set", "operator.enabled=false",
                     "--set", "grafana.dashboard.enabled=false", "--wait")  # fmt: skip
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{PLURAL}.{GROUP}")
        token = service_account_token(cluster, RELEASE_NS, SERVICE_ACCOUNT)
        kc = write_kubeconfig(
            cluster.workdir / "op.kubeconfig", cluster.api.configuration.host, token
        )
        op = OperatorProcess(
            cluster,
            kc,
            cluster.workdir / "operator.log",
            env_extra={"SPECSERVE_TICK_SECONDS": str(args.tick_seconds)},
        )
        op.start()
        ns = f"bench-{secrets.token_hex(3)}"
        cluster.core.create_namespace({"metadata": {"name": ns}})
        results: dict[str, Any] = {}
        for scenario, profiling in (("profiling-off", False), ("profiling-on", True)):
            runs = [measure_one(cluster, ns, f"{scenario}-{i}", profiling)
                    for i in range(args.runs)]  # fmt: skip
            results[scenario] = {
                "runs": runs,
                "median_deployment_s": statistics.median(r["deployment_s"] for r in runs),
                "median_ready_s": statistics.median(r["ready_s"] for r in runs),
            }
        for item in cluster.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)[
            "items"
        ]:
            cluster.custom.delete_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, item["metadata"]["name"]
            )
        wait_for(lambda: not cluster.custom.list_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL)["items"], 60, "cleanup")  # fmt: skip
        return {
            "benchmark": "cr_ready_latency",
            "kubernetes": "external" if cluster.local is None else f"envtest {K8S_VERSION}",
            "tick_seconds": args.tick_seconds,
            "runs_per_scenario": args.runs,
            "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
            "scenarios": results,
        }
    finally:
        if op is not None:
            op.stop()
        if kubelet is not None:
            kubelet.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="SpecServices per scenario (median)")
    p.add_argument(
        "--tick-seconds",
        type=float,
        default=2.0,
        help="operator timer interval SPECSERVE_TICK_SECONDS (operator default 2)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cr_ready_latency.json")
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be at least 1")
    report = run(args)
    print(f"CR latency on {report['kubernetes']} (tick {args.tick_seconds:g} s, "
          f"median of {args.runs})")  # fmt: skip
    print(f"{'scenario':<15} {'CR->Deployment (s)':>19} {'CR->Ready (s)':>14}   runs (ready s)")
    for name, r in report["scenarios"].items():
        runs = ", ".join(f"{x['ready_s']:.2f}" for x in r["runs"])
        print(f"{name:<15} {r['median_deployment_s']:>19.3f} {r['median_ready_s']:>14.3f}   {runs}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
