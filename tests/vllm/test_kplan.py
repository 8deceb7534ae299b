"""The K-planning math behind the vLLM scheduler and the config-only table (pure numpy)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from adaspec.backends.vllm.config import SCHEDULER_CLS, VllmSettings, engine_kwargs
from adaspec.backends.vllm.kplan import (
    BatchRequests,
    PositionAcceptance,
    RequestRates,
    k_table,
    plan_k,
    static_k,
)
from adaspec.contract import Policy, SpecMode, StepTimeModel, TimeModel
from adaspec.policy.time_model import StepTimePredictor, default_cpu_time_model

CPU = StepTimePredictor(default_cpu_time_model())
# Compute-bound verification (GPU-like at high batch): every verified token costs real time.
BUSY = StepTimePredictor(
    TimeModel(
        draft=StepTimeModel(intercept_ms=3.0, per_row_ms=0.2),
        verify=StepTimeModel(intercept_ms=30.0, per_row_ms=0.5, per_token_ms=2.0),
    )
)
ACC = np.full(8, 0.8)


def test_speculation_pays_at_batch_1_and_less_under_load() -> None:
    k1 = plan_k(1, 200, ACC, BUSY, None, 8).k
    k16 = plan_k(16, 200, ACC, BUSY, None, 8).k
    k64 = plan_k(64, 200, ACC, BUSY, None, 8).k
    assert k1 >= 3
    assert k1 > k16 >= k64


def test_low_acceptance_means_shorter_drafts() -> None:
    assert plan_k(1, 200, np.full(8, 0.3), CPU, None, 8).k < plan_k(1, 200, ACC, CPU, None, 8).k


def test_slo_guard_keeps_time_per_token_within_budget() -> None:
    free = plan_k(8, 200, ACC, BUSY, None, 8)
    plain = plan_k(8, 200, ACC, BUSY, None, 0)
    # A budget between the plain step and the unconstrained plan's TPOT (if speculation makes
    # TPOT worse) or any budget the plan meets: the guarded plan always meets it.
    for budget in (plain.tpot_s * 1.01, free.tpot_s * 1.5, plain.tpot_s * 3):
        g = plan_k(8, 200, ACC, BUSY, budget, 8)
        assert g.tpot_s <= budget and not g.infeasible


def test_guard_steps_aside_when_nothing_is_feasible() -> None:
    g = plan_k(4, 200, ACC, CPU, 1e-6, 8)
    assert g.infeasible
    assert g.k == plan_k(4, 200, ACC, CPU, None, 8).k


def test_position_acceptance_learns_conditional_rates() -> None:
    pa = PositionAcceptance(4, prior_rate=0.5, prior_weight=1.0)
    for _ in range(1000):
        pa.observe(4, 4)  # everything accepted
    assert pa.rates[0] > 0.95 and pa.rates[3] > 0.95
    for _ in range(1000):
        pa.observe(4, 0)  # first token rejected: only position 0 is reached
    assert pa.rates[0] < 0.1
    assert pa.rates[3] > 0.9  # never reached since: keeps what it knew


def test_static_modes_and_table() -> None:
    off = Policy(generation=1, mode=SpecMode.off, tpot_slo_ms=100, tpot_budget_ms=90)
    fixed = Policy(
        generation=1, mode=SpecMode.fixed, tpot_slo_ms=100, tpot_budget_ms=90, fixed_draft_tokens=2
    )
    ada = Policy(generation=1, tpot_slo_ms=1000, tpot_budget_ms=900, max_draft_tokens=6)
    assert static_k(off) == 0 and static_k(fixed) == 2 and static_k(ada) is None
    assert k_table(fixed, BUSY, 0.8, 8, 200) == [[1, 8, 2]]
    table = k_table(ada, BUSY, 0.8, 32, 200)
    # Contiguous, covering 1..32, merged, K non-increasing with batch here.
    assert table[0][0] == 1 and table[-1][1] == 32
    assert all(a[1] + 1 == b[0] and a[2] != b[2] for a, b in itertools.pairwise(table))
    ks = [k for _, _, k in table]
    assert ks == sorted(ks, reverse=True) and ks[0] > ks[-1]
    with pytest.raises(ValueError, match="max_batch"):
        k_table(ada, BUSY, 0.8, 0, 200)


def test_engine_kwargs_plugin_and_config_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ada = Policy(generation=1, tpot_slo_ms=1000, tpot_budget_ms=900, max_draft_tokens=5)
    s = VllmSettings(
        target=tmp_path / "t", draft=tmp_path / "d", policy=ada, policy_file=tmp_path / "p.json"
    )
    kw = engine_kwargs(s)
    assert kw["scheduler_cls"] == SCHEDULER_CLS
    assert kw["speculative_config"] == {
        "method": "draft_model",
        "model": str(tmp_path / "d"),
        "num_speculative_tokens": 5,
    }
    assert kw["additional_config"]["adaspec"] == {
        "k_max": 5,
        "policy_file": str(tmp_path / "p.json"),
    }
    only = engine_kwargs(
        VllmSettings(
            target=tmp_path / "t",
            draft=tmp_path / "d",
            policy=ada,
            use_plugin=False,
            max_num_seqs=16,
        )
    )
    assert "scheduler_cls" not in only and "additional_config" not in only
    table = only["speculative_config"]["num_speculative_tokens_per_batch_size"]
    assert table[0][0] == 1 and table[-1][1] == 16
    off = Policy(generation=1, mode=SpecMode.off, tpot_slo_ms=100, tpot_budget_ms=90)
    plain = engine_kwargs(
        VllmSettings(target=tmp_path / "t", draft=tmp_path / "d", policy=off, use_plugin=False)
    )
    assert "speculative_config" not in plain


def test_guard_protects_the_worst_request() -> None:
    """A draft length that pays for the batch (goodput) is cut when the request with the lowest
    acceptance would break the TPOT budget: the SLO now changes K."""
    acc = np.full(8, 0.9)
    free = plan_k(4, 200, acc, BUSY, None, 8, worst_rate=0.2)
    plain = plan_k(4, 200, acc, BUSY, None, 0, worst_rate=0.2)
    budget = plain.tpot_s * 1.2
    guarded = plan_k(4, 200, acc, BUSY, budget, 8, worst_rate=0.2)
    assert free.k >= 4
    assert 0 < guarded.k < free.k and guarded.tpot_s <= budget
    # Same budget, uniform batch: nothing to protect, the long draft stays.
    assert plan_k(4, 200, acc, BUSY, budget, 8).k == free.k
    # Tighter than plain decoding for the worst request: infeasible, guard steps aside.
    aside = plan_k(4, 200, acc, BUSY, plain.tpot_s * 0.5, 8, worst_rate=0.2)
    assert aside.infeasible and aside.k == free.k


def test_request_rates_track_each_request() -> None:
    rr = RequestRates(prior_weight=2.0)
    for _ in range(20):
        rr.observe("good", 4, 4)
        rr.observe("bad", 4, 0)
    assert rr.rate("good", 0.5) > 0.9 and rr.rate("bad", 0.5) < 0.1
    assert rr.worst(["good", "bad"], 0.5) == rr.rate("bad", 0.5)
    assert rr.worst([], 0.5) is None
    rr.keep({"good"})
    assert rr.rate("bad", 0.5) == 0.5  # forgotten: back to the prior


def _reqs(rates: list[float], caps: list[int]) -> BatchRequests:
    return BatchRequests(np.array(rates), np.array(caps, dtype=np.int64))


def test_uncapped_requests_plan_as_a_uniform_batch() -> None:
    for b in (1, 4, 16):
        uniform = plan_k(b, 200, ACC, BUSY, None, 8)
        each = plan_k(b, 200, ACC, BUSY, None, 8, requests=_reqs([0.95] * b, [8] * b))
        assert (each.k, each.goodput) == (uniform.k, pytest.approx(uniform.goodput))
    with pytest.raises(ValueError, match="same length"):
        _reqs([0.5], [1, 2])


def test_a_request_that_never_speculates_bounds_the_step_time() -> None:
    """A request capped at 0 emits one token per step: its time per token is the step time, so
    a budget between T(1) and T(2) lowers K to 1 although goodput wants more."""
    reqs = _reqs([0.9, 0.9], [8, 0])
    free = plan_k(2, 200, ACC, BUSY, None, 8, requests=reqs)
    assert free.k >= 2 and free.free_k == free.k
    steps = [plan_k(2, 200, ACC, BUSY, None, k, requests=reqs) for k in range(3)]
    assert [p.k for p in steps] == [0, 1, 2]
    t = [p.tpot_s for p in steps]  # with a cap-0 request: TPOT = T(K)
    assert t[0] == pytest.approx(free.plain_s) and t[0] < t[1] < t[2]
    g = plan_k(2, 200, ACC, BUSY, (t[1] + t[2]) / 2, 8, requests=reqs)
    assert g.k == 1 and g.free_k == free.k and not g.infeasible
    # Capped requests count min(K, cap): with everyone capped at 0, speculation is pointless.
    assert plan_k(3, 200, ACC, BUSY, None, 8, requests=_reqs([0.9] * 3, [0] * 3)).k == 0
    # A request capped at 1 gains nothing past one draft, so K stays lower than uncapped.
    one = plan_k(2, 200, ACC, BUSY, None, 8, requests=_reqs([0.9, 0.9], [8, 1]))
    assert one.k <= plan_k(2, 200, ACC, BUSY, None, 8).k
