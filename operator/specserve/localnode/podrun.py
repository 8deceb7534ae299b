"""One pod on the local node: prepare volumes/env/argv, run the containers, report status.

Each pod gets its own thread (`PodWorker`), so a slow probe or a long grace period of one pod
never delays another. The worker owns the pod's processes and its loopback address.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from specserve.localnode import volumes
from specserve.localnode.addresses import AddressPool
from specserve.localnode.env import (
    UnsupportedPodError,
    bind_to_pod_ip,
    command_line,
    resolve_env,
)
from specserve.localnode.paths import PATH_MAP_ENV, PathMap
from specserve.localnode.probes import ProbeSpec, ProbeTracker, http_check, parse_probe
from specserve.localnode.process import LocalProcess
from specserve.localnode.status import (
    ContainerView,
    exit_reason,
    pod_phase,
    pod_status,
    termination_message,
    without_times,
)

log = logging.getLogger("specserve.localnode")

DEFAULT_TERMINATION_LOG = "/dev/termination-log"


class PodApi(Protocol):
    def patch_pod_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None: ...
    def finalize_pod(self, namespace: str, name: str, uid: str) -> None: ...
    def config_map(self, namespace: str, name: str) -> dict[str, Any] | None: ...


@dataclass
class PreparedContainer:
    name: str
    argv: list[str]
    env: dict[str, str]
    termination_file: Path
    termination_policy: str
    probes: dict[str, ProbeSpec]
    ports: list[int]


@dataclass
class RunningContainer:
    spec: PreparedContainer
    view: ContainerView
    proc: LocalProcess | None = None
    trackers: dict[str, ProbeTracker] = field(default_factory=dict)
    restart_at: float = 0.0


def container_ports(container: Mapping[str, Any]) -> list[int]:
    return [int(p["containerPort"]) for p in container.get("ports") or []]


def volume_dirs(pod: Mapping[str, Any], pod_dir: Path) -> dict[str, Path]:
    """Host dir per supported volume (configMap, emptyDir); anything else is refused."""
    out: dict[str, Path] = {}
    for v in pod.get("spec", {}).get("volumes") or []:
        if "configMap" in v or "emptyDir" in v:
            out[v["name"]] = pod_dir / "volumes" / v["name"]
        else:
            kinds = ", ".join(k for k in v if k != "name")
            raise UnsupportedPodError(f"volumes[{v['name']}]: {kinds} volumes are not supported")
    return out


def path_map_for(
    container: Mapping[str, Any], vols: Mapping[str, Path], termination_file: Path
) -> PathMap:
    mapping: dict[str, str] = {}
    for m in container.get("volumeMounts") or []:
        if m["name"] not in vols:
            raise UnsupportedPodError(
                f"containers[{container.get('name')}].volumeMounts: unknown volume {m['name']!r}"
            )
        host = vols[m["name"]]
        if m.get("subPath"):
            host = host / m["subPath"]
        mapping[m["mountPath"]] = str(host)
    mapping[container.get("terminationMessagePath") or DEFAULT_TERMINATION_LOG] = str(
        termination_file
    )
    return PathMap.of(mapping)


def prepare_container(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    pod_ip: str,
    vols: Mapping[str, Path],
    pod_dir: Path,
    base_env: Mapping[str, str],
    config_maps: Mapping[str, Mapping[str, str]],
) -> PreparedContainer:
    """Everything needed to start one container, with paths and addresses rewritten."""
    name = container["name"]
    term_file = pod_dir / f"{name}.termination-log"
    pmap = path_map_for(container, vols, term_file)
    env = {k: pmap.rewrite(v) for k, v in resolve_env(pod, container, pod_ip, config_maps).items()}
    argv = bind_to_pod_ip(pmap.rewrite_all(command_line(container, env)), pod_ip)
    full_env = {**base_env, **env, PATH_MAP_ENV: pmap.to_env()}
    probes = {
        kind: p
        for kind in ("startup", "readiness", "liveness")
        if (p := parse_probe(container, kind)) is not None
    }
    return PreparedContainer(
        name=name,
        argv=argv,
        env=full_env,
        termination_file=term_file,
        termination_policy=container.get("terminationMessagePolicy", "File"),
        probes=probes,
        ports=container_ports(container),
    )


def restart_backoff(restarts: int, base_s: float, cap_s: float) -> float:
    return float(min(cap_s, base_s * (2 ** max(restarts, 0))))


class PodWorker(threading.Thread):
    """Runs one pod until it completes or is deleted (then finalizes it)."""

    def __init__(
        self,
        api: PodApi,
        pod: Mapping[str, Any],
        pool: AddressPool,
        work_dir: Path,
        base_env: Mapping[str, str],
        tick_s: float = 0.5,
        configmap_refresh_s: float = 1.0,
        backoff_base_s: float = 2.0,
        backoff_cap_s: float = 30.0,
    ) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.api = api
        self.pod = dict(pod)
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.pool = pool
        self.pod_dir = work_dir / f"{self.namespace}_{self.pod_name}_{self.uid[:8]}"
        self.base_env = dict(base_env)
        self.tick_s = tick_s
        self.cm_refresh_s = configmap_refresh_s
        self.backoff = (backoff_base_s, backoff_cap_s)
        self.restart_policy: str = pod["spec"].get("restartPolicy", "Always")
        self.pod_ip: str | None = None
        self.start_time = time.time()
        self._stop_evt = threading.Event()
        self._grace_s = 30.0
        self._finalize = True
        self._last_status: Any = None
        self._cm_versions: dict[str, str] = {}
        self._cm_checked = 0.0
        self.containers: list[RunningContainer] = []
        self.message = ""

    # ------------------------------------------------------------------ control
    def request_stop(self, grace_s: float, finalize: bool = True) -> None:
        """Pod deleted (finalize=True) or agent shutting down (False: leave the object)."""
        self._grace_s = grace_s
        self._finalize = finalize
        self._stop_evt.set()

    @property
    def stopping(self) -> bool:
        return self._stop_evt.is_set()

    def run(self) -> None:
        try:
            self._run()
        except Exception:  # a bug here must not take the agent down
            log.exception("pod %s/%s: worker failed", self.namespace, self.pod_name)
            self._stop_processes(1.0)
        finally:
            self.pool.release(self.uid)

    # ------------------------------------------------------------------ lifecycle
    def _run(self) -> None:
        specs = self.pod["spec"].get("containers") or []
        self.containers = [
            RunningContainer(
                spec=PreparedContainer(c["name"], [], {}, Path(), "File", {}, []),
                view=ContainerView(name=c["name"], image=c.get("image", "")),
            )
            for c in specs
        ]
        while not self._prepare():
            self._report()
            if self._stop_evt.wait(2.0):
                return self._shutdown()
        while not self._stop_evt.is_set():
            now = time.time()
            for rc in self.containers:
                self._step(rc, now)
            if now - self._cm_checked >= self.cm_refresh_s:
                self._refresh_config_maps()
            self._report()
            if pod_phase(self.restart_policy, [c.view for c in self.containers]) in (
                "Succeeded",
                "Failed",
            ):
                self.pool.release(self.uid)
                self._stop_evt.wait()  # keep the completed pod until it is deleted
                break
            self._stop_evt.wait(self.tick_s)
        self._shutdown()

    def _prepare(self) -> bool:
        try:
            if self.pod["spec"].get("initContainers"):
                raise UnsupportedPodError("spec.initContainers: not supported by the local node")
            vols = volume_dirs(self.pod, self.pod_dir)
            cms = self._materialise_volumes(vols)
            ports = [p for c in self.pod["spec"]["containers"] for p in container_ports(c)]
            self.pod_ip = self.pool.allocate(self.uid, ports)
            for rc, c in zip(self.containers, self.pod["spec"]["containers"], strict=True):
                rc.spec = prepare_container(
                    self.pod, c, self.pod_ip, vols, self.pod_dir, self.base_env, cms
                )
        except (UnsupportedPodError, OSError) as e:
            self.message = str(e)
            for rc in self.containers:
                rc.view.reason, rc.view.message = "CreateContainerConfigError", str(e)
            return False
        self.message = ""
        return True

    def _materialise_volumes(self, vols: Mapping[str, Path]) -> dict[str, dict[str, str]]:
        cms: dict[str, dict[str, str]] = {}
        for v in self.pod["spec"].get("volumes") or []:
            path = vols[v["name"]]
            if "emptyDir" in v:
                path.mkdir(parents=True, exist_ok=True)
                continue
            ref = v["configMap"]
            cm = self.api.config_map(self.namespace, ref["name"])
            if cm is None and not ref.get("optional"):
                raise UnsupportedPodError(
                    f'configmap "{ref["name"]}" not found (volume {v["name"]})'
                )
            data = (cm or {}).get("data") or {}
            cms[ref["name"]] = data
            volumes.write_atomic_dir(path, volumes.configmap_files(v, data))
            self._cm_versions[v["name"]] = (cm or {}).get("metadata", {}).get("resourceVersion", "")
        self._cm_checked = time.time()
        return cms

    def _refresh_config_maps(self) -> None:
        """Re-read every ConfigMap volume; a new resourceVersion rewrites it atomically."""
        self._cm_checked = time.time()
        for v in self.pod["spec"].get("volumes") or []:
            if "configMap" not in v:
                continue
            try:
                cm = self.api.config_map(self.namespace, v["configMap"]["name"])
            except Exception as e:  # API hiccup: keep the files we have
                log.warning("pod %s: configmap refresh failed: %s", self.pod_name, e)
                continue
            if cm is None:
                continue
            rv = cm.get("metadata", {}).get("resourceVersion", "")
            if rv == self._cm_versions.get(v["name"]):
                continue
            files = volumes.configmap_files(v, cm.get("data") or {})
            if volumes.write_atomic_dir(self.pod_dir / "volumes" / v["name"], files):
                log.info("pod %s: volume %s updated (rv %s)", self.pod_name, v["name"], rv)
            self._cm_versions[v["name"]] = rv

    def _step(self, rc: RunningContainer, now: float) -> None:
        view = rc.view
        if rc.proc is None:
            if view.state == "terminated" and not self._may_restart(view):
                return
            if now < rc.restart_at:
                return
            self._start(rc, now)
            return
        code = rc.proc.exit_code()
        if code is not None:
            self._on_exit(rc, code, time.time())
            return
        self._probe(rc, now)

    def _may_restart(self, view: ContainerView) -> bool:
        if self.restart_policy == "Always":
            return True
        return self.restart_policy == "OnFailure" and view.exit_code != 0

    def _start(self, rc: RunningContainer, now: float) -> None:
        view = rc.view
        if view.state == "terminated":
            view.last_terminated = view.terminated_doc()
            view.restart_count += 1
        try:
            rc.spec.termination_file.parent.mkdir(parents=True, exist_ok=True)
            rc.spec.termination_file.write_text("")
            rc.proc = LocalProcess(
                rc.spec.argv, rc.spec.env, self.pod_dir, self.pod_dir / f"{rc.spec.name}.log"
            )
        except (UnsupportedPodError, OSError) as e:
            view.state, view.reason, view.message = "waiting", "RunContainerError", str(e)
            rc.restart_at = now + restart_backoff(view.restart_count, *self.backoff)
            return
        log.info(
            "pod %s/%s: started %s pid %d on %s",
            self.namespace,
            self.pod_name,
            rc.spec.name,
            rc.proc.pid,
            self.pod_ip,
        )
        view.state, view.reason, view.message = "running", "", ""
        view.pid, view.started_at, view.finished_at, view.exit_code = rc.proc.pid, now, None, None
        view.started = "startup" not in rc.spec.probes
        view.ready = not rc.spec.probes.get("readiness") and view.started
        rc.trackers = {k: ProbeTracker(spec=p, started_at=now) for k, p in rc.spec.probes.items()}

    def _on_exit(self, rc: RunningContainer, code: int, now: float) -> None:
        assert rc.proc is not None
        view = rc.view
        try:
            text: str | None = rc.spec.termination_file.read_text(errors="replace")
        except OSError:
            text = None
        view.state, view.exit_code, view.finished_at = "terminated", code, now
        view.reason = exit_reason(code)
        view.message = termination_message(
            text, rc.proc.log_tail(), rc.spec.termination_policy, code
        )
        view.ready = False
        log.info("pod %s/%s: %s exited with %d", self.namespace, self.pod_name, rc.spec.name, code)
        rc.proc = None
        rc.restart_at = now + restart_backoff(view.restart_count, *self.backoff)

    def _probe(self, rc: RunningContainer, now: float) -> None:
        assert rc.proc is not None and self.pod_ip is not None
        view = rc.view
        startup = rc.trackers.get("startup")
        if startup and not view.started:
            if startup.due(now):
                startup.record(now, *http_check(startup.spec, self.pod_ip))
                if startup.healthy:
                    view.started = True
                elif startup.failed_out:
                    log.warning("pod %s: startup probe failed, restarting", self.pod_name)
                    rc.proc.signal_group(9)
            if not view.started:
                return
        readiness = rc.trackers.get("readiness")
        if readiness is None:
            view.ready = True
        elif readiness.due(now):
            readiness.record(now, *http_check(readiness.spec, self.pod_ip))
            view.ready = readiness.healthy
        liveness = rc.trackers.get("liveness")
        if liveness and liveness.due(now):
            liveness.record(now, *http_check(liveness.spec, self.pod_ip))
            if liveness.failed_out:
                log.warning("pod %s: liveness probe failed, restarting", self.pod_name)
                rc.proc.signal_group(9)

    def _report(self) -> None:
        status = pod_status(
            restart_policy=self.restart_policy,
            containers=[c.view for c in self.containers],
            pod_ip=self.pod_ip,
            start_time=self.start_time,
            now=time.time(),
            previous=self._last_status,
            message=self.message,
        )
        key = without_times(status)
        if self._last_status is not None and key == without_times(self._last_status):
            return
        try:
            self.api.patch_pod_status(self.namespace, self.pod_name, status)
            self._last_status = status
        except Exception as e:  # retried on the next tick
            log.warning("pod %s/%s: status patch failed: %s", self.namespace, self.pod_name, e)

    def kill_processes(self) -> None:
        """SIGKILL whatever this worker still runs (last resort when the agent stops)."""
        for rc in self.containers:
            proc = rc.proc
            if proc is not None:
                proc.stop(0.0)

    def _stop_processes(self, grace_s: float) -> None:
        deadline = time.time() + grace_s
        for rc in self.containers:
            if rc.proc is not None:
                code = rc.proc.stop(max(0.0, deadline - time.time()))
                rc.view.state, rc.view.exit_code, rc.view.finished_at = (
                    "terminated",
                    code,
                    (time.time()),
                )
                rc.view.reason, rc.view.ready = exit_reason(code), False
                rc.proc = None

    def _shutdown(self) -> None:
        self._stop_processes(self._grace_s)
        if not self._finalize:
            return
        try:
            self._report()
            self.api.finalize_pod(self.namespace, self.pod_name, self.uid)
        except Exception as e:
            log.warning("pod %s/%s: finalize failed: %s", self.namespace, self.pod_name, e)


def default_base_env() -> dict[str, str]:
    """The agent's environment (venv, PATH, thread limits) with the model cache pinned.

    Containers usually set HOME=/tmp (an emptyDir); without this the engine would look for the
    model cache inside the pod's temp dir and download the models again.
    """
    env = dict(os.environ)
    env.setdefault("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    env.pop("KUBECONFIG", None)
    return env
