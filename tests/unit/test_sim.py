"""Simulator invariants: conservation, exact plain-decoding timing, determinism, the
acceptance model's marginals, and AdaSpec vs off on a fixed synthetic trace."""

from __future__ import annotations

import numpy as np
import pytest

from adaspec.contract import AcceptanceCalibration, Policy, StepTimeModel, TimeModel
from adaspec.policy.baselines import FixedKPolicy, OffPolicy
from adaspec.policy.factory import StepLimits
from adaspec.sim import (
    AcceptanceModel,
    AcceptanceSampler,
    SimConfig,
    Trace,
    load_builtin_profile,
    poisson_trace,
    run_policy,
    simulate,
)

CPU = load_builtin_profile("cpu-qwen-coder-estimate")
GPU = load_builtin_profile("h200-7b-0.5b-synthetic")
DOC = Policy(generation=1, tpot_slo_ms=400.0, tpot_budget_ms=360.0, max_draft_tokens=8)


def _trace() -> Trace:
    rng = np.random.default_rng(7)
    n = 30
    arr = np.sort(rng.uniform(0, 20, n))
    return Trace("t", arr, rng.integers(5, 60, n), rng.integers(1, 40, n))


@pytest.mark.parametrize("kind", ["off", "fixed-3", "smartspec", "threshold", "adaptive"])
def test_every_request_finishes_with_exactly_its_tokens(kind: str) -> None:
    tr = _trace()
    res = run_policy(kind, tr, CPU, DOC, config=SimConfig(max_batch=4, noise_sigma=0.1))
    assert len(res.requests) == len(tr)
    for r in res.requests:
        assert r.arrival_s <= r.first_token_s <= r.finish_s
    multi = tr.output_len[tr.output_len > 1]
    # prefill emits the first token; steps emit the rest, never more than requested
    assert sum(res.steps.emitted) == int((multi - 1).sum())
    assert max(res.steps.batch) <= 4
    assert res.accepted <= res.verified <= res.proposed


def test_fixed_k0_equals_off_equals_plain_decoding_timing() -> None:
    tm = TimeModel(
        draft=StepTimeModel(intercept_ms=50.0, per_row_ms=5.0, per_ctx_ktoken_ms=2.0),
        verify=StepTimeModel(
            intercept_ms=200.0, per_row_ms=10.0, per_token_ms=3.0, per_ctx_ktoken_ms=6.0
        ),
    )
    acc = AcceptanceModel.from_calibration(CPU.calibration)
    tr = Trace("one", np.array([1.0]), np.array([20]), np.array([6]))
    runs = [
        simulate(tr, FixedKPolicy(0), StepLimits(0, None), tm, acc),
        simulate(tr, FixedKPolicy(0), StepLimits(5, None), tm, acc),
        simulate(tr, OffPolicy(), StepLimits(0, None), tm, acc),
    ]
    # by hand: prefill = target pass over 20 tokens + draft pass over them, then 5 plain steps
    p = 20
    work = p * (p + 1) / 2
    prefill = (200 + 10 + 3 * p + 6 * work / 1000 + 50 + 5 + 2 * work / 1000) / 1000
    t = 1.0 + prefill
    first = t
    for g in range(1, 6):
        ctx = p + g - 1  # tokens in the target's KV cache (the last one is fed this step)
        t += (200 + 10 + 3 + 6 * ctx / 1000) / 1000
    for res in runs:
        (r,) = res.requests
        assert r.first_token_s == pytest.approx(first, rel=1e-12)
        assert r.finish_s == pytest.approx(t, rel=1e-12)
        assert res.proposed == 0


def test_same_seed_same_result_and_seed_matters() -> None:
    tr = _trace()
    cfg = SimConfig(max_batch=4, noise_sigma=0.2, seed=3)
    a = run_policy("adaptive", tr, CPU, DOC, config=cfg)
    b = run_policy("adaptive", tr, CPU, DOC, config=cfg)
    c = run_policy("adaptive", tr, CPU, DOC, config=cfg.model_copy(update={"seed": 4}))
    assert [r.finish_s for r in a.requests] == [r.finish_s for r in b.requests]
    assert a.steps.spec_lens == b.steps.spec_lens and a.accepted == b.accepted
    assert [r.finish_s for r in a.requests] != [r.finish_s for r in c.requests]


def test_acceptance_marginals_match_the_model() -> None:
    model = AcceptanceModel.from_calibration(
        AcceptanceCalibration(
            bin_edges=[0.0, 0.5, 0.8, 1.0], accept_prob=[0.3, 0.7, 0.95], counts=[2, 3, 5]
        )
    )
    s = AcceptanceSampler(model, seed=0)
    conf, acc = [], []
    for r in range(400):
        c, a, off = s.draw(r, 200)
        conf.append(c)
        acc.append(a)
        assert off.shape == c.shape and np.all((off >= 0) & (off <= 1))
    cc, aa = np.concatenate(conf), np.concatenate(acc)
    bins = np.searchsorted([0.5, 0.8], cc, side="right")
    share = np.bincount(bins, minlength=3) / cc.size
    np.testing.assert_allclose(share, [0.2, 0.3, 0.5], atol=0.02)
    for b, p in enumerate([0.3, 0.7, 0.95]):
        assert aa[bins == b].mean() == pytest.approx(p, abs=0.02)
    # same request index → same text, whatever else was drawn before (common random numbers)
    np.testing.assert_array_equal(s.draw(5, 50)[0], AcceptanceSampler(model, 0).draw(5, 50)[0])


