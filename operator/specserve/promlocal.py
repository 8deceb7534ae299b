"""A real Prometheus on loopback for the local loop (demo, integration and e2e tests).

Binary: Debian bookworm's `prometheus` 2.42 (includes promtool), unpacked with
`apt-get download` + `dpkg -x` into ${XDG_CACHE_HOME:-~/.cache}/specserve/prometheus/<version>
(installs nothing, starts no service; the same place scripts/chart-check.sh uses), or
$SPECSERVE_PROMETHEUS_BIN / a `prometheus` on PATH.

Discovery: Debian's 2.42 build leaves out kubernetes_sd (only file/http/dns/cloud SDs are
compiled in), so `PodDiscovery` bridges it: a small HTTP service-discovery endpoint on loopback
that LISTs pods from the API server and emits, per container port, the same `__meta_kubernetes_*`
labels kubernetes_sd (role: pod) would. Prometheus reads it with `http_sd_configs`, and the
relabel rules are the ones a cluster's kubernetes_sd job uses: only engine pods
(app.kubernetes.io/name=specserve-engine) in phase Running, only the container port named
`http`, so the target is `<podIP>:8000` — the pod's own loopback address from the local node
agent. Pod labels are copied onto the series (labelmap), so `specserve.io/service` becomes
`specserve_io_service` (what specserve.prom queries); `namespace`, `pod` and `specservice` are
added as the chart's rules and the PodMonitor expect. `engine_scrape_config(kubeconfig=...)`
gives the native kubernetes_sd job for a Prometheus build that has it.
Rules: the chart's PrometheusRule groups, rendered with helm and checked with promtool.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

from specserve.localnode.process import die_with_parent

PROM_DEB_VERSION = "2.42.0+ds-5+deb12u1"
ENGINE_SELECTOR = "app.kubernetes.io/name=specserve-engine"
JOB_NAME = "specserve-engines"


class PrometheusSetupError(RuntimeError):
    """Prometheus could not be found, configured or started (the message says why)."""


@dataclass(frozen=True)
class PromBinaries:
    prometheus: Path
    promtool: Path


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "specserve" / "prometheus" / PROM_DEB_VERSION


def find_binaries() -> PromBinaries | None:
    candidates: list[Path] = []
    if os.environ.get("SPECSERVE_PROMETHEUS_BIN"):
        candidates.append(Path(os.environ["SPECSERVE_PROMETHEUS_BIN"]))
    candidates.append(cache_dir() / "usr" / "bin")
    on_path = shutil.which("prometheus")
    if on_path:
        candidates.append(Path(on_path).parent)
    for d in candidates:
        p, t = d / "prometheus", d / "promtool"
        if os.access(p, os.X_OK) and os.access(t, os.X_OK):
            return PromBinaries(p, t)
    return None


def ensure_binaries() -> PromBinaries:
    """Find Prometheus, or unpack Debian's package into the cache (needs apt's package lists)."""
    found = find_binaries()
    if found:
        return found
    dest = cache_dir()
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(
            ["apt-get", "download", "-qq", f"prometheus={PROM_DEB_VERSION}"],
            cwd=d,
            capture_output=True,
            text=True,
        )
        debs = list(Path(d).glob("prometheus_*.deb"))
        if r.returncode != 0 or not debs:
            raise PrometheusSetupError(
                f"apt-get download prometheus={PROM_DEB_VERSION} failed "
                f"(run `apt-get update` first?): {r.stderr.strip()[-300:]}"
            )
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg", "-x", str(debs[0]), str(dest)], check=True)
    found = find_binaries()
    if not found:
        raise PrometheusSetupError(f"prometheus/promtool missing after unpacking into {dest}")
    return found


# ----------------------------------------------------------------------------- config (pure)


def engine_relabel_configs(port_name: str = "http") -> list[dict[str, Any]]:
    """kubernetes_sd (role: pod) relabelling for engine pods (also used over the bridge)."""
    return [
        {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Running", "action": "keep"},
        {
            "source_labels": ["__meta_kubernetes_pod_container_port_name"],
            "regex": port_name,
            "action": "keep",
        },
        {"action": "labelmap", "regex": "__meta_kubernetes_pod_label_(.+)"},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {
            "source_labels": ["__meta_kubernetes_pod_label_specserve_io_service"],
            "target_label": "specservice",
        },
    ]


def engine_scrape_config(
    *,
    kubeconfig: str | None = None,
    http_sd_url: str | None = None,
    namespaces: Sequence[str] = (),
    selector: str = ENGINE_SELECTOR,
    port_name: str = "http",
    interval: str = "2s",
) -> dict[str, Any]:
    """One scrape job for engine pods: native kubernetes_sd, or the `PodDiscovery` bridge."""
    job: dict[str, Any] = {
        "job_name": JOB_NAME,
        "scrape_interval": interval,
        "scrape_timeout": interval,
        "metrics_path": "/metrics",
    }
    if kubeconfig:
        sd: dict[str, Any] = {
            "role": "pod",
            "kubeconfig_file": kubeconfig,
            "selectors": [{"role": "pod", "label": selector}],
        }
        if namespaces:
            sd["namespaces"] = {"names": list(namespaces)}
        job["kubernetes_sd_configs"] = [sd]
    elif http_sd_url:
        job["http_sd_configs"] = [{"url": http_sd_url, "refresh_interval": interval}]
    else:
        raise ValueError("engine_scrape_config: give kubeconfig or http_sd_url")
    job["relabel_configs"] = engine_relabel_configs(port_name)
    return job


_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def _sanitize(name: str) -> str:
    return _LABEL_CHARS.sub("_", name)


def pod_targets(pods: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """http_sd target groups with kubernetes_sd's role=pod meta labels (one per port)."""
    groups: list[dict[str, Any]] = []
    for pod in pods:
        meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
        ip = status.get("podIP")
        if not ip:
            continue
        ready = any(
            c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or []
        )
        base = {
            "__meta_kubernetes_namespace": meta["namespace"],
            "__meta_kubernetes_pod_name": meta["name"],
            "__meta_kubernetes_pod_ip": ip,
            "__meta_kubernetes_pod_uid": meta.get("uid", ""),
            "__meta_kubernetes_pod_node_name": spec.get("nodeName", ""),
            "__meta_kubernetes_pod_host_ip": status.get("hostIP", ""),
            "__meta_kubernetes_pod_phase": status.get("phase", ""),
            "__meta_kubernetes_pod_ready": "true" if ready else "false",
        }
        for k, v in (meta.get("labels") or {}).items():
            base[f"__meta_kubernetes_pod_label_{_sanitize(k)}"] = v
            base[f"__meta_kubernetes_pod_labelpresent_{_sanitize(k)}"] = "true"
        for k, v in (meta.get("annotations") or {}).items():
            base[f"__meta_kubernetes_pod_annotation_{_sanitize(k)}"] = v
        for c in spec.get("containers") or []:
            for port in c.get("ports") or []:
                labels = {
                    **base,
                    "__meta_kubernetes_pod_container_name": c["name"],
                    "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                    "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                    "__meta_kubernetes_pod_container_port_protocol": port.get("protocol", "TCP"),
                }
                groups.append({"targets": [f"{ip}:{port['containerPort']}"], "labels": labels})
    return groups


