"""Where real engine step time goes, against the Profile's time model, and the engine overhead
the simulator should add for what the profile misses.

`adaspec serve --step-log PATH` writes one JSON object per engine step (format version 1,
`StepRecord`). This module reads such logs (`load_step_logs`: errors name file:line and field),
prices every logged pass exactly as the simulator's clock does (adaspec.sim.pricing) and sets
the two side by side per component (`compare`):

- draft_pass: each draft pass (`draft_pass_s`) vs the draft model;
- verify: the verification of a decoding step without prompt chunks vs the verify model;
- chunk_step: a decoding step carrying prompt chunks: draft pass 0 + verification (the draft's
  copy of the chunks rides along with pass 0, the target's with the verification; the
  simulator prices both inside the verification) vs draft pass + verify + chunk extra;
- prefill_pass: a step with no decoding rows (chunks alone) vs the prompt model;
- policy: time inside policy calls (`policy_s`; the simulator charges it only with
  `SimConfig.charge_policy_time`);
- in_step: the rest of the step call (wall_s − Σ draft_pass_s − verify_s − policy_s):
  prefill planning, contexts, bookkeeping outside the forwards;
- gap: between the end of a step and the start of the next (`gap_s`: token delivery,
  detokenization, admission), predicted 0. Only *busy* gaps count: the gap before a step with
  decoding rows, in a log with chunked prefill. With chunked prefill a request that arrives at
  an idle engine first spends a step prefilling with no decoding rows, so an idle wait never
  precedes a step with decoding rows; without chunking (no record feeds chunks) gaps hold
  whole-prompt prefills, which the simulator prices itself, and are left out;
- total: per step, wall_s + its busy gap vs the model's prediction.

`fit_overhead` fits an EngineOverhead to the residuals (measured − predicted) of draft_pass,
verify, in_step and gap by non-negative least squares (`nnls`: exact, by trying the plain
least-squares fit on every subset of the few features; scipy is not a dependency), against
the features that plausibly drive each: per pass 1 and rows; per verification 1, rows and tokens
fed; per step 1 and decoding rows; per gap 1, and the step before's decoding rows and emitted
tokens. chunk_step and prefill_pass are not fitted (how their time splits between the two
forwards is not logged); the simulator still adds the pass and verification overhead to them.
`exclude` leaves policies out of a fit, so a validation can predict a policy from the others'
steps only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, ValidationError

from adaspec.contract import TimeModel
from adaspec.sim.overhead import EngineOverhead
from adaspec.sim.pricing import (
    chunk_extra_s,
    draft_fixed_s,
    draft_pass_s,
    prompt_s,
    verify_pass_s,
    verify_work,
)
from adaspec.step_log import STEP_LOG_VERSION, StepRecord


class StepLogError(ValueError):
    """A step log cannot be read; the message names file:line and the field."""


ENGINE_TO_BENCH = {"adaspec": "adaptive"}
"""Policy `name`s the engine logs that the benchmarks call otherwise."""


def bench_kind(policy: str) -> str:
    """The benchmarks' policy kind for a logged policy name ("adaspec" → "adaptive")."""
    return ENGINE_TO_BENCH.get(policy, policy)


@dataclass(frozen=True)
class LoggedStep:
    path: str
    line: int
    record: StepRecord
    kind: str
    """The benchmarks' policy kind of the logged policy (bench_kind)."""


def check_generations(steps: Sequence[LoggedStep], generations: dict[int, str]) -> int:
    """Check the logged policies against a run's Policy generation → kind map
    (compare_policies' `step_logs`); returns how many records the map covers. A record whose
    generation the map gives to another kind means logs and run do not belong together:
    StepLogError naming file:line."""
    covered = 0
    for s in steps:
        g = s.record.generation
        kind = generations.get(g) if g is not None else None
        if kind is None:
            continue
        if kind != s.kind:
            raise StepLogError(
                f"{s.path}:{s.line}: policy: {s.record.policy!r} ({s.kind}) ran under Policy "
                f"generation {g}, which the run's generation map gives to {kind!r}"
            )
        covered += 1
    return covered