def test_acceptance_is_correlated_within_a_request() -> None:
    model = AcceptanceModel.from_calibration(CPU.calibration)
    s = AcceptanceSampler(model, seed=1)
    means = np.array([s.draw(r, 300)[1].mean() for r in range(300)])
    indep = AcceptanceSampler(model.model_copy(update={"request_sigma": 0.0}), seed=1)
    means0 = np.array([indep.draw(r, 300)[1].mean() for r in range(300)])
    assert means.std() > 1.5 * means0.std()


def test_invalid_acceptance_model_names_the_field() -> None:
    with pytest.raises(ValueError, match="confMass"):
        AcceptanceModel(bin_edges=[0, 0.5, 1], conf_mass=[1.0], accept_prob=[0.5, 0.5])


@pytest.mark.parametrize("rate", [0.3, 1.0, 3.0])
def test_adaspec_not_worse_than_off_on_synthetic_gpu_trace(rate: float) -> None:
    """Fixed Poisson trace, (estimated) GPU profile, SLO 40 ms / budget 36 ms: from light load to
    saturation AdaSpec keeps ≥ 97 % of off's throughput and off's SLO attainment, and at light
    load a lower mean TPOT. (At saturation its mean TPOT is *higher* than off's: it spends the
    budget on throughput, so TPOT is not asserted there.)"""
    tr = poisson_trace("p", rate=rate * 40, n=400, prompt_len=300, output_len=120, seed=0)
    doc = Policy(generation=1, tpot_slo_ms=40.0, tpot_budget_ms=36.0, max_draft_tokens=8)
    cfg = SimConfig(max_batch=64, seed=0)
    off = run_policy("off", tr, GPU, doc, config=cfg).summary(0.04)
    ada = run_policy("adaptive", tr, GPU, doc, config=cfg).summary(0.04)
    assert ada.throughput_tok_s >= 0.97 * off.throughput_tok_s
    assert ada.slo_attainment >= off.slo_attainment
    if rate < 1.0:
        assert ada.tpot_mean_ms <= off.tpot_mean_ms


@pytest.mark.xfail(
    strict=True,
    reason="known engine gap: the SLO guard bounds step time / expected tokens but not the "
    "prefill stalls of newly admitted requests between steps, so with a tight SLO (20 ms, "
    "budget 18 ms) AdaSpec's P90 TPOT breaks the SLO where plain decoding meets it",
)
def test_adaspec_meets_tight_slo_where_off_does() -> None:
    tr = poisson_trace("p", rate=40.0, n=400, prompt_len=300, output_len=120, seed=0)
    doc = Policy(generation=1, tpot_slo_ms=20.0, tpot_budget_ms=18.0, max_draft_tokens=8)
    cfg = SimConfig(max_batch=64, seed=0)
    off = run_policy("off", tr, GPU, doc, config=cfg).summary(0.02)
    ada = run_policy("adaptive", tr, GPU, doc, config=cfg).summary(0.02)
    assert off.slo_attainment >= 0.99
    assert ada.slo_attainment >= 0.99


def test_fit_acceptance_recovers_a_known_model() -> None:
    from adaspec.sim.fit import fit_acceptance

    truth = AcceptanceModel(
        bin_edges=[0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0],
        conf_mass=[5, 5, 5, 5, 10, 20, 50],
        accept_prob=[0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99],
        request_sigma=0.6,
        local_sigma=0.4,
    )
    s = AcceptanceSampler(truth, seed=0)
    reqs = []
    for r in range(200):
        c, a, _ = s.draw(r, 150)
        reqs.append((c.tolist(), a.tolist()))
    fit = fit_acceptance(reqs)
    np.testing.assert_allclose(fit.accept_prob, truth.accept_prob, atol=0.04)
    np.testing.assert_allclose(
        np.asarray(fit.conf_mass) / sum(fit.conf_mass), np.asarray(truth.conf_mass) / 100, atol=0.02
    )
    assert fit.request_sigma == pytest.approx(0.6, abs=0.1)
    assert fit.local_sigma == pytest.approx(0.4, abs=0.12)
    with pytest.raises(ValueError, match="no observations"):
        fit_acceptance([])


def test_adaspec_resumes_speculation_after_hard_requests() -> None:
    from adaspec.sim.simulator import policy_for

    doc = Policy(generation=1, tpot_slo_ms=40.0, tpot_budget_ms=36.0, max_draft_tokens=8)
    pol, lim = policy_for("adaptive", GPU, doc)
    edges = [0.0, 0.5, 1.0]
    hard = AcceptanceModel(bin_edges=edges, conf_mass=[1, 1], accept_prob=[0.02, 0.1])
    easy = AcceptanceModel(bin_edges=edges, conf_mass=[1, 1], accept_prob=[0.9, 0.99])
    seq = poisson_trace("seq", rate=2.0, n=20, prompt_len=100, output_len=100, seed=0)
    simulate(seq, pol, lim, GPU.time_model, hard)
    later = simulate(seq, pol, lim, GPU.time_model, easy)
    assert later.verified > 0
