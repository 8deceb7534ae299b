"""The engine's per-step log (`adaspec serve --step-log PATH`): where real step time goes.

One JSON object per line per engine step (one backend `step` call, steps that only feed prompt
chunks included; a step that raises is not logged and does not count), written by the engine
thread and flushed line by line, so a server stopped by SIGTERM loses at most the step in flight.
It sets what a step really cost in the engine — model forwards per draft pass, verification, time
inside the policy, the engine's own work between steps — against the Profile's time model, which
the profiler fits to minimum-of-repeats ModelRunner.forward timings.

Times are seconds on the monotonic clock. `gap_s` runs from the end of the previous logged step's
backend call (its `t_start + wall_s`) to this step's `t_start`: token delivery, detokenization,
aborts, policy reload, admission (whole-prompt prefills without chunking) and idle waits all land
there, so `t_start[n] == t_start[n-1] + wall_s[n-1] + gap_s[n]`.

Per-pass fields come from the backend's StepStats. The torch backend fills them; the scripted
backend (adaspec.server.scripted) cannot measure them and leaves `context_lens`, `draft_rows`,
`draft_ctx` and `draft_pass_s` empty and `policy_s` 0.0. The vLLM backend does not run the
engine's step loop, so `adaspec serve` refuses --step-log with it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import IO, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adaspec.backends.base import StepStats

log = logging.getLogger("adaspec.step_log")

STEP_LOG_VERSION: Literal[1] = 1


_Count = Annotated[int, Field(ge=0)]
_Secs = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class StepRecord(BaseModel):
    """One engine step as `adaspec serve --step-log` writes it (format version 1; seconds)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = STEP_LOG_VERSION
    step: _Count
    t_start: Annotated[float, Field(allow_inf_nan=False)]
    wall_s: _Secs
    """The whole backend step call (prefill planning included)."""
    gap_s: _Secs | None
    """Previous step's end → this step's start; None for the first."""
    policy: str = Field(min_length=1)
    """The live SpecPolicy's `name` ("off", "fixed-3", "adaspec", "smartspec", "threshold")."""
    generation: int | None
    batch: _Count
    """Decoding rows B."""
    context_lens: list[_Count]
    """Target context per decoding row at step start (empty: the backend does not report it)."""
    draft_rows: list[Annotated[int, Field(ge=1)]]
    draft_ctx: list[_Count]
    """Per pass j: Σ over its drafting rows of (context_len + j)."""
    draft_pass_s: list[_Secs]
    """Per pass, policy calls excluded."""
    draft_s: _Secs
    policy_s: _Secs
    verify_s: _Secs
    verified: list[_Count]
    """Verified draft tokens per decoding row."""
    proposed: _Count
    accepted: _Count
    prefill_rows: _Count
    prefill_tokens: _Count
    prefill_ctx_work: _Secs
    prefill_extra_pred_s: _Secs
    emitted: _Count
    """Tokens the backend returned, first tokens of finished prefills included."""

    @model_validator(mode="after")
    def _consistent(self) -> StepRecord:
        b = self.batch
        if self.context_lens and len(self.context_lens) != b:
            raise ValueError(
                f"context_lens: {len(self.context_lens)} entries for batch {b} (one per "
                "decoding row, or none when the backend does not report them)"
            )
        if len(self.verified) != b:
            raise ValueError(f"verified: {len(self.verified)} entries for batch {b}")
        n = len(self.draft_rows)
        for name, got in (("draft_ctx", self.draft_ctx), ("draft_pass_s", self.draft_pass_s)):
            if len(got) != n:
                raise ValueError(f"{name}: {len(got)} entries for {n} draft passes (draft_rows)")
        if any(r > b for r in self.draft_rows):
            raise ValueError(f"draft_rows: a pass drafts more rows than batch {b}")
        if self.draft_rows and sum(self.draft_rows) != self.proposed:
            raise ValueError(
                f"draft_rows: Σ {sum(self.draft_rows)} ≠ proposed {self.proposed} (each "
                "drafting row proposes one token per pass)"
            )
        if sum(self.verified) > self.proposed:
            raise ValueError(f"verified: Σ {sum(self.verified)} > proposed {self.proposed}")
        if self.accepted > sum(self.verified):
            raise ValueError(f"accepted: {self.accepted} > Σ verified {sum(self.verified)}")
        if (self.prefill_rows > 0) != (self.prefill_tokens > 0):
            raise ValueError(
                f"prefill_rows ({self.prefill_rows}) and prefill_tokens ({self.prefill_tokens}) "
                "must both be 0 or both > 0"
            )
        return self

    @property
    def detailed(self) -> bool:
        """Whether the backend reported per-pass detail (the scripted backend does not)."""
        has_ctx = self.batch == 0 or len(self.context_lens) == self.batch
        return has_ctx and (self.proposed == 0 or bool(self.draft_rows))