@dataclass(frozen=True)
class StepLogs:
    steps: list[LoggedStep]
    notes: list[str]
    """What the loader skipped and why (a torn last line of a killed server)."""


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = str(e["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def read_step_log(path: Path | str) -> StepLogs:
    """The records of one log, in order. A last line cut short (no newline, not JSON: the
    server was killed mid-write) is skipped with a note; anything else invalid is an error."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StepLogError(f"{p}: no such step log") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StepLogError(f"{p}: cannot read: {e}") from None
    lines = text.split("\n")
    steps: list[LoggedStep] = []
    notes: list[str] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # no newline after it: a write cut short
                notes.append(f"{where}: skipped a torn last line (the server stopped mid-write)")
                continue
            raise StepLogError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise StepLogError(f"{where}: a record must be a JSON object")
        if obj.get("v") != STEP_LOG_VERSION:
            raise StepLogError(
                f"{where}: v: format version {obj.get('v')!r}; this reader knows {STEP_LOG_VERSION}"
            )
        try:
            rec = StepRecord.model_validate(obj)
        except ValidationError as e:
            raise StepLogError(f"{where}: {_describe(e)}") from None
        steps.append(LoggedStep(str(p), n, rec, bench_kind(rec.policy)))
    if not steps:
        raise StepLogError(f"{p}: no step records")
    return StepLogs(steps, notes)


def load_step_logs(paths: Iterable[Path | str]) -> StepLogs:
    """All records of several logs (each file's in order, files in the order given)."""
    steps: list[LoggedStep] = []
    notes: list[str] = []
    for p in paths:
        got = read_step_log(p)
        steps += got.steps
        notes += got.notes
    if not steps:
        raise StepLogError("no step logs given")
    return StepLogs(steps, notes)


# ----------------------------------------------------------------------------- pricing

COMPONENTS = (
    "draft_pass",
    "verify",
    "chunk_step",
    "prefill_pass",
    "policy",
    "in_step",
    "gap",
    "total",
)

GROUPS: dict[str, tuple[str, ...]] = {
    "draft_pass": ("per_draft_pass_ms", "per_draft_row_ms"),
    "verify": ("per_verify_ms", "per_verify_row_ms", "per_verify_token_ms"),
    "in_step": ("per_step_ms", "per_step_row_ms"),
    "gap": ("per_gap_ms", "per_gap_row_ms", "per_gap_emitted_token_ms"),
}
"""Fitted component → EngineOverhead fields, for features (1, *item features) in order."""

_Term = tuple[str, tuple[float, ...]]


@dataclass(frozen=True)
class _Item:
    kind: str
    component: str
    measured_s: float
    predicted_s: float
    terms: tuple[_Term, ...]
    """(group, features) of each overhead the simulator adds to this item."""


def _overhead_s(oh: EngineOverhead, terms: Sequence[_Term]) -> float:
    t = 0.0
    for group, f in terms:
        if group == "draft_pass":
            t += oh.draft_pass_s(*f)
        elif group == "verify":
            t += oh.verify_s(*f)
        elif group == "in_step":
            t += oh.in_step_s(*f)
        else:
            t += oh.gap_s(*f)
    return t


def _chunked_files(steps: Sequence[LoggedStep]) -> set[str]:
    return {s.path for s in steps if s.record.prefill_rows > 0}


def _items(steps: Sequence[LoggedStep], model: TimeModel, prefill_draft: bool) -> list[_Item]:
    """Every component item of every detailed record, with the simulator's prediction.

    Busy gaps need the record before (same file, previous step number, in `steps`)."""
    chunked = _chunked_files(steps)
    prev: dict[str, LoggedStep] = {}
    out: list[_Item] = []
    for st in steps:
        r, k = st.record, st.kind
        before = prev.get(st.path)
        prev[st.path] = st
        if not r.detailed:
            continue
        b = r.batch
        passes = [
            (float(rows), draft_pass_s(model, rows, float(ctx)), t)
            for rows, ctx, t in zip(r.draft_rows, r.draft_ctx, r.draft_pass_s, strict=True)
        ]
        chunks = r.prefill_tokens > 0
        terms: list[_Term] = []
        pred = 0.0
        if b == 0:
            if chunks:
                p = prompt_s(
                    model, r.prefill_rows, r.prefill_tokens, r.prefill_ctx_work, True, prefill_draft
                )
                m = r.verify_s + sum(t for _, _, t in passes)
                out.append(_Item(k, "prefill_pass", m, p, ()))
                pred += p
        else:
            v_tokens, v_work = verify_work(
                np.asarray(r.verified, dtype=np.int64), np.asarray(r.context_lens, dtype=np.int64)
            )
            v_pred = verify_pass_s(model, b, v_tokens, v_work)
            v_term: _Term = ("verify", (float(b), v_tokens))
            for j, (rows, p, t) in enumerate(passes):
                d_term: _Term = ("draft_pass", (rows,))
                if j == 0 and chunks:
                    continue  # with the verification, in chunk_step
                out.append(_Item(k, "draft_pass", t, p, (d_term,)))
                terms.append(d_term)
                pred += p
            if chunks:
                extra = chunk_extra_s(
                    model, r.prefill_rows, r.prefill_tokens, r.prefill_ctx_work, prefill_draft
                )
                if passes:
                    rows0, p0, t0 = passes[0]
                    c_terms: tuple[_Term, ...] = (("draft_pass", (rows0,)), v_term)
                else:
                    p0 = draft_fixed_s(model) if prefill_draft else 0.0
                    t0 = 0.0
                    c_terms = (v_term,)
                p = p0 + v_pred + extra
                out.append(_Item(k, "chunk_step", t0 + r.verify_s, p, c_terms))
                terms += c_terms
                pred += p
            else:
                out.append(_Item(k, "verify", r.verify_s, v_pred, (v_term,)))
                terms.append(v_term)
                pred += v_pred
        out.append(_Item(k, "policy", r.policy_s, 0.0, ()))
        s_term: _Term = ("in_step", (float(b),))
        in_step = r.wall_s - sum(r.draft_pass_s) - r.verify_s - r.policy_s
        out.append(_Item(k, "in_step", in_step, 0.0, (s_term,)))
        terms.append(s_term)
        measured = r.wall_s
        busy = (
            b > 0
            and r.gap_s is not None
            and st.path in chunked
            and before is not None
            and before.record.step == r.step - 1
        )
        if busy and before is not None and r.gap_s is not None:
            g_term: _Term = ("gap", (float(before.record.batch), float(before.record.emitted)))
            out.append(_Item(k, "gap", r.gap_s, 0.0, (g_term,)))
            terms.append(g_term)
            measured += r.gap_s
        out.append(_Item(k, "total", measured, pred, tuple(terms)))
    return out


# ----------------------------------------------------------------------------- comparison


class ComponentSummary(BaseModel):
    """Measured vs predicted time of one component (seconds; ratio = measured / predicted)."""

    model_config = ConfigDict(frozen=True)
    n: int
    measured_s: float
    predicted_s: float
    ratio: float | None
    """None when the model predicts nothing for this component."""
    mape: float | None
    """Mean of |measured − predicted| / measured over items (None when nothing is predicted)."""
    mean_residual_ms: float | None
    with_overhead_s: float | None = None
    """Predicted + the overhead the simulator would add (when an overhead is given)."""
    ratio_with_overhead: float | None = None


class Comparison(BaseModel):
    model_config = ConfigDict(frozen=True)
    policies: dict[str, dict[str, ComponentSummary]]
    overall: dict[str, ComponentSummary]
    records: int
    undetailed_records: int
    """Records without per-pass detail (scripted backend), left out."""
    gap_files_left_out: list[str]
    """Logs without chunked prefill: their gaps hold whole-prompt prefills (left out)."""


def _summary(items: Sequence[_Item], oh: EngineOverhead | None) -> ComponentSummary:
    m = np.array([i.measured_s for i in items], dtype=np.float64)
    p = np.array([i.predicted_s for i in items], dtype=np.float64)
    n = len(items)
    ms, ps = float(m.sum()), float(p.sum())
    ok = m > 0
    predicts = ps > 0
    mape = float(np.mean(np.abs(m[ok] - p[ok]) / m[ok])) if predicts and ok.any() else None
    with_oh = ratio_oh = None
    if oh is not None:
        with_oh = ps + sum(_overhead_s(oh, i.terms) for i in items)
        ratio_oh = ms / with_oh if with_oh > 0 else None
    return ComponentSummary(
        n=n,
        measured_s=ms,
        predicted_s=ps,
        ratio=ms / ps if predicts else None,
        mape=mape,
        mean_residual_ms=float((m - p).mean() * 1000.0) if n else None,
        with_overhead_s=with_oh,
        ratio_with_overhead=ratio_oh,
    )


def _by_component(items: Sequence[_Item], oh: EngineOverhead | None) -> dict[str, ComponentSummary]:
    return {c: _summary([i for i in items if i.component == c], oh) for c in COMPONENTS}


def compare(
    steps: Sequence[LoggedStep],
    model: TimeModel,
    *,
    prefill_draft: bool = True,
    overhead: EngineOverhead | None = None,
) -> Comparison:
    """Each component's measured vs predicted time, per policy kind and overall.

    `prefill_draft`: the engine had a draft model (prompt chunks also go into its cache), as
    `SimConfig.prefill_draft`. With `overhead`, also what the simulator would predict with it.
    """
    items = _items(steps, model, prefill_draft)
    kinds = list(dict.fromkeys(s.kind for s in steps))
    chunked = _chunked_files(steps)
    return Comparison(
        policies={k: _by_component([i for i in items if i.kind == k], overhead) for k in kinds},
        overall=_by_component(items, overhead),
        records=len(steps),
        undetailed_records=sum(not s.record.detailed for s in steps),
        gap_files_left_out=sorted({s.path for s in steps} - chunked),
    )


# ----------------------------------------------------------------------------- fitting


def nnls(A: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.float64]:
    """min ‖Ax − y‖ subject to x ≥ 0, exactly, for a few columns: an optimum is the
    unconstrained least-squares fit on its own support, so the best fit with all coefficients
    ≥ 0 over every subset of columns is one (2^p small solves)."""
    p = A.shape[1]
    if p > 8:
        raise ValueError(f"nnls: {p} columns; the subset search is for a few features only")
    best = np.zeros(p)
    best_rss = float(y @ y)
    for mask in range(1, 1 << p):
        cols = [c for c in range(p) if mask >> c & 1]
        sol, *_ = np.linalg.lstsq(A[:, cols], y, rcond=None)
        if (sol < 0).any():
            continue
        x = np.zeros(p)
        x[cols] = sol
        r = A @ x - y
        rss = float(r @ r)
        if rss < best_rss * (1 - 1e-12):
            best, best_rss = x, rss
    return best


class GroupFit(BaseModel):
    """One component's overhead fit: residual (measured − predicted, ms) vs its features."""

    model_config = ConfigDict(frozen=True)
    n: int
    coef_ms: dict[str, float]
    stderr_ms: dict[str, float | None]
    """Standard error of each coefficient kept above 0 (ordinary least squares on the kept
    features; None for those fixed at 0)."""
    rmse_before_ms: float | None
    rmse_after_ms: float | None
    note: str | None = None


def _fit_group(fields: tuple[str, ...], items: Sequence[_Item]) -> GroupFit:
    n, p = len(items), len(fields)
    zeros = dict.fromkeys(fields, 0.0)
    if n < p + 2:
        return GroupFit(
            n=n,
            coef_ms=zeros,
            stderr_ms=dict.fromkeys(fields),
            rmse_before_ms=None,
            rmse_after_ms=None,
            note=f"{n} items for {p} coefficients: left at 0",
        )
    A = np.array([(1.0, *i.terms[0][1]) for i in items], dtype=np.float64)
    y = np.array([(i.measured_s - i.predicted_s) * 1000.0 for i in items], dtype=np.float64)
    x = nnls(A, y)
    r = A @ x - y
    kept = x > 0
    stderr: dict[str, float | None] = dict.fromkeys(fields)
    dof = n - int(kept.sum())
    if kept.any() and dof > 0:
        As = A[:, kept]
        cov = float(r @ r) / dof * np.linalg.pinv(As.T @ As)
        kept_fields = [f for f, k in zip(fields, kept, strict=True) if k]
        for f, var in zip(kept_fields, np.diag(cov), strict=True):
            stderr[f] = float(np.sqrt(max(float(var), 0.0)))
    return GroupFit(
        n=n,
        coef_ms={f: float(c) for f, c in zip(fields, x, strict=True)},
        stderr_ms=stderr,
        rmse_before_ms=float(np.sqrt(np.mean(y * y))),
        rmse_after_ms=float(np.sqrt(np.mean(r * r))),
    )


class FitSource(BaseModel):
    """Exactly which records a fit used."""

    model_config = ConfigDict(frozen=True)
    excluded_policies: list[str]
    records_by_policy: dict[str, int]
    lines: dict[str, list[tuple[int, int]]]
    """Per log file, the (first, last) line ranges of the records used."""


class OverheadFit(BaseModel):
    model_config = ConfigDict(frozen=True)
    overhead: EngineOverhead
    groups: dict[str, GroupFit]
    source: FitSource


def _line_ranges(lines: Sequence[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for n in sorted(lines):
        if out and n == out[-1][1] + 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out


def fit_overhead(
    steps: Sequence[LoggedStep],
    model: TimeModel,
    *,
    exclude: Iterable[str] = (),
    prefill_draft: bool = True,
) -> OverheadFit:
    """Fit an EngineOverhead to the records of every policy not in `exclude` (bench kinds or
    engine names). ValueError when no record is left."""
    left_out = sorted({bench_kind(k) for k in exclude})
    used = [s for s in steps if s.kind not in left_out]
    if not used:
        raise ValueError(
            f"no step records left to fit the engine overhead from (excluded policies: "
            f"{', '.join(left_out) or 'none'}; logged: "
            f"{', '.join(sorted({s.kind for s in steps})) or 'none'})"
        )
    items = _items(used, model, prefill_draft)
    groups = {
        g: _fit_group(fields, [i for i in items if i.component == g])
        for g, fields in GROUPS.items()
    }
    coefs = {f: c for g in groups.values() for f, c in g.coef_ms.items()}
    by_file: dict[str, list[int]] = {}
    by_policy: dict[str, int] = {}
    for s in used:
        by_file.setdefault(s.path, []).append(s.line)
        by_policy[s.kind] = by_policy.get(s.kind, 0) + 1
    return OverheadFit(
        overhead=EngineOverhead(**coefs),
        groups=groups,
        source=FitSource(
            excluded_policies=left_out,
            records_by_policy=by_policy,
            lines={f: _line_ranges(ls) for f, ls in by_file.items()},
        ),
    )


def fit_leave_one_policy_out(
    steps: Sequence[LoggedStep],
    model: TimeModel,
    kinds: Sequence[str],
    *,
    prefill_draft: bool = True,
) -> dict[str, OverheadFit]:
    """For each kind, the overhead fitted from the other policies' records only: simulating a
    policy with it is a prediction, not a fit to that policy's own steps."""
    return {k: fit_overhead(steps, model, exclude=[k], prefill_draft=prefill_draft) for k in kinds}
