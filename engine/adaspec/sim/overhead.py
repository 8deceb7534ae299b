"""Engine time the Profile's time model does not see, as the simulator adds it to its clock.

The profiler times bare model forwards (minimum of repeats); the engine also chooses tokens,
rolls caches back, calls the policy, builds contexts, delivers and detokenizes tokens, admits
requests. `EngineOverhead` prices that work linearly and never below zero; it is fitted from
real step logs by adaspec.sim.step_log.fit_overhead, never set by hand.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


def _ms(what: str) -> float:
    """A non-negative coefficient in milliseconds, 0 unless fitted."""
    return Field(default=0.0, ge=0.0, allow_inf_nan=False, description=what)


class EngineOverhead(BaseModel):
    """Milliseconds added per draft pass, per verification, inside each step and between
    steps. All zero adds exactly nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_draft_pass_ms: float = _ms("each draft pass")
    per_draft_row_ms: float = _ms("each draft pass, per drafting row")
    per_verify_ms: float = _ms("each verification of decoding rows")
    per_verify_row_ms: float = _ms("each verification, per decoding row")
    per_verify_token_ms: float = _ms("each verification, per token fed (Σs + B)")
    per_step_ms: float = _ms("each step, outside its forwards and its policy calls")
    per_step_row_ms: float = _ms("each step, per decoding row")
    per_gap_ms: float = _ms("between a step and the next (token delivery, admission)")
    per_gap_row_ms: float = _ms("between steps, per decoding row of the step before")
    per_gap_emitted_token_ms: float = _ms("between steps, per token the step before emitted")

    def draft_pass_s(self, rows: float) -> float:
        return (self.per_draft_pass_ms + self.per_draft_row_ms * rows) / 1000.0

    def verify_s(self, rows: float, tokens: float) -> float:
        return (
            self.per_verify_ms + self.per_verify_row_ms * rows + self.per_verify_token_ms * tokens
        ) / 1000.0

    def in_step_s(self, rows: float) -> float:
        return (self.per_step_ms + self.per_step_row_ms * rows) / 1000.0

    def gap_s(self, rows: float, emitted: float) -> float:
        return (
            self.per_gap_ms + self.per_gap_row_ms * rows + self.per_gap_emitted_token_ms * emitted
        ) / 1000.0
