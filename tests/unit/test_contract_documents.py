"""Profile / Policy documents: camelCase JSON, strict validation, errors that name the field."""

from __future__ import annotations

import json

import pytest

from adaspec.contract import (
    AcceptanceCalibration,
    ContractError,
    FitQuality,
    Hardware,
    ModelIdentity,
    Policy,
    Profile,
    StepTimeModel,
    TimeModel,
    parse_policy,
    parse_profile,
)


def sample_profile() -> Profile:
    fit = FitQuality(r2=0.98, mape=0.04, n_train=40, n_test=10)
    return Profile(
        created_at="2026-11-29T00:00:00Z",
        hardware=Hardware(device="cpu", threads=2),
        target=ModelIdentity(name="qwen2.5-coder-1.5b-instruct"),
        draft=ModelIdentity(name="qwen2.5-coder-0.5b-instruct"),
        time_model=TimeModel(
            draft=StepTimeModel(intercept_ms=95, per_row_ms=8, fit=fit),
            verify=StepTimeModel(intercept_ms=240, per_token_ms=3, fit=fit),
        ),
        calibration=AcceptanceCalibration(
            bin_edges=[0.0, 0.5, 0.7, 1.0], accept_prob=[0.47, 0.8, 0.98], counts=[10, 20, 70]
        ),
    )


def test_profile_roundtrip_is_camel_case() -> None:
    text = sample_profile().to_json()
    doc = json.loads(text)
    assert "timeModel" in doc and "createdAt" in doc and "binEdges" in doc["calibration"]
    assert parse_profile(text) == sample_profile()


def test_policy_roundtrip_and_defaults() -> None:
    p = parse_policy('{"generation": 3, "tpotSloMs": 300, "tpotBudgetMs": 250}')
    assert p.mode == "adaptive" and p.max_draft_tokens == 8
    assert parse_policy(p.to_json()) == p


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ('{"generation": 1, "tpotSloMs": 300}', "tpotBudgetMs"),
        ('{"generation": -1, "tpotSloMs": 300, "tpotBudgetMs": 1}', "generation"),
        ('{"generation": 1, "tpotSloMs": 0, "tpotBudgetMs": 1}', "tpotSloMs"),
        ('{"generation": 1, "tpotSloMs": 1, "tpotBudgetMs": 1, "mode": "turbo"}', "mode"),
        (
            '{"generation": 1, "tpotSloMs": 1, "tpotBudgetMs": 1, "maxDraftTokens": 99}',
            "maxDraftTokens",
        ),
        ('{"generation": 1, "tpotSloMs": 1, "tpotBudgetMs": 1, "typo": 1}', "typo"),
    ],
)
def test_invalid_policy_names_the_field(doc: str, field: str) -> None:
    with pytest.raises(ContractError, match=field):
        parse_policy(doc)


def test_fixed_mode_cross_field_check() -> None:
    with pytest.raises(ContractError, match="fixedDraftTokens must not exceed maxDraftTokens"):
        parse_policy(
            '{"generation": 1, "tpotSloMs": 1, "tpotBudgetMs": 1, "mode": "fixed",'
            ' "fixedDraftTokens": 6, "maxDraftTokens": 4}'
        )


def test_not_json_is_a_clear_error() -> None:
    with pytest.raises(ContractError, match="not valid JSON"):
        parse_policy("{nope")


def test_calibration_shape_checks() -> None:
    with pytest.raises(ValueError, match="one more entry"):
        AcceptanceCalibration(bin_edges=[0.0, 1.0], accept_prob=[0.5, 0.6])
    with pytest.raises(ValueError, match="strictly increasing"):
        AcceptanceCalibration(bin_edges=[0.0, 0.5, 0.5], accept_prob=[0.5, 0.6])
    with pytest.raises(ValueError, match="within"):
        AcceptanceCalibration(bin_edges=[0.0, 1.0], accept_prob=[1.5])


def test_profile_fits_a_termination_message() -> None:
    assert len(sample_profile().to_json().encode()) <= 4096
    Policy(generation=0, tpot_slo_ms=1, tpot_budget_ms=1)
