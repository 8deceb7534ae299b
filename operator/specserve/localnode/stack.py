"""The whole loop on one machine: control plane + node agent + Prometheus + operator.

Used by `specserve demo` and by the local-loop integration/e2e tests, so both exercise exactly
the same pieces. Every process is started here and stopped here by PID (reverse order).

The control plane is `specserve.controlplane`, the same launcher (binaries and flags) as the e2e
tests use (`make envtest` builds the binaries).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from kubernetes import config as k8s_config

from specserve import controlplane, promlocal
from specserve.kube import Kube, KubeError
from specserve.localnode.agent import NodeAgent
from specserve.localnode.api import NodeApi
from specserve.localnode.process import die_with_parent

log = logging.getLogger("specserve.localnode.stack")

REPO_ROOT = Path(__file__).resolve().parents[3]
CRD_FILE = REPO_ROOT / "crds" / "specservices.specserve.io.yaml"
CHART_DIR = REPO_ROOT / "charts" / "specserve"


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 60.0, every: float = 0.5) -> Any:
    """Poll `fn` until it returns something truthy; AssertionError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (KubeError, OSError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def service_endpoints(kube: Kube, namespace: str, service: str) -> list[str]:
    """Ready addresses of a Service from its EndpointSlices.

    v1 Endpoints refuse loopback IPs (API validation), so on the local node the Service's real,
    controller-maintained endpoints are only in its EndpointSlices (discovery.k8s.io/v1beta1).
    """
    slices = kube.request(
        "GET",
        f"/apis/discovery.k8s.io/v1beta1/namespaces/{namespace}/endpointslices",
        query={"labelSelector": f"kubernetes.io/service-name={service}"},
    )
    return sorted(
        a
        for s in slices.get("items") or []
        for e in s.get("endpoints") or []
        if (e.get("conditions") or {}).get("ready")
        for a in e["addresses"]
    )


class LocalStack:
    def __init__(
        self,
        work_dir: Path | None = None,
        *,
        node_name: str = "local-node",
        cpu: str | None = None,
        memory: str | None = None,
        gpus: int = 0,
        pod_network: str = "127.0.10.0/24",
        scrape_interval: str = "2s",
        with_rules: bool = True,
    ) -> None:
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="specserve-local-"))
        self.node_name = node_name
        self.cpu = cpu or str(os.cpu_count() or 2)
        self.memory = memory
        self.gpus = gpus
        self.pod_network = pod_network
        self.scrape_interval = scrape_interval
        self.with_rules = with_rules
        self.cp: controlplane.ControlPlane | None = None
        self.agent: NodeAgent | None = None
        self.prometheus: promlocal.LocalPrometheus | None = None
        self.discovery: promlocal.PodDiscovery | None = None
        self.operator: subprocess.Popen[bytes] | None = None
        self.operator_env: dict[str, str] = {}
        self._kube: Kube | None = None
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ pieces
    @property
    def kube(self) -> Kube:
        assert self._kube is not None, "control plane not started"
        return self._kube

    @property
    def kubeconfig(self) -> Path:
        assert self.cp is not None, "control plane not started"
        return self.cp.kubeconfig

    def _timed(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.monotonic() - t0, 2)

    def start_control_plane(self) -> None:
        t0 = time.monotonic()
        # EnvtestMissingError (a FileNotFoundError) names the missing binaries and `make envtest`
        cp = controlplane.ControlPlane(controlplane.default_assets_dir(), self.work_dir / "cluster")
        self.cp = cp
        cp.start()
        self._api_client = k8s_config.new_client_from_config(config_file=str(cp.kubeconfig))
        self._kube = Kube(self._api_client)
        self._timed("control_plane_s", t0)

    def start_node(self, backoff_base_s: float = 2.0) -> None:
        t0 = time.monotonic()
        self.agent = NodeAgent(
            NodeApi(self._api_client),
            node_name=self.node_name,
            work_dir=self.work_dir / "pods",
            cpu=self.cpu,
            memory=self.memory,
            gpus=self.gpus,
            pod_network=self.pod_network,
            backoff_base_s=backoff_base_s,
        )
        self.agent.start()
        self._timed("node_s", t0)

    def install_crd(self) -> None:
        t0 = time.monotonic()
        # SPECSERVE_CRD_FILE: try a candidate CRD instead of the committed one
        crd_file = Path(os.environ.get("SPECSERVE_CRD_FILE") or CRD_FILE)
        crd = yaml.safe_load(crd_file.read_text())
        try:
            self.kube.request(
                "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd
            )
        except KubeError as e:
            if e.status != 409:
                raise
        name = crd["metadata"]["name"]

        def established() -> bool:
            got = self.kube.request(
                "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
            )
            return any(
                c["type"] == "Established" and c["status"] == "True"
                for c in got.get("status", {}).get("conditions") or []
            )

        wait_for("CRD established", established, timeout=30)
        self._timed("crd_s", t0)

    def start_prometheus(self) -> promlocal.LocalPrometheus:
        t0 = time.monotonic()
        if self.prometheus is None:
            groups = promlocal.chart_rule_groups(CHART_DIR) if self.with_rules else []
            kube = self.kube
            self.discovery = promlocal.PodDiscovery(
                lambda: (
                    kube.request(
                        "GET", "/api/v1/pods", query={"labelSelector": promlocal.ENGINE_SELECTOR}
                    ).get("items")
                    or []
                )
            )
            cfg = promlocal.prometheus_config(
                [
                    promlocal.engine_scrape_config(
                        http_sd_url=self.discovery.url, interval=self.scrape_interval
                    )
                ],
                interval=self.scrape_interval,
            )
            self.prometheus = promlocal.LocalPrometheus(self.work_dir / "prometheus", cfg, groups)
        self.prometheus.start()
        self._timed("prometheus_s", t0)
        return self.prometheus

    def start_operator(self, env: Mapping[str, str] | None = None) -> None:
        """`specserve operator -A` as a child process (restartable: e2e scenario e)."""
        if env is not None:
            self.operator_env = dict(env)
        full = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            **({"SPECSERVE_PROMETHEUS_URL": self.prometheus.url} if self.prometheus else {}),
            **self.operator_env,
        }
        log_path = (self.work_dir / "operator.log").open("ab")
        self.operator = subprocess.Popen(
            [sys.executable, "-m", "specserve.cli", "operator", "-A", "--log-format", "plain"],
            env=full,
            stdout=log_path,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        log_path.close()

    def stop_operator(self, sig: int = signal.SIGTERM) -> None:
        if self.operator is None:
            return
        if self.operator.poll() is None:
            self.operator.send_signal(sig)
            try:
                self.operator.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.operator.kill()
                self.operator.wait()
        self.operator = None

    def operator_log(self, lines: int = 40) -> str:
        p = self.work_dir / "operator.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) if p.exists() else ""

    def pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.cp is not None:
            out.update({k: p.pid for k, p in self.cp.procs.items()})
        if self.prometheus and self.prometheus.pid:
            out["prometheus"] = self.prometheus.pid
        if self.operator:
            out["operator"] = self.operator.pid
        if self.agent:
            for w in self.agent.workers.values():
                for c in w.containers:
                    if c.proc is not None:
                        out[f"pod {w.pod_name}"] = c.proc.pid
        return out

    # ------------------------------------------------------------------ all together
    def start(self, operator_env: Mapping[str, str] | None = None) -> LocalStack:
        try:
            self.start_control_plane()
            self.start_node()
            self.install_crd()
            self.start_prometheus()
            self.start_operator(operator_env)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything this stack started, by PID, in reverse order."""
        self.stop_operator()
        if self.agent is not None:
            self.agent.stop(grace_s=5.0)
            self.agent = None
        if self.prometheus is not None:
            self.prometheus.stop()
        if self.discovery is not None:
            self.discovery.close()
            self.discovery = None
        if self.cp is not None:
            self.cp.stop()
            self.cp = None

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
