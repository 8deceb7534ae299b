"""Time-model fitting and acceptance calibration: pure math on synthetic data."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaspec.contract import StepTimeModel
from adaspec.policy.prefill import chunk_ctx_work
from adaspec.profile.calibration import calibrate, roc_auc
from adaspec.profile.fit import (
    StepSample,
    features,
    fit_step_time,
    holdout_mask,
    mape,
    nnls,
    predict,
)
from adaspec.profile.grid import DEFAULT_GRID


def _samples(coef: tuple[float, float, float, float], noise: float, seed: int) -> list[StepSample]:
    rng = np.random.default_rng(seed)
    out = []
    for p in DEFAULT_GRID.verify_points():
        s = StepSample((p.q,) * p.batch, (p.ctx,) * p.batch, 1.0)
        t = float(features([s])[0] @ np.array(coef))
        out.append(StepSample(s.q_lens, s.ctx_lens, t * (1.0 + noise * rng.standard_normal())))
    return out


def test_features_match_contract_definition() -> None:
    s = StepSample(q_lens=(3, 1), ctx_lens=(100, 2000), time_ms=1.0)
    # rows 2, tokens 4, Σ q·ctx / 1000 = (300 + 2000) / 1000
    assert features([s]).tolist() == [[1.0, 2.0, 4.0, 2.3]]


def test_exact_data_recovers_known_coefficients() -> None:
    coef = (240.0, 12.0, 9.0, 6.5)
    model = fit_step_time(_samples(coef, noise=0.0, seed=0))
    got = (model.intercept_ms, model.per_row_ms, model.per_token_ms, model.per_ctx_ktoken_ms)
    assert got == pytest.approx(coef, rel=1e-3)
    assert model.fit is not None
    assert model.fit.mape < 1e-4
    assert model.fit.r2 > 0.9999
    assert model.fit.n_test + model.fit.n_train == len(DEFAULT_GRID.verify_points())


def test_noisy_data_gives_sane_mape_and_r2() -> None:
    model = fit_step_time(_samples((240.0, 12.0, 9.0, 6.5), noise=0.05, seed=3))
    assert model.fit is not None
    assert 0.0 < model.fit.mape < 0.12
    assert model.fit.r2 > 0.5  # 5 % noise is a large share of this grid's time spread
    assert model.intercept_ms == pytest.approx(240.0, rel=0.15)


def test_negative_true_coefficient_is_clamped_to_zero() -> None:
    # Data generated with a negative per-row slope: NNLS returns 0 there, never a negative cost.
    model = fit_step_time(_samples((300.0, -5.0, 10.0, 2.0), noise=0.0, seed=0))
    assert model.per_row_ms == 0.0
    assert min(model.intercept_ms, model.per_token_ms, model.per_ctx_ktoken_ms) >= 0.0


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(*[st.floats(-10, 10, allow_nan=False)] * 3), min_size=5, max_size=20),
    st.integers(0, 2**31 - 1),
)
def test_nnls_is_nonnegative_and_kkt_optimal(rows: list[tuple[float, ...]], seed: int) -> None:
    A = np.array(rows, dtype=np.float64)
    b = np.random.default_rng(seed).normal(size=len(rows))
    x = nnls(A, b)
    assert (x >= 0).all()
    grad = A.T @ (A @ x - b)
    scale = 1e-6 * (1 + np.abs(A).sum() * (1 + np.abs(b).sum()))
    assert (grad >= -scale).all()  # no descent direction into the feasible set
    assert np.abs(grad[x > 1e-9]).max(initial=0.0) <= scale  # zero gradient on free variables


def test_holdout_is_deterministic_and_nonempty() -> None:
    a = holdout_mask(40)
    assert (a == holdout_mask(40)).all()
    assert a.sum() == 10
    assert holdout_mask(6).sum() >= 1 and (~holdout_mask(6)).sum() >= 1
    with pytest.raises(ValueError, match="fraction"):
        holdout_mask(10, fraction=1.0)


def test_fit_rejects_too_few_or_bad_points() -> None:
    with pytest.raises(ValueError, match="at least 6"):
        fit_step_time([StepSample((1,), (1,), 1.0)] * 3)
    with pytest.raises(ValueError, match="positive"):
        fit_step_time([StepSample((1,), (1,), 0.0)] * 8)


def test_predict_uses_all_terms() -> None:
    model = fit_step_time(_samples((100.0, 1.0, 2.0, 3.0), noise=0.0, seed=0))
    s = StepSample((2, 2), (1000, 500), 1.0)
    assert predict(model, [s])[0] == pytest.approx(100 + 2 + 8 + 3 * 3.0, rel=1e-3)


# ----------------------------------------------------------------------------- prefill

CPU_VERIFY = StepTimeModel(  # the measured 2-core CPU profile's verification model
    intercept_ms=187.836, per_row_ms=2.34, per_token_ms=0.0162, per_ctx_ktoken_ms=2.26049
)


def _prefill_samples(
    coef: tuple[float, float, float, float], noise: float, seed: int, pairs: bool = True
) -> list[StepSample]:
    rng = np.random.default_rng(seed)
    out = []
    for p in DEFAULT_GRID.prefill_points():
        if p.batch > 1 and not pairs:
            continue
        work = p.batch * chunk_ctx_work(p.offset, p.n)
        s = StepSample((p.n,) * p.batch, (p.offset,) * p.batch, 1.0, ctx_work=work)
        t = float(features([s])[0] @ np.array(coef))
        out.append(replace(s, time_ms=t * (1.0 + noise * rng.standard_normal())))
    return out


def test_prefill_samples_use_the_planners_attention_work() -> None:
    s = StepSample((512, 512), (768, 768), 1.0, ctx_work=2 * chunk_ctx_work(768, 512))
    # a chunk attends to its cached prefix and causally to itself, not just q·ctx
    assert features([s]).tolist() == [[1.0, 2.0, 1024.0, 2 * (512 * 768 + 512 * 513 / 2) / 1000]]


def test_prefill_fit_predicts_held_out_prefill_far_better_than_the_verify_model() -> None:
    """A compute-bound prompt (~3 ms per token for target + draft on the 2-core CPU) priced
    with the verification model's slope (0.016 ms per token) is off by up to 4×."""
    samples = _prefill_samples((230.0, 12.0, 3.1, 0.6), noise=0.03, seed=5)
    model = fit_step_time(samples)
    assert model.fit is not None and model.fit.n_test >= 2
    held = [s for s, h in zip(samples, holdout_mask(len(samples)), strict=True) if h]
    y = np.array([s.time_ms for s in held])
    verify_mape = mape(y, predict(CPU_VERIFY, held))
    assert model.fit.mape < 0.08
    assert verify_mape > 0.3
    assert model.fit.mape < verify_mape / 4
    assert model.per_token_ms == pytest.approx(3.1, rel=0.1)


