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
sys.path.insert(0, str(ROOT / "tests" / "e2e"))  # the e2e harness (control plane, fake kubelet)

from controlplane import (  # noqa: E402
    K8S_VERSION,
    ControlPlane,
    default_assets_dir,
    missing_assets,
    write_kubeconfig,
)
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
    find_helm,
    service_account_token,
    specservice,
    use_external,
    wait_for,
)
from fake_kubelet import FakeKubelet  # noqa: E402
from kubernetes import config  # noqa: E402


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
    external = use_external()
    local: ControlPlane | None = None
    if external is None:
        assets = default_assets_dir()
        if missing_assets(assets):
            raise SystemExit(f"envtest binaries missing in {assets}: run `make envtest`")
        local = ControlPlane(assets, workdir / "cp")
        local.workdir.mkdir()
        local.start()
        kubeconfig = local.kubeconfig
        kubectl = str(assets / "kubectl")
    else:
        kubeconfig, kubectl = external, "kubectl"
    kubelet = op = None
    cluster = Cluster(kubeconfig, config.new_client_from_config(str(kubeconfig)), kubectl,
                      find_helm(), local, workdir)  # fmt: skip
    try:
        kubelet = FakeKubelet(cluster.api).start()
        cluster.helm("install", RELEASE, str(CHART), "--namespace", RELEASE_NS,
                     "--create-namespace", "--set", "operator.enabled=false",
                     "--set", "grafana.dashboard.enabled=false", "--wait")  # fmt: skip
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{PLURAL}.{GROUP}")
        token = service_account_token(cluster, RELEASE_NS, SERVICE_ACCOUNT)
        kc = write_kubeconfig(workdir / "op.kubeconfig", cluster.api.configuration.host, token)
        op = OperatorProcess(
            cluster,
            kc,
            workdir / "operator.log",
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
            "kubernetes": "external" if external else f"envtest {K8S_VERSION}",
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
        if local is not None:
            local.stop()
        shutil.rmtree(workdir, ignore_errors=True)


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
