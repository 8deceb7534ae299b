"""Measured-text acceptance: replay the real pair's drafts by output position instead of drawing
them from the statistical AcceptanceModel.

Why: with greedy decoding the output text does not depend on the policy, so the draft's
confidence and the target's verdict at output position p of request r are properties of the
request. `bench/measure_acceptance.py --replay RUN.json --report REPORT.json` decodes the very
prompts a real run sent (request i = index i of the whole scaled trace) with K drafts per step
and records every step; replaying those values lets a validation against that run compare
timing and policy logic on the texts the real engine decoded. The statistical model gets the
marginals right, but not *which* requests and passages are hard, and on a 16-request trace
that decides much of a policy's throughput.

Positions (the simulator's index is the same: output token 0 is the prompt's first token): a
measured step that starts with p tokens emitted drafts positions p…p+K−1, observes on path the
accepted ones and the first rejected one, p…p+m, records the confidences of the drafts after
the rejection (off path) at p+m+1…p+K−1, and the next step starts at p+m+1; after a fully
accepted step it starts at p+K+1, and the target's bonus token at p+K was never drafted.

Approximations:
- On-path values are exact properties of the text (the same prefix gives the same greedy draft
  and verdict), up to numerical differences between the measurement's batch-1 forwards and
  the engine's batched ones.
- An off-path confidence depends on where the step's first rejection was: the draft continues
  its own wrong token. Since the rejected draft at q depends only on the text before q, a
  simulated step whose first rejection is at q meets exactly the off-path drafts the
  measurement made after its rejection at q (every wrong position of the text is a measured
  rejection, bonus positions aside) as deep as the measured step drafted past q; the sampler
  offers those keyed by (q, depth) (RejectionKeyedDraws, `offpath_after`) and the simulator
  prefers them. This matters: measured off-path confidence rises with depth (the draft grows
  sure of its own continuation).
- Deeper than the measured step drafted past q, the simulator falls back to the value keyed by
  position: at position x the measured off-path value at x if any step drafted x off path (the
  latest such step: its rejection is the nearest before x, so it may be a later rejection
  than the simulated step's, at a shallower depth), else the fallback's. `draw()` alone (a
  caller that knows only positions) gets just this position-keyed value.
- Positions never measured (the bonus position after a fully accepted step, positions past the
  measured output, off-path positions no step drafted, requests beyond the measured ones) take
  the fallback AcceptanceModel's own draws for that request (same seed, same request index),
  so the result stays seeded and deterministic; those draws ignore the measured neighbours.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adaspec.sim.acceptance import (
    AcceptanceModel,
    AcceptanceSampler,
    BoolArray,
    FloatArray,
)
from adaspec.sim.fit import DraftStepLike, ObservedStep, fit_acceptance_steps


class MeasuredText(BaseModel):
    """One request's measured drafts by output position; None where nothing was measured."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    on_conf: list[float | None] = Field(description="on-path draft confidence at position p")
    on_acc: list[bool | None] = Field(description="did the target accept the draft at p")
    off_conf: list[float | None] = Field(
        description="confidence of a draft at p made after an earlier rejection in its step "
        "(the latest measured step that drafted p off path)"
    )
    off_after: list[list[float]] = Field(
        description="at a rejected position q: the confidences of the drafts the measured step "
        "made after it, at depth 1, 2, … (empty elsewhere)"
    )

    @model_validator(mode="after")
    def _check(self) -> MeasuredText:
        if not len(self.on_conf) == len(self.on_acc) == len(self.off_conf) == len(self.off_after):
            raise ValueError("on_conf, on_acc, off_conf and off_after need one entry per position")
        if any((c is None) != (a is None) for c, a in zip(self.on_conf, self.on_acc, strict=True)):
            raise ValueError("on_conf and on_acc must be measured at the same positions")
        if any(run and a is not False for run, a in zip(self.off_after, self.on_acc, strict=True)):
            raise ValueError("off_after may be non-empty only where on_acc is false (a rejection)")
        after = [c for run in self.off_after for c in run]
        for name, vals in (
            ("on_conf", self.on_conf),
            ("off_conf", self.off_conf),
            ("off_after", after),
        ):
            if any(c is not None and not 0.0 <= c <= 1.0 for c in vals):
                raise ValueError(f"{name} values must lie within [0, 1]")
        return self