def test_two_chunk_points_separate_per_chunk_from_per_pass_cost() -> None:
    """What a chunk adds to a verification is the prefill model without its intercept, so the
    per-chunk term must not absorb the pass's fixed cost."""
    coef = (230.0, 12.0, 3.1, 0.6)
    model = fit_step_time(_prefill_samples(coef, noise=0.0, seed=0))
    got = (model.intercept_ms, model.per_row_ms, model.per_token_ms, model.per_ctx_ktoken_ms)
    assert got == pytest.approx(coef, rel=1e-3)
    # with one-chunk points only, rows ≡ 1: the fixed cost stays in the intercept
    ones = fit_step_time(_prefill_samples((242.0, 0.0, 3.1, 0.6), noise=0.0, seed=0, pairs=False))
    assert ones.per_row_ms == 0.0
    assert ones.intercept_ms == pytest.approx(242.0, rel=1e-3)


# ----------------------------------------------------------------------------- calibration


def test_calibration_recovers_a_known_acceptance_curve() -> None:
    rng = np.random.default_rng(7)
    conf = rng.uniform(0, 1, 20_000)
    accepted = rng.uniform(0, 1, conf.size) < conf  # P(accept | c) = c
    cal = calibrate(conf.tolist(), accepted.tolist(), bins=10)
    mids = (np.array(cal.bin_edges[:-1]) + np.array(cal.bin_edges[1:])) / 2
    assert np.abs(np.array(cal.accept_prob) - mids).max() < 0.04
    assert cal.counts is not None and sum(cal.counts) == conf.size
    # c uniform and P(accept | c) = c: accepted c has density 2c, rejected 2(1 − c), so
    # AUC = ∫∫_{x>y} 4x(1 − y) dy dx = 5/6.
    assert cal.auc == pytest.approx(5 / 6, abs=0.01)
    assert cal.brier is not None and 0.15 < cal.brier < 0.18  # E[c(1-c)] = 1/6


def test_calibration_merges_sparse_bins_and_stays_valid() -> None:
    conf = [0.95] * 40 + [0.15] * 2 + [0.55] * 10
    acc = [True] * 38 + [False] * 2 + [False] * 2 + [True] * 5 + [False] * 5
    cal = calibrate(conf, acc, bins=10, min_count=5)
    assert cal.counts is not None and min(cal.counts) >= 5
    assert cal.bin_edges[0] == 0.0 and cal.bin_edges[-1] == 1.0
    assert all(0.0 < p < 1.0 for p in cal.accept_prob)


def test_auc_perfect_random_and_degenerate() -> None:
    s = np.array([0.1, 0.2, 0.8, 0.9])
    assert roc_auc(s, np.array([False, False, True, True])) == 1.0
    assert roc_auc(s, np.array([True, True, False, False])) == 0.0
    assert roc_auc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5
    assert roc_auc(s, np.array([True] * 4)) is None


def test_calibration_rejects_empty_input() -> None:
    with pytest.raises(ValueError, match="no drafted tokens"):
        calibrate([], [])
