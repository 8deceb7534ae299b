"""Helpers shared by the e2e fixtures (conftest.py), tests and bench/cr_ready_latency.py:
cluster handle (and where it comes from), operator process, polling, SpecService bodies."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fake_kubelet import NODE_SELECTOR, TOLERATIONS, Termination, succeed_with_fixture_profile
from kubernetes import client, config

from specserve.controlplane import ControlPlane, default_assets_dir, free_port
from specserve.localnode.process import die_with_parent

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "specserve"
RELEASE = "specserve-e2e"
RELEASE_NS = "specserve-e2e-system"
SERVICE_ACCOUNT = "specserve-e2e"  # the chart's fullname for release "specserve-e2e"
GROUP, VERSION, PLURAL = "specserve.io", "v1alpha1", "specservices"

warnings.filterwarnings("ignore", message="Unverified HTTPS request")


def find_helm() -> str:
    """SPECSERVE_HELM, else the pinned helm from scripts/k8s-tools.sh (installed if missing)."""
    env = os.environ.get("SPECSERVE_HELM")
    if env:
        return env
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "k8s-tools.sh"), sys.executable],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"scripts/k8s-tools.sh could not provide helm:\n{out.stderr[-2000:]}")
    return str(Path(out.stdout.strip().splitlines()[-1]) / "helm")


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.2,
    on_timeout: Callable[[], str] | None = None,
) -> Any:
    """Poll until predicate() is truthy; return its value, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # the object may not exist yet
            last_exc = e
        time.sleep(interval)
    extra = on_timeout() if on_timeout else ""
    raise TimeoutError(
        f"timed out after {timeout}s waiting for {what}"
        f"{f' (last error: {last_exc})' if last_exc else ''}\n{extra}"
    )


# ---------------------------------------------------------------------- cluster


@dataclass
class Cluster:
    kubeconfig: Path
    api: client.ApiClient
    kubectl_bin: str
    helm_bin: str
    local: ControlPlane | None
    workdir: Path

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input_text: str | None = None,
        as_user: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [self.kubectl_bin, f"--kubeconfig={self.kubeconfig}", *args]
        if as_user:
            cmd.append(f"--as={as_user}")
        res = subprocess.run(cmd, capture_output=True, text=True, input=input_text, check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr}")
        return res

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [self.helm_bin, f"--kubeconfig={self.kubeconfig}", *args]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr}")
        return res

    @property
    def core(self) -> Any:  # the client's models are used loosely in tests
        return client.CoreV1Api(self.api)

    @property
    def apps(self) -> Any:  # the client's models are used loosely in tests
        return client.AppsV1Api(self.api)

    @property
    def batch(self) -> Any:  # the client's models are used loosely in tests
        return client.BatchV1Api(self.api)

    @property
    def custom(self) -> Any:  # the client's models are used loosely in tests
        return client.CustomObjectsApi(self.api)

    def get_ssvc(self, ns: str, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, name
        )
        return obj

    def create_ssvc(self, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, body
        )
        return obj


def use_external() -> Path | None:
    if os.environ.get("SPECSERVE_E2E_USE_KUBECONFIG") != "1":
        return None
    kc = os.environ.get("KUBECONFIG", "")
    if not kc or not Path(kc).is_file():
        raise FileNotFoundError("SPECSERVE_E2E_USE_KUBECONFIG=1 but $KUBECONFIG is not a file")
    return Path(kc)


@contextlib.contextmanager
def open_cluster(workdir: Path) -> Iterator[Cluster]:
    """$KUBECONFIG's cluster with SPECSERVE_E2E_USE_KUBECONFIG=1, else a local control plane
    (specserve.controlplane) in `workdir`, stopped on exit. Raises
    specserve.controlplane.EnvtestMissingError, before starting anything, when neither is
    available."""
    external = use_external()
    assets = default_assets_dir()
    local: ControlPlane | None = None
    if external is not None:
        kubeconfig, kubectl_bin = external, shutil.which("kubectl") or str(assets / "kubectl")
    else:
        local = ControlPlane(assets, workdir / "controlplane").start()
        kubeconfig, kubectl_bin = local.kubeconfig, str(assets / "kubectl")
    try:
        api = config.new_client_from_config(str(kubeconfig))
        yield Cluster(kubeconfig, api, kubectl_bin, find_helm(), local, workdir)
    finally:
        if local is not None:
            local.stop()


# ---------------------------------------------------------------------- fake node


class JobOutcomes:
    """Per-namespace outcome of profiling pods (test fault injection); default: fixture profile."""

    def __init__(self) -> None:
        self.by_namespace: dict[str, Callable[[Any], Termination]] = {}

    def __call__(self, pod: Any) -> Termination:
        fn = self.by_namespace.get(pod.metadata.namespace, succeed_with_fixture_profile)
        return fn(pod)


# ---------------------------------------------------------------------- chart + operator


@dataclass
class OperatorProcess:
    """The operator as a local process, authenticated as the chart's ServiceAccount."""

    cluster: Cluster
    kubeconfig: Path
    log_path: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    starts: int = 0

    def start(self, timeout: float = 60.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "operator already running"
        self.port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "SPECSERVE_TICK_SECONDS": "0.5",
            **self.env_extra,
        }
        for var in ("KUBERNETES_SERVICE_HOST", "SPECSERVE_PROMETHEUS_URL"):
            env.pop(var, None)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        log.write(f"\n===== start {self.starts + 1} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "specserve.cli",
                "operator",
                "--all-namespaces",
                "--liveness",
                f"http://127.0.0.1:{self.port}/healthz",
                "--log-format",
                "plain",
                "--verbose",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
            preexec_fn=die_with_parent,
        )
        log.close()
        self.starts += 1
        wait_for(
            self._healthy, timeout, "the operator's liveness endpoint", on_timeout=self.log_tail
        )

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL: the operator gets no chance to clean up (crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def service_account_token(cluster: Cluster, namespace: str, name: str) -> str:
    """A bound token for the ServiceAccount (TokenRequest API; works on 1.20 and current)."""
    res = cluster.core.create_namespaced_service_account_token(
        name, namespace, {"spec": {"expirationSeconds": 7200}}
    )
    token: str = res.status.token
    return token


# ---------------------------------------------------------------------- per test


def specservice(name: str, **spec_overrides: Any) -> dict[str, Any]:
    """A valid SpecService that lands on the fake node (torch backend, no GPU)."""
    spec: dict[str, Any] = {
        "targetModel": {"name": "e2e/target-fixture"},
        "draftModel": {"name": "e2e/draft-fixture"},
        "slo": {"tpotMs": 120},
        "engine": {
            "backend": "torch",
            "gpus": 0,
            "image": "specserve/engine:e2e",
            "nodeSelector": dict(NODE_SELECTOR),
            "tolerations": list(TOLERATIONS),
        },
        "profiling": {"batchSizes": [1, 2], "contextLens": [64, 128, 256], "backoffLimit": 0},
    }
    for key, value in spec_overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SpecService",
        "metadata": {"name": name},
        "spec": spec,
    }


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return dict(c)
    return None
