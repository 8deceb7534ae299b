"""A real Kubernetes 1.20.2 control plane on loopback: for `specserve demo`, the e2e tests and
the benchmarks, so all of them run exactly the same binaries with the same flags.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler run as child processes from the
envtest-style asset dir that `make envtest` (`scripts/envtest.sh`) builds (`KUBEBUILDER_ASSETS`,
default ~/.cache/specserve/envtest/1.20.2/bin). Every port is a free loopback port, every file
lives in one work dir, and `stop()` ends the processes by PID. The admin user authenticates with
a static bearer token (group system:masters); service-account tokens are signed with a key
generated here, so TokenRequest works for RBAC tests.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from specserve.localnode.process import die_with_parent

K8S_VERSION = "1.20.2"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")


def default_assets_dir() -> Path:
    """$KUBEBUILDER_ASSETS, else the cache dir that scripts/envtest.sh fills."""
    env = os.environ.get("KUBEBUILDER_ASSETS")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "specserve" / "envtest" / K8S_VERSION / "bin"


def missing_assets(assets: Path) -> list[str]:
    return [b for b in BINARIES if not os.access(assets / b, os.X_OK)]


class EnvtestMissingError(FileNotFoundError):
    """The control plane binaries are not there; the message says how to build them."""


def require_assets(assets: Path) -> None:
    """Raise EnvtestMissingError naming the missing binaries and the command that builds them."""
    missing = missing_assets(assets)
    if missing:
        raise EnvtestMissingError(
            f"Kubernetes {K8S_VERSION} binaries missing in {assets}: {', '.join(missing)}. "
            "Build them once with `make envtest` (runs scripts/envtest.sh from a SpecServe "
            "source checkout, ~7-10 min), or set KUBEBUILDER_ASSETS to a directory that has them."
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_kubeconfig(path: Path, server: str, token: str, user: str = "admin") -> Path:
    """A token kubeconfig; TLS verification is off (the apiserver self-signs its serving cert)."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "e2e", "cluster": {"server": server, "insecure-skip-tls-verify": True}}
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": user}}],
        "current-context": "e2e",
    }
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    path.chmod(0o600)
    return path


@dataclass
class ControlPlane:
    assets: Path
    workdir: Path
    with_controllers: bool = True
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    server: str = ""
    etcd_url: str = ""
    token: str = ""
    kubeconfig: Path = Path()

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 60.0) -> ControlPlane:
        """Start etcd, the API server and (optionally) the controllers; EnvtestMissingError
        before anything starts when a binary is missing."""
        require_assets(self.assets)
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_etcd(timeout_s)
            self._start_apiserver(timeout_s)
            if self.with_controllers:
                self._start_controllers()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM each child by PID (reverse start order), SIGKILL after 10 s."""
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self.procs.clear()

    def alive(self) -> dict[str, bool]:
        return {name: p.poll() is None for name, p in self.procs.items()}

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # ------------------------------------------------------------------ components

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            [str(self.assets / name), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            preexec_fn=die_with_parent,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def _wait(self, name: str, url: str, timeout_s: float, token: str = "") -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited early:\n{self.log_tail(name)}")
            req = urllib.request.Request(url)
            if token:
                req.add_header("Authorization", f"Bearer {token}")
            try:
                with urllib.request.urlopen(req, timeout=2, context=ctx) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as e:
                last = str(e)
            time.sleep(0.2)
        raise TimeoutError(
            f"{name} not healthy at {url} after {timeout_s}s ({last}):\n{self.log_tail(name)}"
        )

    def _start_etcd(self, timeout_s: float) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._spawn(
            "etcd",
            [
                "--name=default",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=default=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync",
            ],
        )
        self._wait("etcd", f"{self.etcd_url}/health", timeout_s)

    def _start_apiserver(self, timeout_s: float) -> None:
        certs = self.workdir / "certs"
        certs.mkdir(exist_ok=True)
        sa_key, sa_pub = certs / "sa.key", certs / "sa.pub"
        subprocess.run(
            ["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True
        )
        subprocess.run(
            ["openssl", "rsa", "-in", str(sa_key), "-pubout", "-out", str(sa_pub)],
            check=True,
            capture_output=True,
        )
        self.token = secrets.token_hex(16)
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f'{self.token},admin,admin-uid,"system:masters"\n', encoding="utf-8")
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                "--insecure-port=0",
                f"--cert-dir={certs}",
                "--service-cluster-ip-range=10.0.0.0/24",
                f"--service-account-issuer={self.server}",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_key}",
                f"--token-auth-file={tokens}",
                "--authorization-mode=RBAC",
                # no service-account controller creates a `default` SA in new namespaces quickly
                # enough for pods; pods in these tests never use their SA token.
                "--disable-admission-plugins=ServiceAccount",
                "--allow-privileged=true",
            ],
        )
        self._wait("kube-apiserver", f"{self.server}/readyz", timeout_s, token=self.token)
        self.kubeconfig = write_kubeconfig(
            self.workdir / "admin.kubeconfig", self.server, self.token
        )

    def _start_controllers(self) -> None:
        kc = str(self.kubeconfig)
        common = [
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            "--port=0",
            "--leader-elect=false",
        ]
        self._spawn(
            "kube-controller-manager",
            [
                *common,
                f"--secure-port={free_port()}",
                f"--service-account-private-key-file={self.workdir / 'certs' / 'sa.key'}",
                f"--root-ca-file={self.workdir / 'certs' / 'apiserver.crt'}",
                "--use-service-account-credentials=false",
                # fast GC/Job/Deployment reactions in tests
                "--concurrent-gc-syncs=5",
            ],
        )
        self._spawn("kube-scheduler", [*common, f"--secure-port={free_port()}"])


@contextlib.contextmanager
def running_control_plane(
    assets: Path | None = None, keep_dir: bool = False, with_controllers: bool = True
) -> Iterator[ControlPlane]:
    """Context manager: a started control plane in a fresh temp dir, stopped on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="specserve-controlplane-"))
    cp = ControlPlane(assets or default_assets_dir(), workdir, with_controllers=with_controllers)
    try:
        yield cp.start()
    finally:
        cp.stop()
        if not keep_dir:
            shutil.rmtree(workdir, ignore_errors=True)