def step_record(
    stats: StepStats,
    *,
    step: int,
    t_start: float,
    wall_s: float,
    gap_s: float | None,
    policy: str,
    generation: int | None,
    prefill_rows: int,
    prefill_ctx_work: float,
    prefill_extra_pred_s: float,
    emitted: int,
) -> StepRecord:
    """The record of one step from the backend's StepStats and what the engine knows.

    Built without validation: the engine thread must never fail a step over its log; readers
    (adaspec.sim.step_log) validate every record, cross-field checks included."""
    return StepRecord.model_construct(
        step=step,
        t_start=t_start,
        wall_s=wall_s,
        gap_s=gap_s,
        policy=policy,
        generation=generation,
        batch=stats.batch,
        context_lens=list(stats.context_lens),
        draft_rows=list(stats.draft_rows),
        draft_ctx=list(stats.draft_ctx),
        draft_pass_s=list(stats.draft_pass_s),
        draft_s=stats.draft_time_s,
        policy_s=stats.policy_s,
        verify_s=stats.verify_time_s,
        verified=list(stats.spec_lens),
        proposed=stats.proposed,
        accepted=stats.accepted,
        prefill_rows=prefill_rows,
        prefill_tokens=stats.prefill_tokens,
        prefill_ctx_work=prefill_ctx_work,
        prefill_extra_pred_s=prefill_extra_pred_s,
        emitted=emitted,
    )


class StepLog:
    """A JSON Lines step log, owned by the engine thread once the engine starts.

    `open` truncates the file (one log per server run). Each record is flushed as it is written.
    A write that fails (disk full, ...) stops the log with one error line; the engine keeps
    serving. `close` is idempotent and may race the engine thread's last write (a lock orders
    them; writes after close are dropped).
    """

    def __init__(self, path: Path, stream: IO[str]) -> None:
        self.path = path
        self._stream: IO[str] | None = stream
        self._lock = threading.Lock()
        self._last_end: float | None = None
        self.written = 0

    @classmethod
    def open(cls, path: Path | str) -> StepLog:
        """Open (truncate) `path` for writing; OSError when it cannot be (missing folder, no
        permission, a directory)."""
        p = Path(path)
        return cls(p, p.open("w", encoding="utf-8", buffering=1))

    @property
    def closed(self) -> bool:
        return self._stream is None

    def gap_before(self, t_start: float) -> float | None:
        """Seconds since the previous logged step's backend call ended (None before the first)."""
        # ≥ 0 on a monotonic clock; max() only absorbs float rounding of t_start + wall_s
        return None if self._last_end is None else max(0.0, t_start - self._last_end)

    def write(self, record: StepRecord) -> None:
        line = record.model_dump_json() + "\n"
        with self._lock:
            if self._stream is None:
                return
            try:
                self._stream.write(line)
                self._stream.flush()
            except (OSError, ValueError) as e:
                log.error("step log %s: write failed, logging stops: %s", self.path, e)
                self._close_locked()
                return
            self._last_end = record.t_start + record.wall_s
            self.written += 1

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except OSError as e:
                log.error("step log %s: close failed: %s", self.path, e)
