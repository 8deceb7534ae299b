"""The MRV2 verifier seam against vLLM's own code, on CPU.

vLLM's adaptive verification runs only on CUDA (Model Runner V2, CUDA graphs, streams), so the
manager is built here without its constructor (object.__new__) and given the state its
`get_num_tokens` reads: request states, stale confidences, cost tables from vLLM's own
`build_cost_tables_from_curves`. vLLM's method body then really runs, before and under
AdaSpec's override. Not covered: a live MRV2 runner, CUDA graphs, `record_confidences` on CUDA
streams (its calibration kernel is checked on CPU tensors).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from adaspec.backends.vllm.settings import SchedulerSettings, VerifierSettings
from adaspec.backends.vllm.verifier import AdaSpecVerifier
from adaspec.backends.vllm.verify_plan import VerifierUnsupportedError, calibrate, rank_slots
from adaspec.contract import (
    AcceptanceCalibration,
    Hardware,
    ModelIdentity,
    Policy,
    Profile,
    SpecMode,
    StepTimeModel,
    TimeModel,
)

K = 4
REQS = ["a", "b", "c", "d"]


def _manager(seed: int) -> Any:
    from vllm.v1.worker.gpu.spec_decode import adaptive_verification as av

    rng = np.random.default_rng(seed)
    max_reqs, max_tokens = 8, 256
    mgr = object.__new__(av.AdaptiveVerificationManager)
    mgr.req_states = SimpleNamespace(
        req_id_to_index={r: i + 2 for i, r in enumerate(REQS)},
        num_computed_tokens_np=rng.integers(20, 200, size=max_reqs).astype(np.int32),
        prefill_len=SimpleNamespace(np=np.full(max_reqs, 10, dtype=np.int32)),
        max_num_reqs=max_reqs,
        max_num_batched_tokens=max_tokens,
        num_speculative_steps=K,
        device=torch.device("cpu"),
    )
    mgr.num_speculative_steps = K
    mgr.num_bonus_tokens = 1
    mgr._max_total_logits = 10_000
    mgr.cost_tables = av.build_cost_tables_from_curves(
        [(1, 1.0), (4, 1.4), (8, 2.0)],
        [(1, 8.0), (8, 8.5), (32, 10.0), (128, 20.0), (256, 35.0)],
        max_reqs,
        max_tokens,
    )
    conf = [rng.uniform(0.3, 0.99, size=(max_reqs, K)).astype(np.float32) for _ in range(2)]
    mgr._stale_confidences = [SimpleNamespace(np=c) for c in conf]
    mgr._stale_idx = 1
    mgr._batch_budget = None
    return mgr


def _batch(seed: int) -> tuple[dict[str, int], dict[str, list[int]]]:
    rng = np.random.default_rng(100 + seed)
    drafts = {r: [-1] * int(rng.integers(0, K + 1)) for r in REQS}
    return {r: 1 + len(d) for r, d in drafts.items()}, drafts


def _verifier(tmp_path: Path, policy: Policy | None, **verifier: Any) -> AdaSpecVerifier:
    pf = None
    if policy is not None:
        pf = tmp_path / "policy.json"
        pf.write_text(policy.model_dump_json(by_alias=True))
    settings = SchedulerSettings(
        k_max=K,
        policy_file=None if pf is None else str(pf),
        verifier=VerifierSettings(**{"step_cost": "vllm", **verifier}),
    )
    return AdaSpecVerifier(settings)


def _adopt(mgr: Any, ver: AdaSpecVerifier) -> Any:
    from adaspec.backends.vllm.mrv2 import AdaSpecVerificationManager

    return AdaSpecVerificationManager.adopt(mgr, ver, None)


@pytest.mark.parametrize("seed", range(5))
def test_without_a_budget_adaspec_reproduces_vllms_budget(seed: int, tmp_path: Path) -> None:
    """Same inputs, vLLM's cost tables, no SLO: AdaSpec's plan picks vLLM's own draft budget,
    and the bookkeeping vLLM keeps for compact_batch/reallocate_drafts is unchanged."""
    ntok, drafts = _batch(seed)
    vanilla = _manager(seed)
    want = vanilla.get_num_tokens(ntok, drafts)
    ours = _adopt(_manager(seed), _verifier(tmp_path, None))
    assert ours.get_num_tokens(ntok, drafts) == want
    assert ours._batch_budget == vanilla._batch_budget
    assert ours.adaspec.stats.drafts_verified == vanilla._batch_budget[2]


def test_slo_budget_replaces_vllms_draft_budget(tmp_path: Path) -> None:
    ntok, drafts = {"a": 5, "b": 1, "c": 5, "d": 5}, {"a": [-1] * 4, "c": [-1] * 4, "d": [-1] * 4}
    vanilla = _manager(7)
    total = vanilla.get_num_tokens(ntok, drafts)
    v_drafts, v_base, v_budget = vanilla._batch_budget
    assert v_budget > 2  # vLLM verifies several drafts here
    # Request "b" has no drafts: a budget near the plain step time lets few drafts through.
    draft_ms, verify_ms = vanilla.cost_tables
    budget_ms = float(draft_ms[4] + verify_ms[4 + 1]) + 0.01
    tight = Policy(generation=1, tpot_slo_ms=1000.0, tpot_budget_ms=budget_ms)
    ours = _adopt(_manager(7), _verifier(tmp_path, tight))
    got = ours.get_num_tokens(ntok, drafts)
    o_drafts, o_base, o_budget = ours._batch_budget
    assert (o_drafts, o_base) == (v_drafts, v_base)
    assert 0 < o_budget < v_budget
    assert got == total - v_budget + o_budget == sum(o_base.values()) + o_budget
    assert ours.adaspec.stats.guard_lowered == 1


def test_off_mode_verifies_nothing(tmp_path: Path) -> None:
    ntok, drafts = _batch(2)
    off = Policy(generation=1, mode=SpecMode.off, tpot_slo_ms=100.0, tpot_budget_ms=90.0)
    ours = _adopt(_manager(2), _verifier(tmp_path, off))
    assert ours.get_num_tokens(ntok, drafts) == len(REQS)
    assert ours._batch_budget[2] == 0


def test_vllms_allocation_of_our_budget_matches_our_per_request_prediction() -> None:
    """vLLM's GPU admission kernel (uncompiled, on CPU tensors) gives each request the share
    of a budget that AdaSpec's ranking predicts, when both see the same confidences."""
    from vllm.v1.worker.gpu.spec_decode.adaptive_verification import (
        _assign_draft_token_budget,
    )

    rng = np.random.default_rng(5)
    conf = rng.uniform(0.3, 0.99, size=(6, K))
    drafts = np.array([4, 0, 2, 4, 3, 1])
    ranked = rank_slots(conf, drafts)
    for budget in range(1, int(drafts.sum())):
        caps = torch.tensor(drafts, dtype=torch.int32)
        _assign_draft_token_budget(
            torch.tensor(conf, dtype=torch.float64), torch.arange(6), caps, budget, K
        )
        ours = np.bincount(ranked.req[:budget], minlength=6)
        assert caps.tolist() == ours.tolist(), budget


