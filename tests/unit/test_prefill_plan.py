"""The SLO-aware chunked-prefill planner (pure): FIFO chunks that keep a plain step in budget."""

from __future__ import annotations

import math

import pytest

from adaspec.contract import StepTimeModel, TimeModel
from adaspec.policy.prefill import chunk_ctx_work, plain_step_s, plan_prefill
from adaspec.policy.time_model import StepTimePredictor

# prefill: 0.5 ms per prompt token and 0.01 ms per 1000 tokens of attention work
TIMES = StepTimePredictor(
    TimeModel(
        draft=StepTimeModel(intercept_ms=2.0, per_row_ms=0.01),
        verify=StepTimeModel(intercept_ms=20.0, per_row_ms=0.05, per_token_ms=0.02),
        prefill=StepTimeModel(
            intercept_ms=25.0, per_row_ms=0.1, per_token_ms=0.5, per_ctx_ktoken_ms=0.01
        ),
    )
)


def cost(n: int, done: int) -> float:
    return TIMES.prefill_extra(1, n, chunk_ctx_work(done, n)) if n else 0.0


def test_chunk_ctx_work_counts_each_token_against_all_before_it() -> None:
    # tokens 11..13 attend to 11, 12 and 13 positions
    assert chunk_ctx_work(10, 3) == 11 + 12 + 13
    assert chunk_ctx_work(0, 1) == 1


def test_no_decoding_rows_means_full_chunks_in_arrival_order() -> None:
    plan = plan_prefill(
        TIMES, [300, 400, 50], [0, 100, 0], decode_rows=0, plain_step_s=0.0, budget_s=0.001
    )
    assert plan.chunks == (300, 212, 0)  # FIFO: the oldest first, max_chunk=512 in all
    assert plan.extra_s == pytest.approx(cost(300, 0) + cost(212, 100))


def test_no_budget_means_full_chunks() -> None:
    plan = plan_prefill(
        TIMES, [100, 900], [0, 0], decode_rows=4, plain_step_s=0.02, budget_s=None, max_chunk=256
    )
    assert plan.chunks == (100, 156)


@pytest.mark.parametrize("room_ms", [3.0, 12.5, 40.0])
def test_chunks_fill_the_budget_and_no_more(room_ms: float) -> None:
    plain = 0.021
    budget = plain + room_ms / 1000.0
    remaining, done = [30, 500, 500], [0, 64, 0]
    plan = plan_prefill(
        TIMES, remaining, done, decode_rows=3, plain_step_s=plain, budget_s=budget, min_chunk=1
    )
    assert plain + plan.extra_s <= budget + 1e-12
    pairs = list(zip(plan.chunks, done, strict=True))
    assert plan.extra_s == pytest.approx(sum(cost(n, d) for n, d in pairs))
    # FIFO and maximal: a later request gets tokens only once every earlier one is complete
    # (here one more token always costs less than a new chunk's per-row cost), and one more
    # token for the first request that is not complete would break the budget
    first_open = next(i for i, n in enumerate(plan.chunks) if n < remaining[i])
    assert all(n == 0 for n in plan.chunks[first_open + 1 :])
    n, d = plan.chunks[first_open], done[first_open]
    assert plain + plan.extra_s - cost(n, d) + cost(n + 1, d) > budget


def test_the_oldest_prompt_progresses_by_min_chunk_when_there_is_no_room() -> None:
    plan = plan_prefill(
        TIMES, [200, 100], [0, 0], decode_rows=2, plain_step_s=0.05, budget_s=0.04, min_chunk=32
    )
    assert plan.chunks == (32, 0)  # over budget already: only the forced progress
    assert plan.extra_s == pytest.approx(cost(32, 0))
    short = plan_prefill(
        TIMES, [5, 100], [7, 0], decode_rows=2, plain_step_s=0.05, budget_s=0.04, min_chunk=32
    )
    assert short.chunks == (5, 0)  # never more than the prompt has left


def test_min_chunk_is_a_floor_not_a_cap() -> None:
    plan = plan_prefill(
        TIMES, [400], [0], decode_rows=1, plain_step_s=0.02, budget_s=0.1, min_chunk=8
    )
    assert plan.chunks[0] > 8
    assert 0.02 + plan.extra_s <= 0.1


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"remaining": [1, 2], "done": [0]}, "remaining and done"),
        ({"remaining": [-1]}, "remaining"),
        ({"done": [-3]}, "done"),
        ({"decode_rows": -1}, "decode_rows"),
        ({"plain_step_s": -0.1}, "plain_step_s"),
        ({"plain_step_s": math.nan}, "plain_step_s"),
        ({"budget_s": 0.0}, "budget_s"),
        ({"budget_s": math.inf}, "budget_s"),
        ({"max_chunk": 0}, "max_chunk"),
        ({"min_chunk": 0}, "min_chunk"),
        ({"min_chunk": 600}, "min_chunk"),
    ],
)
def test_bad_arguments_name_the_argument(kw: dict[str, object], name: str) -> None:
    args: dict[str, object] = {
        "remaining": [10],
        "done": [0],
        "decode_rows": 1,
        "plain_step_s": 0.02,
        "budget_s": 0.05,
        "max_chunk": 512,
        "min_chunk": 32,
    }
    args.update(kw)
    remaining, done = args.pop("remaining"), args.pop("done")
    with pytest.raises(ValueError, match=name):
        plan_prefill(TIMES, remaining, done, **args)  # type: ignore[arg-type]


def test_plain_step_is_a_plain_verification_plus_the_chunks_draft_forward() -> None:
    verify = TIMES.verify(3, 3, 600.0)
    assert plain_step_s(TIMES, 3, 600.0, has_draft=False) == pytest.approx(verify)
    assert plain_step_s(TIMES, 3, 600.0, has_draft=True) == pytest.approx(
        verify + TIMES.draft_forward_fixed_s
    )
    assert TIMES.draft_forward_fixed_s > 0
    assert plain_step_s(TIMES, 0, 0.0, has_draft=True) == 0.0  # nobody decodes: nobody waits
