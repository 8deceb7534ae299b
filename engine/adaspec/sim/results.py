"""Per-request and per-step results, and the summary every benchmark reports.

The same `summarize` is used for simulated runs and for real runs measured by the replay
client, so "simulated vs measured" compares like with like.

Definitions (per request): TTFT = first token − arrival; TPOT = (finish − first token) /
(output tokens − 1) (undefined for one-token outputs: such a request meets the SLO iff its TTFT
does not matter, so it is counted as meeting it); e2e = finish − arrival.
Run level: duration = last finish − first arrival; throughput = Σ tokens / duration; goodput =
Σ tokens of requests with TPOT ≤ SLO / duration; SLO attainment = share of requests with TPOT ≤
SLO; acceptance = accepted / verified draft tokens; mean speculative length = verified draft
tokens per request-step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class RequestRecord:
    index: int
    arrival_s: float
    first_token_s: float
    finish_s: float
    prompt_len: int
    output_len: int

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.output_len <= 1:
            return None
        return (self.finish_s - self.first_token_s) / (self.output_len - 1)

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.arrival_s


@dataclass
class StepLog:
    """One row per decoding step (column arrays once finished)."""

    start_s: list[float] = field(default_factory=list)
    duration_s: list[float] = field(default_factory=list)
    batch: list[int] = field(default_factory=list)
    proposed: list[int] = field(default_factory=list)
    verified: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    emitted: list[int] = field(default_factory=list)
    """Tokens decoding requests emitted (first tokens, which end a prefill, not included)."""
    prefill_tokens: list[int] = field(default_factory=list)
    """Prompt tokens fed as chunks (chunked prefill; batch 0 when the step only prefilled)."""
    spec_lens: list[list[int]] = field(default_factory=list)
    """Verified draft tokens per request (only when the run records them)."""

    def column(self, name: str) -> NDArray[np.float64]:
        return np.asarray(getattr(self, name), dtype=np.float64)


class Summary(BaseModel):
    model_config = ConfigDict(frozen=True)
    requests: int
    completed: int
    duration_s: float
    tokens: int
    throughput_tok_s: float
    goodput_tok_s: float
    slo_attainment: float
    tpot_slo_ms: float
    tpot_p50_ms: float
    tpot_p90_ms: float
    tpot_p99_ms: float
    tpot_mean_ms: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    e2e_p90_s: float
    mean_spec_len: float | None = None
    acceptance: float | None = None
    steps: int | None = None
    mean_batch: float | None = None


def _pct(x: NDArray[np.float64], q: float) -> float:
    return float(np.percentile(x, q)) if x.size else float("nan")


def summarize(
    records: list[RequestRecord],
    tpot_slo_s: float,
    *,
    n_requests: int | None = None,
    verified: float | None = None,
    accepted: float | None = None,
    request_steps: float | None = None,
    steps: int | None = None,
) -> Summary:
    """Run-level numbers from finished requests (and draft counters when known)."""
    n = n_requests if n_requests is not None else len(records)
    if not records:
        nan = float("nan")
        return Summary(
            requests=n, completed=0, duration_s=0.0, tokens=0, throughput_tok_s=0.0,
            goodput_tok_s=0.0, slo_attainment=0.0, tpot_slo_ms=tpot_slo_s * 1e3,
            tpot_p50_ms=nan, tpot_p90_ms=nan, tpot_p99_ms=nan, tpot_mean_ms=nan,
            ttft_p50_ms=nan, ttft_p90_ms=nan, e2e_p90_s=nan,
        )  # fmt: skip
    start = min(r.arrival_s for r in records)
    end = max(r.finish_s for r in records)
    duration = max(end - start, 1e-9)
    tp = [r.tpot_s for r in records]
    tpot = np.asarray([t for t in tp if t is not None], dtype=np.float64)
    meets = [t is None or t <= tpot_slo_s for t in tp]
    tokens = sum(r.output_len for r in records)
    good = sum(r.output_len for r, ok in zip(records, meets, strict=True) if ok)
    ttft = np.asarray([r.ttft_s for r in records])
    e2e = np.asarray([r.e2e_s for r in records])
    return Summary(
        requests=n,
        completed=len(records),
        duration_s=duration,
        tokens=tokens,
        throughput_tok_s=tokens / duration,
        goodput_tok_s=good / duration,
        # unfinished requests count as misses
        slo_attainment=sum(meets) / max(n, 1),
        tpot_slo_ms=tpot_slo_s * 1e3,
        tpot_p50_ms=_pct(tpot, 50) * 1e3,
        tpot_p90_ms=_pct(tpot, 90) * 1e3,
        tpot_p99_ms=_pct(tpot, 99) * 1e3,
        tpot_mean_ms=float(tpot.mean()) * 1e3 if tpot.size else float("nan"),
        ttft_p50_ms=_pct(ttft, 50) * 1e3,
        ttft_p90_ms=_pct(ttft, 90) * 1e3,
        e2e_p90_s=_pct(e2e, 90),
        mean_spec_len=(
            (verified / request_steps) if verified is not None and request_steps else None
        ),
        acceptance=(accepted / verified) if accepted is not None and verified else None,
        steps=steps,
        mean_batch=(request_steps / steps) if request_steps is not None and steps else None,
    )