def test_calibrated_confidences_kernel_matches_the_profile_map() -> None:
    from adaspec.backends.vllm.mrv2 import calibrated_confidences

    cal = AcceptanceCalibration(
        bin_edges=[0.0, 0.3, 0.6, 0.9, 1.0], accept_prob=[0.1, 0.4, 0.7, 0.95]
    )
    features = torch.tensor(np.random.default_rng(0).normal(0.0, 3.0, size=(8, K)))
    rows = torch.tensor([5, 1, 6])
    got = calibrated_confidences(
        features,
        rows,
        torch.tensor(cal.bin_edges[1:-1], dtype=torch.float32),
        torch.tensor(cal.accept_prob, dtype=torch.float32),
    )
    top1 = 1.0 / (1.0 + np.exp(-features.numpy()[[5, 1, 6]]))
    np.testing.assert_allclose(got.numpy(), calibrate(top1, cal), rtol=1e-6)


def _profile() -> Profile:
    return Profile(
        created_at="2026-01-01T00:00:00Z",
        hardware=Hardware(device="cuda", threads=1, backend="vllm"),
        target=ModelIdentity(name="t"),
        draft=ModelIdentity(name="d"),
        time_model=TimeModel(
            draft=StepTimeModel(intercept_ms=1.0), verify=StepTimeModel(intercept_ms=9.0)
        ),
        calibration=AcceptanceCalibration(bin_edges=[0.0, 0.5, 1.0], accept_prob=[0.2, 0.8]),
    )


