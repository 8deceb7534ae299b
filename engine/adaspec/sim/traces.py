"""Request traces (arrival time, prompt length, output length): parsing and deterministic scaling.

Formats (see /work/shared/traces/README.md; keep the attributions when you publish results):
- Azure LLM inference trace 2023 CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`; CC-BY-4.0,
  Patel et al., "Splitwise", ISCA 2024).
- Mooncake conversation trace JSONL (`timestamp` ms, `input_length`, `output_length`; Apache-2.0,
  Qin et al., "Mooncake", FAST 2025).
- AdaSpec arrival windows CSV (single `Timestamp` column, seconds; arXiv 2503.05096). They carry
  no lengths: `with_lengths_from` pairs each arrival with a length pair drawn (seeded, with
  replacement) from a source trace, keeping only pairs within the paper's caps (prompt ≤ 1024,
  prompt + output ≤ 2048 tokens).

Everything here is pure and seeded: the same inputs and seed give the same trace, so a
benchmark run can be repeated and the simulator sees exactly what the real engine saw.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

TRACE_DIR_DEFAULT = Path("/work/shared/traces")


class TraceError(ValueError):
    """A trace file is unreadable; the message names the file, line and field."""


@dataclass(frozen=True)
class Trace:
    """Requests sorted by arrival; arrays of equal length (numpy for speed at 20k rows)."""

    name: str
    arrival_s: NDArray[np.float64]
    prompt_len: NDArray[np.int64]
    output_len: NDArray[np.int64]

    def __post_init__(self) -> None:
        n = self.arrival_s.shape[0]
        if self.prompt_len.shape != (n,) or self.output_len.shape != (n,):
            raise TraceError(f"{self.name}: arrival, prompt and output arrays differ in length")
        if n and np.any(np.diff(self.arrival_s) < 0):
            raise TraceError(f"{self.name}: arrivals are not sorted")
        if n and (self.prompt_len.min() < 1 or self.output_len.min() < 1):
            raise TraceError(f"{self.name}: prompt and output lengths must be >= 1")

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    @property
    def span_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) > 1 else 0.0

    @property
    def mean_rate(self) -> float:
        return (len(self) - 1) / self.span_s if self.span_s > 0 else 0.0

    def rows(self) -> list[tuple[float, int, int]]:
        return [
            (float(a), int(p), int(o))
            for a, p, o in zip(self.arrival_s, self.prompt_len, self.output_len, strict=True)
        ]

    @classmethod
    def from_rows(cls, name: str, rows: list[tuple[float, int, int]]) -> Trace:
        rows = sorted(rows, key=lambda r: r[0])
        return cls(
            name,
            np.array([r[0] for r in rows], dtype=np.float64),
            np.array([r[1] for r in rows], dtype=np.int64),
            np.array([r[2] for r in rows], dtype=np.int64),
        )


# ----------------------------------------------------------------------------- parsing


def _parse_azure_ts(text: str) -> datetime:
    # 'YYYY-MM-DD HH:MM:SS.fffffff' (7 fractional digits): keep microseconds
    head, _, frac = text.strip().partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}" if frac else head)


def _int_field(value: str | int | float | None, where: str, field: str) -> int:
    try:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        out = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TraceError(f"{where}: field {field!r} is not an integer: {value!r}") from None
    if out < 0:
        raise TraceError(f"{where}: field {field!r} is negative: {out}")
    return out


def load_azure_csv(path: Path) -> Trace:
    """Azure 2023 CSV; arrival times relative to the first row, in seconds."""
    rows: list[tuple[float, int, int]] = []
    t0: datetime | None = None
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise TraceError(f"{path}: header must contain {sorted(need)}")
        for n, rec in enumerate(reader, start=2):
            where = f"{path}:{n}"
            try:
                ts = _parse_azure_ts(rec["TIMESTAMP"])
            except (ValueError, AttributeError):
                raise TraceError(f"{where}: field 'TIMESTAMP' is not a timestamp") from None
            t0 = t0 or ts
            prompt = _int_field(rec["ContextTokens"], where, "ContextTokens")
            out = _int_field(rec["GeneratedTokens"], where, "GeneratedTokens")
            rows.append(((ts - t0).total_seconds(), max(prompt, 1), max(out, 1)))
    return Trace.from_rows(path.stem, rows)


def load_mooncake_jsonl(path: Path) -> Trace:
    rows: list[tuple[float, int, int]] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{where}: not valid JSON: {e}") from None
            if not isinstance(rec, dict):
                raise TraceError(f"{where}: expected a JSON object")
            for field in ("timestamp", "input_length", "output_length"):
                if field not in rec:
                    raise TraceError(f"{where}: missing field {field!r}")
            ts = _int_field(rec["timestamp"], where, "timestamp")
            prompt = _int_field(rec["input_length"], where, "input_length")
            out = _int_field(rec["output_length"], where, "output_length")
            rows.append((ts / 1000.0, max(prompt, 1), max(out, 1)))
    return Trace.from_rows(path.stem, rows)


def load_arrivals_csv(path: Path) -> NDArray[np.float64]:
    """AdaSpec arrival window: one `Timestamp` column (seconds since the window start)."""
    out: list[float] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "Timestamp" not in reader.fieldnames:
            raise TraceError(f"{path}: header must contain 'Timestamp'")
        for n, rec in enumerate(reader, start=2):
            try:
                out.append(float(rec["Timestamp"]))
            except (TypeError, ValueError):
                raise TraceError(f"{path}:{n}: field 'Timestamp' is not a number") from None
    return np.sort(np.asarray(out, dtype=np.float64))


class LengthCaps(BaseModel):
    """Which (prompt, output) pairs a length source may contribute (the paper's filter)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_prompt: int = Field(default=1024, ge=1)
    max_total: int = Field(default=2048, ge=2)


def with_lengths_from(
    name: str,
    arrivals: NDArray[np.float64],
    source: Trace,
    seed: int,
    caps: LengthCaps | None = None,
) -> Trace:
    """Pair arrivals with (prompt, output) pairs sampled with replacement from `source`."""
    caps = caps or LengthCaps()
    ok = (source.prompt_len <= caps.max_prompt) & (
        source.prompt_len + source.output_len <= caps.max_total
    )
    if not ok.any():
        raise TraceError(f"{source.name}: no request fits the length caps {caps}")
    pool = np.nonzero(ok)[0]
    rng = np.random.default_rng([seed, 0x1E46])
    pick = pool[rng.integers(0, pool.shape[0], size=arrivals.shape[0])]
    return Trace(
        name,
        arrivals.astype(np.float64).copy(),
        source.prompt_len[pick].copy(),
        source.output_len[pick].copy(),
    )


# Named traces in the shared folder: name -> (loader kind, file, length source for windows)
KNOWN_TRACES: dict[str, tuple[str, str, str | None]] = {
    "azure-code": ("azure", "AzureLLMInferenceTrace_code.csv", None),
    "azure-conv": ("azure", "AzureLLMInferenceTrace_conv.csv", None),
    "mooncake": ("mooncake", "mooncake_conversation_trace.jsonl", None),
    "adaspec-code": ("window", "adaspec-arrivals/code.csv", "azure-code"),
    "adaspec-conv": ("window", "adaspec-arrivals/conv.csv", "azure-conv"),
    "adaspec-mooncake": ("window", "adaspec-arrivals/mooncake.csv", "mooncake"),
}


def load_trace(name: str, trace_dir: Path = TRACE_DIR_DEFAULT, seed: int = 0) -> Trace:
    """Load a named trace (KNOWN_TRACES) or a file path (format from its extension/header)."""
    if name in KNOWN_TRACES:
        kind, file, source = KNOWN_TRACES[name]
        path = trace_dir / file
        if not path.exists():
            raise TraceError(f"trace {name!r}: {path} does not exist (set --trace-dir)")
        if kind == "azure":
            return _renamed(load_azure_csv(path), name)
        if kind == "mooncake":
            return _renamed(load_mooncake_jsonl(path), name)
        assert source is not None
        return with_lengths_from(name, load_arrivals_csv(path), load_trace(source, trace_dir), seed)
    path = Path(name)
    if not path.exists():
        known = ", ".join(KNOWN_TRACES)
        raise TraceError(f"unknown trace {name!r}: not a file and not one of {known}")
    if path.suffix == ".jsonl":
        return load_mooncake_jsonl(path)
    header = path.open(encoding="utf-8").readline()
    if "TIMESTAMP" in header:
        return load_azure_csv(path)
    raise TraceError(f"{path}: unknown format (expected an Azure CSV or a Mooncake JSONL)")


def _renamed(t: Trace, name: str) -> Trace:
    return Trace(name, t.arrival_s, t.prompt_len, t.output_len)


# ----------------------------------------------------------------------------- scaling


class ScaleSpec(BaseModel):
    """How a production trace is shrunk to what a small machine can serve (all deterministic).

    Order: cut [start_s, start_s + window_s) → thin (keep each request with probability
    `keep_fraction`, seeded: keeps the burst shape, lowers the rate) → stretch time by
    `time_scale` (> 1 slows arrivals) → scale lengths (× factor, rounded, clipped to
    [min, max]) → keep the first `max_requests`. Arrivals are re-based to start at 0.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    start_s: float = Field(default=0.0, ge=0.0)
    window_s: float | None = Field(default=None, gt=0.0)
    keep_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    time_scale: float = Field(default=1.0, gt=0.0)
    prompt_scale: float = Field(default=1.0, gt=0.0)
    output_scale: float = Field(default=1.0, gt=0.0)
    min_prompt: int = Field(default=1, ge=1)
    max_prompt: int | None = Field(default=None, ge=1)
    min_output: int = Field(default=1, ge=1)
    max_output: int | None = Field(default=None, ge=1)
    max_requests: int | None = Field(default=None, ge=1)
    seed: int = 0


def _scale_len(x: NDArray[np.int64], f: float, lo: int, hi: int | None) -> NDArray[np.int64]:
    out = np.rint(x.astype(np.float64) * f).astype(np.int64)
    return np.clip(out, lo, hi if hi is not None else np.iinfo(np.int64).max)


def scale_trace(trace: Trace, spec: ScaleSpec) -> Trace:
    a = trace.arrival_s - (trace.arrival_s[0] if len(trace) else 0.0)
    keep = a >= spec.start_s
    if spec.window_s is not None:
        keep &= a < spec.start_s + spec.window_s
    if spec.keep_fraction < 1.0:
        rng = np.random.default_rng([spec.seed, 0x7A1])
        keep &= rng.random(a.shape[0]) < spec.keep_fraction
    idx = np.nonzero(keep)[0]
    if spec.max_requests is not None:
        idx = idx[: spec.max_requests]
    if idx.shape[0] == 0:
        raise TraceError(f"{trace.name}: the scaling {spec.model_dump()} leaves no request")
    arr = (a[idx] - a[idx[0]]) * spec.time_scale
    return Trace(
        f"{trace.name}-scaled",
        arr,
        _scale_len(trace.prompt_len[idx], spec.prompt_scale, spec.min_prompt, spec.max_prompt),
        _scale_len(trace.output_len[idx], spec.output_scale, spec.min_output, spec.max_output),
    )


def poisson_trace(
    name: str, rate: float, n: int, prompt_len: int, output_len: int, seed: int
) -> Trace:
    """Synthetic Poisson arrivals with fixed lengths (tests, load sweeps)."""
    if rate <= 0 or n < 1:
        raise TraceError("poisson_trace: rate must be > 0 and n >= 1")
    rng = np.random.default_rng([seed, 0x9015])
    arr = np.cumsum(rng.exponential(1.0 / rate, size=n))
    arr -= arr[0]
    return Trace(
        name,
        arr,
        np.full(n, prompt_len, dtype=np.int64),
        np.full(n, output_len, dtype=np.int64),
    )


def rate_scaled(trace: Trace, factor: float) -> Trace:
    """The same requests arriving `factor`× faster (load sweeps keep the burst shape)."""
    if factor <= 0:
        raise TraceError("rate factor must be > 0")
    a = trace.arrival_s - (trace.arrival_s[0] if len(trace) else 0.0)
    return Trace(f"{trace.name}-x{factor:g}", a / factor, trace.prompt_len, trace.output_len)
