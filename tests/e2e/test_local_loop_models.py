"""The whole loop with the real CPU model pair (marker slow; one engine replica at a time, ~6 GB):
(a) the real profiler Job completes, its profile reaches the engine pod, the SpecService gets
Ready and the engine answers through the Service's endpoints; (b) tightening the SLO makes the
operator lower the budget, the new policy generation reaches the running engine without a
restart, and the observed P90 TPOT is compared before/after (timeline printed)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from test_local_loop_scenarios import (
    CR_PATH,
    NS,
    Load,
    condition,
    engine_metric,
    engine_pods,
    status,
)

from specserve.controlplane import default_assets_dir, missing_assets
from specserve.localnode.stack import LocalStack, service_endpoints, wait_for
from specserve.promlocal import find_binaries, find_helm

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAME = "real"
# SPECSERVE_E2E_PROFILING=0 skips the profiling Job (e.g. to run scenario b while the Job is broken)
PROFILING = os.environ.get("SPECSERVE_E2E_PROFILING", "1") != "0"
OPERATOR_ENV = {
    "SPECSERVE_TICK_SECONDS": "1",
    "SPECSERVE_CONTROL_INTERVAL_SECONDS": "5",
    "SPECSERVE_PROM_WINDOW": "60s",
    # CPU engines finish few requests per second: accept a lower rate as enough data
    "SPECSERVE_CONTROLLER": json.dumps({"tighten_dwell_s": 10.0, "min_request_rate": 0.03}),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    if missing_assets(default_assets_dir()):
        pytest.skip("Kubernetes 1.20.2 binaries missing (run `make envtest`)")
    if find_binaries() is None or find_helm() is None:
        pytest.skip("prometheus (specserve.promlocal.ensure_binaries) or helm missing")
    s = LocalStack(
        tmp_path_factory.mktemp("real"), pod_network="127.0.60.0/24", scrape_interval="2s"
    )
    s.start(operator_env=OPERATOR_ENV)
    try:
        yield s
    finally:
        s.stop()


def real_specservice(slo_ms: float) -> dict[str, Any]:
    return {
        "apiVersion": "specserve.io/v1alpha1",
        "kind": "SpecService",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "targetModel": {"name": "qwen2.5-coder-1.5b-instruct"},
            "draftModel": {"name": "qwen2.5-coder-0.5b-instruct"},
            "slo": {"tpotMs": slo_ms},
            "speculation": {"mode": "adaptive", "maxDraftTokens": 6},
            "engine": {
                "backend": "torch",
                "gpus": 0,
                "extraArgs": ["--max-batch", "4", "--threads", "2"],
            },
            "profiling": {
                "enabled": PROFILING,
                "batchSizes": [1, 2],  # the profiler needs >= 6 grid points
                "contextLens": [64, 128, 256],
                "backoffLimit": 0,
            },
        },
    }


@pytest.fixture(scope="module")
def served(stack: LocalStack) -> dict[str, Any]:
    t0 = time.monotonic()
    stack.kube.request("POST", CR_PATH, real_specservice(2000.0))

    def profiled() -> dict[str, Any] | None:
        st = status(stack, NAME)
        c = condition(st, "Profiled")
        if st.get("phase") == "Failed":
            raise AssertionError(f"SpecService failed: {st.get('conditions')}")
        done = c.get("status") == "True" or (
            not PROFILING and c.get("reason") == "ProfilingDisabled"
        )
        return st if done else None

    wait_for("Profiled", profiled, timeout=1200, every=3)
    profiled_s = time.monotonic() - t0
    st = wait_for(
        "Ready",
        lambda: (s := status(stack, NAME)).get("phase") == "Ready" and s,
        timeout=900,
        every=3,
    )
    return {"status": st, "profiled_s": profiled_s, "ready_s": time.monotonic() - t0}


def complete(ip: str, model: str, max_tokens: int = 16) -> dict[str, Any]:
    r = httpx.post(
        f"http://{ip}:8000/v1/completions",
        json={
            "model": model,
            "prompt": "def fibonacci(n):",
            "max_tokens": max_tokens,
            "temperature": 0,
        },
        timeout=300,
    )
    r.raise_for_status()
    out: dict[str, Any] = r.json()
    return out


def test_a_real_profiler_job_and_engine_ready(stack: LocalStack, served: dict[str, Any]) -> None:
    st = served["status"]
    if not PROFILING:
        pytest.skip("SPECSERVE_E2E_PROFILING=0: the profiling Job was not run")
    assert condition(st, "Profiled")["status"] == "True"
    assert st["profile"]["configMap"] == f"{NAME}-profile"
    cm = stack.kube.request("GET", f"/api/v1/namespaces/{NS}/configmaps/{NAME}-profile")
    profile = json.loads(next(iter(cm["data"].values())))
    assert profile  # the real profiler's JSON, carried by the Job's termination message
    eps = service_endpoints(stack.kube, NS, NAME)
    pods = engine_pods(stack, NAME)
    assert eps == [pods[0]["status"]["podIP"]]
    model = httpx.get(f"http://{eps[0]}:8000/v1/models", timeout=10).json()["data"][0]["id"]
    out = complete(eps[0], model)
    assert out["choices"][0]["text"]
    print(f"profiled after {served['profiled_s']:.0f}s, Ready after {served['ready_s']:.0f}s")


def test_b_tighter_slo_lowers_budget_and_reaches_engine(
    stack: LocalStack, served: dict[str, Any]
) -> None:
    pod = engine_pods(stack, NAME)[0]
    ip = pod["status"]["podIP"]
    timeline: list[tuple[float, Any, Any, Any, Any]] = []
    t0 = time.monotonic()

    feasibility: list[dict[str, Any]] = []  # SLOFeasible conditions seen while under load

    def sample() -> dict[str, Any]:
        st = status(stack, NAME)
        feasibility.append(condition(st, "SLOFeasible"))
        pol, obs = st.get("policy") or {}, st.get("observed") or {}
        timeline.append(
            (
                round(time.monotonic() - t0),
                pol.get("generation"),
                pol.get("tpotSloMs"),
                pol.get("tpotBudgetMs"),
                obs.get("tpotP90Ms"),
            )
        )
        return st

    model = httpx.get(f"http://{ip}:8000/v1/models", timeout=10).json()["data"][0]["id"]
    with Load(stack, NAME, model=model, workers=4, max_tokens=6) as load:
        before = wait_for(
            "observed P90",
            lambda: (s := sample()).get("observed", {}).get("tpotP90Ms") and s,
            timeout=300,
            every=5,
        )
        p90_before = before["observed"]["tpotP90Ms"]
        gen0, budget0 = before["policy"]["generation"], before["policy"]["tpotBudgetMs"]
        target = round(max(1.0, 0.7 * p90_before), 1)
        stack.kube.request(
            "PATCH",
            f"{CR_PATH}/{NAME}",
            {"spec": {"slo": {"tpotMs": target}}},
            content_type="application/merge-patch+json",
        )
        t_patch = time.monotonic()
        lowered = wait_for(
            "budget lowered",
            lambda: (
                (s := sample())["policy"]["tpotBudgetMs"] < min(budget0, target) + 1e-9
                and s["policy"]["generation"] > gen0
                and s
            ),
            timeout=300,
            every=5,
        )
        gen = lowered["policy"]["generation"]
        wait_for(
            "engine has the generation",
            lambda: engine_metric(ip, "specserve_policy_generation") >= gen,
            timeout=120,
        )
        reach_s = time.monotonic() - t_patch
        deadline = time.monotonic() + 180
        p90_after = None
        while time.monotonic() < deadline:
            st = sample()
            p90_after = (st.get("observed") or {}).get("tpotP90Ms")
            if p90_after is not None and p90_after <= st["policy"]["tpotSloMs"]:
                break
            time.sleep(5)
    print(f"load: {load.sent} requests, {len(load.errors)} errors {load.errors[:2]}")
    print("t(s) gen slo budget p90:")
    for row in timeline:
        print("  ", row)
    print(
        f"P90 TPOT before {p90_before:.1f} ms, SLO -> {target} ms, after {p90_after} ms; "
        f"policy reached the engine {reach_s:.1f}s after the patch"
    )
    now = engine_pods(stack, NAME)
    assert [p["metadata"]["name"] for p in now] == [pod["metadata"]["name"]]
    assert now[0]["status"]["containerStatuses"][0]["restartCount"] == 0
    assert p90_after is not None
    if p90_after > target:
        # On 2 CPU cores the policy alone cannot always reach a 30% tighter SLO (the budget
        # falls below a plain decoding step). Then the product's answer must be explicit: the
        # engines report the SLO infeasible and the operator says so in SLOFeasible=False
        # (with autoscaling it would add replicas) instead of pretending.
        said = [c for c in feasibility if c.get("status") == "False"]
        assert said, f"P90 {p90_after} ms > SLO {target} ms but SLOFeasible never went False"
        print(
            f"P90 stayed over the SLO; SLOFeasible=False: {said[-1].get('reason')}: "
            f"{said[-1].get('message')}"
        )
