"""What the Profile's time model says one forward pass of the engine costs (noiseless seconds).

One place for the arithmetic, so the simulator's clock (adaspec.sim.simulator) and the step-log
analysis (adaspec.sim.step_log), which sets real step times against the same predictions, can
never price a pass differently.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from adaspec.contract import StepTimeModel, TimeModel


def pass_s(
    m: StepTimeModel, rows: float, tokens: float, ctx_work: float, intercept: bool = True
) -> float:
    """`m` at (rows, tokens, ctx_work) in seconds; without its intercept when a pass rides
    along with another that pays it."""
    ms = (m.intercept_ms if intercept else 0.0) + m.per_row_ms * rows + m.per_token_ms * tokens
    return (ms + m.per_ctx_ktoken_ms * ctx_work / 1000.0) / 1000.0


def draft_pass_s(model: TimeModel, rows: float, ctx_work: float) -> float:
    """One draft pass: one token per drafting row; `ctx_work` = Σ over them of (L + j)."""
    return pass_s(model.draft, rows, rows, ctx_work)


def verify_work(
    spec_lens: NDArray[np.int64], context_lens: NDArray[np.int64]
) -> tuple[float, float]:
    """(tokens, ctx_work) of a verification: row i feeds s_i + 1 tokens after L_i cached ones."""
    sf = spec_lens.astype(np.float64)
    b = int(spec_lens.shape[0])
    return float(sf.sum() + b), float(((sf + 1.0) * context_lens + sf * (sf + 1.0) / 2.0).sum())


def verify_pass_s(model: TimeModel, rows: float, tokens: float, ctx_work: float) -> float:
    return pass_s(model.verify, rows, tokens, ctx_work)


def prompt_s(
    model: TimeModel,
    rows: float,
    tokens: float,
    ctx_work: float,
    intercept: bool,
    prefill_draft: bool,
) -> float:
    """Prompt tokens into the target (and, with `prefill_draft`, the draft) cache: the prefill
    model when the profile has one (measured for both together), else verify + draft."""
    if model.prefill is not None:
        return pass_s(model.prefill, rows, tokens, ctx_work, intercept)
    t = pass_s(model.verify, rows, tokens, ctx_work, intercept)
    if prefill_draft:
        t += pass_s(model.draft, rows, tokens, ctx_work, intercept)
    return t


def chunk_extra_s(
    model: TimeModel, rows: float, tokens: float, ctx_work: float, prefill_draft: bool
) -> float:
    """What prompt chunks add to the verification forward they ride along with: the prompt cost
    without its intercept (0 without chunks)."""
    return prompt_s(model, rows, tokens, ctx_work, False, prefill_draft) if tokens > 0 else 0.0


def draft_fixed_s(model: TimeModel) -> float:
    """A draft forward's fixed cost: a step with chunks that drafts nothing still runs the draft
    over them."""
    return pass_s(model.draft, 0, 0, 0)
