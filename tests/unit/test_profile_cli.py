"""`adaspec profile` argument handling, grid construction and the 4 KiB JSON limit."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from adaspec.contract import (
    AcceptanceCalibration,
    FitQuality,
    Hardware,
    ModelIdentity,
    Profile,
    StepTimeModel,
    TimeModel,
    parse_profile,
)
from adaspec.profile import cli
from adaspec.profile.grid import DEFAULT_GRID, QUICK_GRID, parse_int_list


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_default_and_quick_grids_have_enough_points_to_fit() -> None:
    for grid in (DEFAULT_GRID, QUICK_GRID):
        assert len(grid.draft_points()) >= 6
        assert len(grid.verify_points()) >= 6
        assert all(p.q == 1 for p in grid.draft_points())
        assert all(p.tokens <= grid.max_step_tokens for p in grid.verify_points())
    assert len(QUICK_GRID.verify_points()) < len(DEFAULT_GRID.verify_points())


def test_axes_can_be_overridden() -> None:
    grid = cli.grid_from_args(
        _args(
            "--batch-sizes",
            "4,1,2,2",
            "--verify-tokens",
            "3,5",
            "--context-lengths",
            "100,900",
            "--max-step-tokens",
            "20",
            "--repeats",
            "5",
            "--warmup",
            "0",
            "--prefill-tokens",
            "64,16,300",
            "--prefill-offsets",
            "700,0",
        )
    )
    assert grid.batch_sizes == (1, 2, 4)
    assert grid.verify_tokens == (3, 5)
    assert grid.context_lengths == (100, 900)
    assert (grid.max_step_tokens, grid.repeats, grid.warmup) == (20, 5, 0)
    assert {p.tokens for p in grid.verify_points()} <= set(range(21))
    assert grid.prefill_tokens == (16, 64, 300) and grid.prefill_offsets == (0, 700)
    # the longest row is a prefill chunk now: 300 prompt tokens on top of 700 cached
    assert grid.max_context == 1000
    skipped = cli.grid_from_args(_args("--skip-prefill", "--context-lengths", "100,900"))
    assert skipped.prefill_points() == [] and skipped.max_context == 908


def test_prefill_points_cover_chunk_sizes_offsets_and_two_chunk_passes() -> None:
    for grid in (DEFAULT_GRID, QUICK_GRID):
        points = grid.prefill_points()
        assert len(points) >= 6
        ones = {(p.n, p.offset) for p in points if p.batch == 1}
        assert ones == {(n, d) for n in grid.prefill_tokens for d in grid.prefill_offsets}
        assert any(p.batch == 2 for p in points)  # separates per-chunk from per-pass cost
        assert 0 in grid.prefill_offsets  # a prompt's first chunk
        assert grid.max_context >= max(p.offset + p.n for p in points)
    # the engine feeds up to 512 prompt tokens per step; the default grid spans that range
    assert min(DEFAULT_GRID.prefill_tokens) <= 16 and max(DEFAULT_GRID.prefill_tokens) >= 512


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-sizes", "1,x"], "--batch-sizes: 'x' is not an integer"),
        (["--context-lengths", "0,5"], "--context-lengths: 0 is below the minimum 1"),
        (["--verify-tokens", ","], "--verify-tokens: expected a comma-separated list"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--batch-sizes", "1", "--context-lengths", "64"], "fewer than 6 draft points"),
        (["--max-step-tokens", "1"], "fewer than 6 verification points"),
        (["--calib-bins", "0"], "--calib-bins must be >= 1"),
        (["--prefill-offsets=-1,0"], "--prefill-offsets: -1 is below the minimum 0"),
        (["--prefill-tokens", "16", "--prefill-offsets", "0"], "fewer than 6 prefill points"),
    ],
)
def test_bad_flags_exit_2_with_the_flag_named(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.run(_args(*argv)) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_unknown_model_source_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(_args("--quick", "--target", "/no/such/model")) == 1
    err = capsys.readouterr().err
    assert "'/no/such/model'" in err and "Traceback" not in err


def test_parse_int_list_sorts_and_dedups() -> None:
    assert parse_int_list(" 8, 1,4,1 ", "--x") == (1, 4, 8)


def _big_profile(bins: int) -> Profile:
    fit = FitQuality(r2=-0.123456, mape=0.123456, n_train=123, n_test=45)
    step = StepTimeModel(
        intercept_ms=12345.6789,
        per_row_ms=123.4567,
        per_token_ms=123.4567,
        per_ctx_ktoken_ms=12.34567,
        fit=fit,
    )
    edges = [round(i / bins, 4) for i in range(bins + 1)]
    name = "/models/" + "x" * 200 + "/some-really-long-model-folder-name"
    return Profile(
        created_at="2026-01-01T00:00:00Z",
        hardware=Hardware(device="cuda:NVIDIA H200 141GB HBM3e", threads=256, backend="torch"),
        target=ModelIdentity(name=name, sha256="a" * 64),
        draft=ModelIdentity(name=name, sha256="b" * 64),
        time_model=TimeModel(draft=step, verify=step, prefill=step),
        calibration=AcceptanceCalibration(
            bin_edges=edges,
            accept_prob=[0.1234] * bins,
            counts=[123456] * bins,
            auc=0.9123,
            brier=0.0789,
        ),
    )


def test_worst_case_default_profile_fits_the_termination_message() -> None:
    text = cli.compact_json(_big_profile(10))
    assert len(text.encode()) <= cli.TERMINATION_MESSAGE_LIMIT
    assert "\n" not in text
    assert parse_profile(text) == _big_profile(10)


def test_oversized_profile_is_refused_with_advice() -> None:
    with pytest.raises(cli.ProfileError, match="--calib-bins"):
        cli.compact_json(_big_profile(200))


def test_cli_dispatch_reports_bad_flag_without_loading_models() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "adaspec.cli", "profile", "--repeats", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--repeats must be >= 1" in proc.stderr
    assert proc.stdout == ""


class _FakeTokenizer:
    """Character-level stand-in: enough to check which text reaches the tokenizer."""

    def __init__(self, chat_template: str | None) -> None:
        self.chat_template = chat_template
        self.seen: list[str] = []

    def apply_chat_template(self, messages: list[dict[str, str]], **_: object) -> str:
        return f"<user>{messages[0]['content']}<assistant>"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        self.seen.append(text)
        return {"input_ids": [ord(c) for c in text]}


def test_prompts_use_the_chat_template_only_when_there_is_one() -> None:
    from adaspec.profile.prompts import CHAT_PROMPTS, CODE_PROMPTS, encode_prompts

    chat = _FakeTokenizer("{{ template }}")
    ids = encode_prompts(chat, 2, 3)
    assert len(ids) == 5
    assert chat.seen[0] == f"<user>{CHAT_PROMPTS[0]}<assistant>"
    assert chat.seen[2] == CODE_PROMPTS[0]
    base = _FakeTokenizer(None)
    encode_prompts(base, 1, 0)
    assert base.seen == [CHAT_PROMPTS[0]]
