"""Operator-wide settings from environment variables (a bad value names the variable).

SPECSERVE_PROMETHEUS_URL            default Prometheus URL (spec.prometheus.url overrides it)
SPECSERVE_TICK_SECONDS              how often each SpecService's timer runs (default 2)
SPECSERVE_CONTROL_INTERVAL_SECONDS  how often the SLO controller evaluates (default 15)
SPECSERVE_PROM_WINDOW               PromQL rate window (default 1m: 4 scrapes at 15 s)
SPECSERVE_PROM_TIMEOUT_SECONDS      per-request Prometheus timeout (default 5)
SPECSERVE_PROM_SERVICE_LABEL        series label holding the service (default specserve_io_service)
SPECSERVE_PROM_NAMESPACE_LABEL      series label holding the namespace (default namespace)
SPECSERVE_CONTROLLER                JSON object overriding specserve.control.ControllerConfig
                                    fields, e.g. {"tighten_dwell_s": 10}
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from specserve import prom
from specserve.control import ControllerConfig


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class OperatorSettings:
    prometheus_url: str | None = None
    tick_s: float = 2.0
    control_interval_s: float = 15.0
    prom_window: str = "1m"
    prom_timeout_s: float = 5.0
    service_label: str = prom.DEFAULT_SERVICE_LABEL
    namespace_label: str = prom.DEFAULT_NAMESPACE_LABEL
    controller: ControllerConfig = field(default_factory=ControllerConfig)


def _float(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}: {raw!r} is not a number") from None
    if value < minimum:
        raise SettingsError(f"{name}: must be at least {minimum:g}, got {value:g}")
    return value


def _controller(env: Mapping[str, str]) -> ControllerConfig:
    raw = env.get("SPECSERVE_CONTROLLER")
    if not raw:
        return ControllerConfig()
    try:
        overrides = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SettingsError(f"SPECSERVE_CONTROLLER: not valid JSON: {e}") from None
    if not isinstance(overrides, dict):
        raise SettingsError("SPECSERVE_CONTROLLER: must be a JSON object")
    known = {f.name for f in fields(ControllerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SettingsError(f"SPECSERVE_CONTROLLER: unknown field(s) {', '.join(unknown)}")
    try:
        return ControllerConfig(**overrides)
    except (TypeError, ValueError) as e:
        raise SettingsError(f"SPECSERVE_CONTROLLER: {e}") from None


def from_env(env: Mapping[str, str] | None = None) -> OperatorSettings:
    env = os.environ if env is None else env
    url = env.get("SPECSERVE_PROMETHEUS_URL") or None
    if url is not None and not url.startswith(("http://", "https://")):
        raise SettingsError(f"SPECSERVE_PROMETHEUS_URL: {url!r} must start with http(s)://")
    window = env.get("SPECSERVE_PROM_WINDOW") or "1m"
    try:
        prom.Queries(prom.Scope("x", "x"), window=window)
    except ValueError as e:
        raise SettingsError(f"SPECSERVE_PROM_WINDOW: {e}") from None
    return OperatorSettings(
        prometheus_url=url,
        tick_s=_float(env, "SPECSERVE_TICK_SECONDS", 2.0, 0.1),
        control_interval_s=_float(env, "SPECSERVE_CONTROL_INTERVAL_SECONDS", 15.0, 1.0),
        prom_window=window,
        prom_timeout_s=_float(env, "SPECSERVE_PROM_TIMEOUT_SECONDS", 5.0, 0.1),
        service_label=env.get("SPECSERVE_PROM_SERVICE_LABEL") or prom.DEFAULT_SERVICE_LABEL,
        namespace_label=env.get("SPECSERVE_PROM_NAMESPACE_LABEL") or prom.DEFAULT_NAMESPACE_LABEL,
        controller=_controller(env),
    )