def test_install_refuses_what_cannot_work_and_installs_once() -> None:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from adaspec.backends.vllm.mrv2 import AdaSpecVerificationManager, install_verifier

    def config(**verifier: Any) -> Any:
        s = SchedulerSettings(
            k_max=K, profile_json=_profile().to_json(), verifier=VerifierSettings(**verifier)
        )
        return SimpleNamespace(additional_config={"adaspec": s.model_dump(mode="json")})

    v1 = SimpleNamespace(adaptive_verification=None)  # what the CPU (V1) runner is to us
    with pytest.raises(VerifierUnsupportedError, match="Model Runner V2"):
        install_verifier(v1, config())
    runner = object.__new__(GPUModelRunner)
    runner.adaptive_verification = None
    runner.speculator = SimpleNamespace(acceptance_estimator=None)
    with pytest.raises(VerifierUnsupportedError, match="no adaptive verification manager"):
        install_verifier(runner, config())
    runner.adaptive_verification = _manager(0)
    with pytest.raises(VerifierUnsupportedError, match="acceptance='vllm'"):
        install_verifier(runner, config(acceptance="profile"))
    with pytest.raises(ValueError, match=r"additional_config\['adaspec'\]"):
        install_verifier(runner, SimpleNamespace(additional_config=None))
    mgr = install_verifier(runner, config())
    assert type(mgr) is AdaSpecVerificationManager and mgr is runner.adaptive_verification
    assert install_verifier(runner, config()) is mgr  # idempotent
    # With the estimator's features, the Profile calibration is prepared on its device.
    runner.adaptive_verification = _manager(1)
    runner.speculator = SimpleNamespace(acceptance_estimator=SimpleNamespace(features=None))
    prof = install_verifier(runner, config(acceptance="profile"))
    assert prof._adaspec_cal is not None
    assert prof._adaspec_cal[1].tolist() == pytest.approx([0.2, 0.8])


def test_worker_only_adds_the_install_step() -> None:
    from vllm.v1.worker.gpu_worker import Worker

    from adaspec.backends.vllm.config import WORKER_CLS
    from adaspec.backends.vllm.mrv2 import AdaSpecWorker

    assert issubclass(AdaSpecWorker, Worker)
    qualname = f"{AdaSpecWorker.__module__}.{AdaSpecWorker.__qualname__}"
    assert qualname == WORKER_CLS
    own = {k for k, v in vars(AdaSpecWorker).items() if callable(v)}
    assert own == {"initialize_from_config"}


def test_engine_refuses_adaptive_verification_on_cpu_before_loading(tmp_path: Path) -> None:
    from adaspec.backends.vllm.config import VllmSettings
    from adaspec.backends.vllm.engine import VllmEngine

    pol = Policy(generation=1, tpot_slo_ms=100.0, tpot_budget_ms=90.0, max_draft_tokens=4)
    eng = VllmEngine(
        VllmSettings(
            target=tmp_path / "missing-target",
            draft=tmp_path / "missing-draft",
            policy=pol,
            enforce_eager=False,
            adaptive_verification=VerifierSettings(step_cost="vllm"),
        )
    )
    with pytest.raises(VerifierUnsupportedError, match="platform is 'cpu'"):
        eng.start()
    assert eng.llm is None and not eng.ready