class PodDiscovery:
    """HTTP service discovery on 127.0.0.1 serving `pod_targets` of `list_pods()` at /targets."""

    def __init__(self, list_pods: Callable[[], Sequence[Mapping[str, Any]]]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                try:
                    body = json.dumps(pod_targets(outer.list_pods())).encode()
                    code = 200
                except Exception as e:  # Prometheus keeps its last good targets on errors
                    body, code = str(e).encode(), 503
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.list_pods = list_pods
        self._srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._srv.server_address[1]}/targets"
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()


def prometheus_config(
    scrape_configs: Sequence[Mapping[str, Any]],
    rule_files: Sequence[str] = (),
    interval: str = "2s",
) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": list(rule_files),
        "scrape_configs": [dict(s) for s in scrape_configs],
    }


# ----------------------------------------------------------------------------- chart rules


def find_helm() -> Path | None:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    for p in sorted((base / "specserve" / "k8s-tools").glob("*/bin/helm")):
        if os.access(p, os.X_OK):
            return p
    on_path = shutil.which("helm")
    return Path(on_path) if on_path else None


def chart_rule_groups(chart_dir: Path, helm: Path | None = None) -> list[dict[str, Any]]:
    """The rule groups of the chart's PrometheusRule, rendered as the cluster would get them."""
    helm = helm or find_helm()
    if helm is None:
        raise PrometheusSetupError("helm not found (run scripts/k8s-tools.sh)")
    r = subprocess.run(
        [
            str(helm),
            "template",
            "specserve",
            str(chart_dir),
            "--api-versions",
            "monitoring.coreos.com/v1",
            "--show-only",
            "templates/prometheusrule.yaml",
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise PrometheusSetupError(f"helm template failed: {r.stderr.strip()[-500:]}")
    docs = [d for d in yaml.safe_load_all(r.stdout) if d and d.get("kind") == "PrometheusRule"]
    if len(docs) != 1:
        raise PrometheusSetupError(f"expected one PrometheusRule, rendered {len(docs)}")
    groups: list[dict[str, Any]] = docs[0]["spec"]["groups"]
    return groups


def promtool_check(promtool: Path, kind: str, path: Path) -> str:
    """`promtool check config|rules FILE`; raises with promtool's output on failure."""
    r = subprocess.run([str(promtool), "check", kind, str(path)], capture_output=True, text=True)
    out = (r.stdout + r.stderr).strip()
    if r.returncode != 0:
        raise PrometheusSetupError(f"promtool check {kind} {path.name} failed:\n{out}")
    return out


# ----------------------------------------------------------------------------- process


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalPrometheus:
    """Prometheus on 127.0.0.1:<port>; `stop()`/`start()` keep the port and the TSDB."""

    def __init__(
        self,
        work_dir: Path,
        config: Mapping[str, Any],
        rule_groups: Sequence[Mapping[str, Any]] = (),
        port: int | None = None,
        binaries: PromBinaries | None = None,
    ) -> None:
        self.bins = binaries or ensure_binaries()
        self.work_dir = work_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        work_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = work_dir / "prometheus.yml"
        cfg = dict(config)
        if rule_groups:
            rules_path = work_dir / "rules.yml"
            rules_path.write_text(yaml.safe_dump({"groups": list(rule_groups)}, sort_keys=False))
            promtool_check(self.bins.promtool, "rules", rules_path)
            cfg["rule_files"] = [str(rules_path), *cfg.get("rule_files", [])]
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        promtool_check(self.bins.promtool, "config", self.config_path)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout_s: float = 30.0) -> LocalPrometheus:
        if self.proc and self.proc.poll() is None:
            return self
        log = (self.work_dir / "prometheus.log").open("ab")
        self.proc = subprocess.Popen(
            [
                str(self.bins.prometheus),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.work_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1d",
                "--web.enable-lifecycle",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusSetupError(f"prometheus exited:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise PrometheusSetupError(f"prometheus not ready after {timeout_s}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        p = self.work_dir / "prometheus.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) if p.exists() else ""

    def query(self, promql: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5.0)
        r.raise_for_status()
        result: list[dict[str, Any]] = r.json()["data"]["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/targets", timeout=5.0)
        r.raise_for_status()
        active: list[dict[str, Any]] = r.json()["data"]["activeTargets"]
        return active