class MeasuredAcceptance(BaseModel):
    """Per request (index in the whole trace), the measured drafts by output position, and the
    AcceptanceModel that fills whatever was not measured. An AcceptanceSource for the
    simulator: `sampler(seed).draw(request_index, n)` as AcceptanceSampler's."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    requests: list[MeasuredText]
    fallback: AcceptanceModel
    draft_len: int | None = Field(default=None, ge=1, description="the measurement's K")
    source: str = "measured text"

    def sampler(self, seed: int) -> MeasuredSampler:
        return MeasuredSampler(self, seed)

    @classmethod
    def from_steps(
        cls,
        steps: Sequence[Sequence[DraftStepLike]],
        fallback: AcceptanceModel,
        source: str = "measured text",
    ) -> MeasuredAcceptance:
        """From the steps of a fixed-K greedy measurement (adaspec.profile.measure), request by
        request in output order; ValueError naming the step that does not fit that shape."""
        texts = [_positions(req, r) for r, req in enumerate(steps)]
        lens = {len(s.on_confidence) + len(s.off_confidence) for req in steps for s in req}
        return cls(
            requests=texts,
            fallback=fallback,
            draft_len=max(lens) if lens else None,
            source=source,
        )

    @classmethod
    def from_report(
        cls, report: Mapping[str, Any], fallback: AcceptanceModel | None = None
    ) -> MeasuredAcceptance:
        """From a bench/measure_acceptance.py report. Fallback: the one given, else the model
        the report holds (fitted from these steps), else one fitted from the steps now."""
        try:
            doc = _Report.model_validate(report)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ValueError(f"{where}: {err['msg']}") from None
        steps = [[ObservedStep(s.on_conf, s.on_acc, s.off_conf) for s in req] for req in doc.steps]
        source = f"measured text: {doc.measured_on}"
        if fallback is None:
            fallback = doc.model or fit_acceptance_steps(steps, source=doc.measured_on)
        return cls.from_steps(steps, fallback, source)

    def coverage(self, output_lens: Sequence[int] | np.ndarray) -> dict[str, float]:
        """How much of a trace (request i has output_lens[i] tokens) the measurement covers:
        requests measured, and the share of decoded positions 1…len−1 (what decoding steps
        emit) with a measured on-path and off-path value; the rest comes from the fallback."""
        on = off = total = 0
        lens = [int(x) for x in output_lens]
        for r, n in enumerate(lens):
            total += max(0, n - 1)
            if r < len(self.requests):
                t = self.requests[r]
                on += sum(c is not None for c in t.on_conf[1:n])
                off += sum(c is not None for c in t.off_conf[1:n])
        return {
            "requests": float(len(lens)),
            "requests_measured": float(min(len(lens), len(self.requests))),
            "on_path_share": on / total if total else math.nan,
            "off_path_share": off / total if total else math.nan,
        }


@dataclass(frozen=True)
class _Arrays:
    on_conf: FloatArray  # NaN: not measured
    on_acc: BoolArray
    on_seen: BoolArray
    off_conf: FloatArray  # NaN: not measured
    off_after: FloatArray  # (positions, depth); NaN: not measured


class MeasuredSampler:
    """Measured values where there are some, the fallback's own draws for the same request and
    seed everywhere else."""

    def __init__(self, measured: MeasuredAcceptance, seed: int) -> None:
        self.measured = measured
        self.seed = seed
        self._fallback = AcceptanceSampler(measured.fallback, seed)
        self._texts = [
            _Arrays(
                on_conf=_floats(t.on_conf),
                on_acc=np.asarray([bool(a) for a in t.on_acc], dtype=np.bool_),
                on_seen=np.asarray([a is not None for a in t.on_acc], dtype=np.bool_),
                off_conf=_floats(t.off_conf),
                off_after=_table(t.off_after),
            )
            for t in measured.requests
        ]

    def draw(self, request_index: int, n: int) -> tuple[FloatArray, BoolArray, FloatArray]:
        """(on-path confidence, on-path accepted, off-path confidence), each of length n."""
        on, acc, off = self._fallback.draw(request_index, n)
        if not 0 <= request_index < len(self._texts):
            return on, acc, off
        t = self._texts[request_index]
        m = min(n, t.on_conf.shape[0])
        seen = t.on_seen[:m]
        on[:m] = np.where(seen, t.on_conf[:m], on[:m])
        acc[:m] = np.where(seen, t.on_acc[:m], acc[:m])
        off_seen = ~np.isnan(t.off_conf[:m])
        off[:m] = np.where(off_seen, t.off_conf[:m], off[:m])
        return on, acc, off

    def offpath_after(self, request_index: int, n: int, depth: int) -> FloatArray:
        """(n, depth): row q, column d−1 = the measured confidence of the draft d positions
        after a rejection at q; NaN where not measured (RejectionKeyedDraws)."""
        out = np.full((n, depth), np.nan)
        if 0 <= request_index < len(self._texts):
            t = self._texts[request_index].off_after
            m, d = min(n, t.shape[0]), min(depth, t.shape[1])
            out[:m, :d] = t[:m, :d]
        return out


def load_measured_acceptance(
    path: str | Path, fallback: AcceptanceModel | None = None
) -> MeasuredAcceptance:
    """A bench/measure_acceptance.py report (--report) as a MeasuredAcceptance; errors name the
    file and the field."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"measured-text report {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(
            f"measured-text report {path}: not JSON ({e.msg}, line {e.lineno})"
        ) from None
    if not isinstance(doc, dict):
        raise ValueError(f"measured-text report {path}: expected a JSON object")
    try:
        return MeasuredAcceptance.from_report(doc, fallback)
    except ValueError as e:
        raise ValueError(f"measured-text report {path}: {e}") from None


def measured_run_name(measured: MeasuredAcceptance) -> str | None:
    """The real run whose prompts the report was measured on (the file name
    measure_acceptance --replay writes into the source), or None."""
    m = re.search(r"replayed prompts of (\S+)", measured.source)
    return m.group(1) if m else None


# ----------------------------------------------------------------------------- internals


class _ReportStep(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    on_conf: list[float] = Field(min_length=1)
    on_acc: list[bool] = Field(min_length=1)
    off_conf: list[float] = Field(default_factory=list)


class _Report(BaseModel):
    """The fields of a measure_acceptance report this module reads."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    steps: list[list[_ReportStep]] = Field(
        description="per request, its steps in output order (a report from before off-path "
        "recording has none)"
    )
    measured_on: str = "measured"
    model: AcceptanceModel | None = None


def _floats(vals: Sequence[float | None]) -> FloatArray:
    return np.asarray([math.nan if v is None else v for v in vals], dtype=np.float64)


def _table(runs: Sequence[Sequence[float]]) -> FloatArray:
    out = np.full((len(runs), max((len(x) for x in runs), default=0)), np.nan)
    for q, run in enumerate(runs):
        out[q, : len(run)] = run
    return out


def _positions(req: Sequence[DraftStepLike], r: int) -> MeasuredText:
    """Lay one request's steps out by output position (see the module docstring)."""
    on_conf: dict[int, float] = {}
    on_acc: dict[int, bool] = {}
    off_conf: dict[int, float] = {}
    off_after: dict[int, list[float]] = {}
    p = 0  # tokens emitted before the step
    for k, s in enumerate(req):
        where = f"steps[{r}][{k}]"
        conf, acc, off = list(s.on_confidence), [bool(a) for a in s.on_accepted], s.off_confidence
        if not conf or len(conf) != len(acc):
            raise ValueError(f"{where}: on_conf and on_acc need the same, non-zero length")
        if not all(acc[:-1]):
            raise ValueError(
                f"{where}: on_acc must be the accepted drafts then at most one rejected one, "
                f"got {acc}"
            )
        if acc[-1] and off:
            raise ValueError(f"{where}: off_conf after a step that rejected nothing")
        if any(not 0.0 <= c <= 1.0 for c in [*conf, *off]):
            raise ValueError(f"{where}: confidences must lie within [0, 1]")
        for j, (c, a) in enumerate(zip(conf, acc, strict=True)):
            on_conf[p + j], on_acc[p + j] = float(c), a
        for j, c in enumerate(off):
            off_conf[p + len(conf) + j] = float(c)  # a later step overwrites: nearer rejection
        if off:
            off_after[p + len(conf) - 1] = [float(c) for c in off]
        p += sum(acc) + 1
    n = max([*on_conf, *off_conf], default=-1) + 1
    return MeasuredText(
        on_conf=[on_conf.get(i) for i in range(n)],
        on_acc=[on_acc.get(i) for i in range(n)],
        off_conf=[off_conf.get(i) for i in range(n)],
        off_after=[off_after.get(i, []) for i in range(n)],
    )
