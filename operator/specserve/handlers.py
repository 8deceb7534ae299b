"""kopf handlers for SpecService: thin wiring around `specserve.reconcile.Reconciler`.

How to run (any of):
    specserve operator --all-namespaces            # or --namespace NS (repeatable)
    python -m specserve.operator --namespace demo --liveness http://0.0.0.0:8080/healthz
    kopf run -m specserve.handlers --all-namespaces --standalone

Kubernetes credentials: in a pod the ServiceAccount, elsewhere $KUBECONFIG (then
~/.kube/config). Environment knobs are listed in `specserve.settings` (SPECSERVE_PROMETHEUS_URL,
SPECSERVE_TICK_SECONDS, SPECSERVE_CONTROL_INTERVAL_SECONDS, SPECSERVE_CONTROLLER, …).

What it needs from RBAC (namespaced or cluster-wide):
  specserve.io specservices: get list watch patch; specservices/status: get patch;
  specservices/scale: get patch; batch jobs: get create; pods: get list;
  configmaps, services: get create patch; apps deployments: get create patch;
  events (core): create; monitoring.coreos.com podmonitors: get create (optional);
  apiextensions customresourcedefinitions: get list watch (kopf's resource discovery);
  namespaces: list watch (only with --namespace patterns; kopf watches them).
kopf keeps its handler progress in annotations prefixed `specserve.io/` (not in status, which
the structural schema would prune). Children need no cleanup code: each has an ownerReference and
is garbage-collected. kopf itself puts its finalizer (kopf.zalando.org/KopfFinalizerMarker) on
each SpecService to stop the per-object timer cleanly; if the operator is uninstalled before its
SpecServices, remove it by hand:
    kubectl patch ssvc NAME --type=merge -p '{"metadata":{"finalizers":null}}'
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from specserve import api, kube
from specserve import settings as op_settings
from specserve.reconcile import Reconciler

log = logging.getLogger("specserve")
Logger = logging.Logger | logging.LoggerAdapter[Any]

_RECONCILER: list[Reconciler] = []


def _tick_seconds() -> float:
    # The timer interval is fixed at import time; a bad value is reported at startup.
    try:
        return max(0.1, float(os.environ.get("SPECSERVE_TICK_SECONDS") or 2.0))
    except ValueError:
        return 2.0


def backoff_delay(retry: int, base: float = 2.0, cap: float = 300.0) -> float:
    """Exponential backoff for failed reconciles: 2, 4, 8, … seconds, at most 5 minutes."""
    return float(min(cap, base * 2 ** max(0, retry)))


def _emit(body: Any, type_: str, reason: str, message: str) -> None:
    try:
        kopf.event(body, type=type_, reason=reason, message=message[:1024])
    except Exception as e:  # events are best effort; never fail a reconcile on them
        log.debug("event %s not posted: %s", reason, e)


def _reconciler() -> Reconciler:
    if not _RECONCILER:
        raise kopf.TemporaryError("operator is still starting", delay=1)
    return _RECONCILER[0]


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: Logger, **_: Any) -> None:
    try:
        conf = op_settings.from_env()
    except op_settings.SettingsError as e:
        raise kopf.PermanentError(f"bad operator setting: {e}") from e
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="specserve.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="specserve.io", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # our own Events are posted explicitly
    settings.execution.max_workers = 8
    kube.load_config()
    _RECONCILER[:] = [Reconciler(kube.Kube(), conf, emit=_emit)]
    logger.info(
        "specserve operator: prometheus=%s tick=%.1fs control-interval=%.0fs",
        conf.prometheus_url or "(per SpecService)",
        _tick_seconds(),
        conf.control_interval_s,
    )


@kopf.on.probe(id="reconciler")
def reconciler_ready(**_: Any) -> bool:
    return bool(_RECONCILER)


def _apply(patch: kopf.Patch, status: dict[str, Any]) -> None:
    if status:
        patch.setdefault("status", {}).update(status)


@kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.create(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.update(api.GROUP, api.VERSION, api.PLURAL)
def reconcile(body: kopf.Body, patch: kopf.Patch, retry: int, **_: Any) -> None:
    """Spec → children. Never waits: a running profiling Job is followed by the timer."""
    try:
        status = _reconciler().converge(body)
    except (kube.KubeError, OSError) as e:
        raise kopf.TemporaryError(f"Kubernetes API: {e}", delay=backoff_delay(retry)) from e
    _apply(patch, status)


@kopf.timer(api.GROUP, api.VERSION, api.PLURAL, interval=_tick_seconds(), sharp=False)
def tick(body: kopf.Body, patch: kopf.Patch, logger: Logger, **_: Any) -> None:
    """Profiling progress, availability, and every control interval the SLO controller."""
    try:
        status = _reconciler().tick(body)
    except (kube.KubeError, OSError) as e:
        logger.warning("tick failed, retrying next tick: %s", e)
        return
    _apply(patch, status)


@kopf.on.delete(api.GROUP, api.VERSION, api.PLURAL, optional=True)
def deleted(name: str, namespace: str | None, logger: Logger, **_: Any) -> None:
    logger.info(
        "SpecService %s/%s deleted; its Job, Deployment, Service and ConfigMaps are "
        "garbage-collected through their ownerReferences",
        namespace,
        name,
    )
