"""Acceptance model for the simulator: draft confidences and whether the target accepts them.

Why position-keyed: with greedy decoding the output text does not depend on the policy, so the
draft's confidence and the target's verdict for *output position p of request r* are properties
of the text, not of the policy. The simulator therefore draws, per request, one sequence of
on-path (confidence, accepted) pairs indexed by output position, and every policy replays the
same text (common random numbers: policy comparisons are not blurred by sampling noise).

Model (documented assumptions; fit every parameter from a measurement when one exists, see
bench/measure_acceptance.py and adaspec.sim.fit):
  score_rp = a_r + b_rp + e_rp                  a_r ~ N(0, request_sigma²)    per-request difficulty
                                                b_rp: smoothed noise, sd local_sigma, correlation
                                                      length `local_len` tokens (hard passages)
                                                e_rp ~ N(0, 1 − request_sigma² − local_sigma²)
  conf_rp = F⁻¹(Φ(score_rp))                    F: the measured confidence histogram (marginal is
                                                   exactly the histogram; uniform inside a bin)
  accepted_rp ~ Bernoulli(accept_prob[bin(conf_rp)])   P(accept | confidence), measured
Draft tokens after the first rejected one in a step sit on a wrong prefix (they can never be
accepted): their confidence at position p is drawn the same way from the same latent a_r + b_rp
with fresh independent noise and the score lowered by `offpath_shift`:
  offconf_rp = F⁻¹(Φ(a_r + b_rp + e'_rp − offpath_shift))
so an off-path run inherits the passage's difficulty and its step-to-step persistence
(corr ≈ request_sigma² + local_sigma²·exp(−1/local_len)) but not the on-path token's own noise.
The default shift (0) is the CPU pair's measured value (−0.03 ± 0.09: the draft is about as
sure of its own continuation as of the true text; an earlier guess of 1.0 was far off), see
fit_offpath_shift.
Correlation within a request comes only through the confidence, so P(accept | conf) holds exactly.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from adaspec.contract import AcceptanceCalibration

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

OFFPATH_SHIFT_DEFAULT = 0.0
"""Used when no measurement gives one: measured on the CPU pair as −0.03 ± 0.09 (531 off-path
drafts, bench/measure_acceptance.py); the guess of 1.0 it replaces was about 11σ off."""
OFFPATH_SHIFT_RANGE = (-4.0, 4.0)
"""Allowed offpath_shift (normal-score units): beyond ±4 every off-path draft sits in one tail."""


class PositionDraws(Protocol):
    """Per-request draft confidences and verdicts by output position (seeded, deterministic)."""

    def draw(self, request_index: int, n: int) -> tuple[FloatArray, BoolArray, FloatArray]:
        """(on-path confidence, on-path accepted, off-path confidence), each of length n, for
        the request at `request_index` of the whole trace (not of a window of it)."""
        ...


@runtime_checkable
class RejectionKeyedDraws(Protocol):
    """Optional: off-path confidences keyed by where the step's first rejection was.

    An off-path draft continues the draft's own wrong token, so its confidence depends on the
    rejection position q and the depth after it, not on its position alone; a source that
    knows them (measured texts) offers them here and the simulator prefers them."""

    def offpath_after(self, request_index: int, n: int, depth: int) -> FloatArray:
        """(n, depth): row q, column d−1 = confidence of the draft d positions after a rejected
        draft at position q; NaN where unknown (the simulator then uses draw()'s value)."""
        ...


class AcceptanceSource(Protocol):
    """What the simulator takes its drafts from: the statistical AcceptanceModel, or the
    measured texts of a real run (adaspec.sim.measured_text.MeasuredAcceptance)."""

    def sampler(self, seed: int) -> PositionDraws: ...


def _erf(x: FloatArray) -> FloatArray:
    """Vectorised erf (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7; numpy has none)."""
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    out: FloatArray = s * (1.0 - poly * np.exp(-a * a))
    return out


def normal_cdf(x: FloatArray) -> FloatArray:
    out: FloatArray = 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))
    return out


class AcceptanceModel(BaseModel):
    """Confidence histogram + P(accept | confidence) + within-request correlation."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bin_edges: list[float] = Field(min_length=2, description="confidence bins within [0, 1]")
    conf_mass: list[float] = Field(min_length=1, description="share of draft tokens per bin")
    accept_prob: list[float] = Field(min_length=1, description="P(accept | confidence bin)")
    request_sigma: float = Field(default=0.5, ge=0.0, lt=1.0)
    local_sigma: float = Field(default=0.5, ge=0.0, lt=1.0)
    local_len: float = Field(default=16.0, gt=0.0, description="tokens; correlation length")
    offpath_shift: float = Field(
        default=OFFPATH_SHIFT_DEFAULT,
        ge=OFFPATH_SHIFT_RANGE[0],
        le=OFFPATH_SHIFT_RANGE[1],
        description="normal-score drop of off-path drafts (negative: more confident)",
    )
    source: str = "unspecified"

    @model_validator(mode="after")
    def _check(self) -> AcceptanceModel:
        n = len(self.bin_edges) - 1
        if len(self.conf_mass) != n or len(self.accept_prob) != n:
            raise ValueError("confMass and acceptProb need one entry per bin (len(binEdges) - 1)")
        if any(b <= a for a, b in zip(self.bin_edges, self.bin_edges[1:], strict=False)):
            raise ValueError("binEdges must be strictly increasing")
        if self.bin_edges[0] < 0.0 or self.bin_edges[-1] > 1.0:
            raise ValueError("binEdges must lie within [0, 1]")
        if any(m < 0 for m in self.conf_mass) or sum(self.conf_mass) <= 0:
            raise ValueError("confMass must be non-negative with a positive sum")
        if any(not 0.0 <= p <= 1.0 for p in self.accept_prob):
            raise ValueError("acceptProb values must lie within [0, 1]")
        if self.request_sigma**2 + self.local_sigma**2 >= 1.0:
            raise ValueError("requestSigma² + localSigma² must stay below 1")
        return self

    @classmethod
    def from_calibration(
        cls, cal: AcceptanceCalibration, conf_mass: list[float] | None = None, **kw: float
    ) -> AcceptanceModel:
        """Use the Profile's calibration; its `counts` are the confidence histogram."""
        if conf_mass is None:
            conf_mass = (
                [float(c) for c in cal.counts]
                if cal.counts and sum(cal.counts) > 0
                else [1.0] * len(cal.accept_prob)
            )
        return cls(
            bin_edges=list(cal.bin_edges),
            conf_mass=conf_mass,
            accept_prob=list(cal.accept_prob),
            source="profile calibration",
            **kw,
        )

    def sampler(self, seed: int) -> AcceptanceSampler:
        return AcceptanceSampler(self, seed)

    @property
    def mean_acceptance(self) -> float:
        m = np.asarray(self.conf_mass, dtype=np.float64)
        return float(np.dot(m / m.sum(), np.asarray(self.accept_prob)))


class AcceptanceSampler:
    """Draws per-request on-path/off-path confidence and acceptance sequences (seeded)."""

    def __init__(self, model: AcceptanceModel, seed: int) -> None:
        self.model = model
        self.seed = seed
        mass = np.asarray(model.conf_mass, dtype=np.float64)
        self._cdf = np.concatenate(([0.0], np.cumsum(mass / mass.sum())))
        self._edges = np.asarray(model.bin_edges, dtype=np.float64)
        self._accept = np.asarray(model.accept_prob, dtype=np.float64)
        n = max(1, math.ceil(4 * model.local_len))
        kern = np.exp(-np.arange(n) / model.local_len)
        self._kernel = kern / np.sqrt(np.sum(kern**2))  # unit-variance smoothing
        self._noise_sd = math.sqrt(1.0 - model.request_sigma**2 - model.local_sigma**2)

    def _conf(self, score: FloatArray) -> tuple[FloatArray, NDArray[np.int64]]:
        u = np.clip(normal_cdf(score), 0.0, 1.0 - 1e-12)
        b = np.clip(np.searchsorted(self._cdf, u, side="right") - 1, 0, self._accept.shape[0] - 1)
        lo, hi = self._cdf[b], self._cdf[b + 1]
        frac = np.where(hi > lo, (u - lo) / np.maximum(hi - lo, 1e-300), 0.5)
        conf: FloatArray = self._edges[b] + frac * (self._edges[b + 1] - self._edges[b])
        return conf, b.astype(np.int64)

    def draw(self, request_index: int, n: int) -> tuple[FloatArray, BoolArray, FloatArray]:
        """(on-path confidence, on-path accepted, off-path confidence), each of length n."""
        m = self.model
        rng = np.random.default_rng([self.seed, 0xACC, request_index])
        a = rng.normal(0.0, m.request_sigma) if m.request_sigma > 0 else 0.0
        k = self._kernel.shape[0]
        white = rng.normal(size=n + k - 1)
        local = np.convolve(white, self._kernel, mode="valid")[:n] * m.local_sigma
        latent = a + local
        on, b = self._conf(latent + rng.normal(0.0, self._noise_sd, size=n))
        acc: BoolArray = rng.random(n) < self._accept[b]
        off, _ = self._conf(latent + rng.normal(0.0, self._noise_sd, size=n) - m.offpath_shift)
        return on, acc, off


def cpu_pair_acceptance() -> AcceptanceModel:
    """Estimate for the CPU pair from MODELS.md (greedy acceptance ≈ 85 % on chat prompts;
    conf ≥ 0.7 → 98 % accepted, < 0.5 → ~47 %); used only when no profile gives a calibration."""
    return AcceptanceModel(
        bin_edges=[0.0, 0.3, 0.5, 0.7, 0.9, 1.0],
        conf_mass=[0.08, 0.10, 0.12, 0.16, 0.54],
        accept_prob=[0.35, 0.55, 0.80, 0.95, 0.99],
        source="estimate from MODELS.md (CPU Qwen2.5-Coder 1.5B/0.5B, chat prompts)",
    )


def load_acceptance_model(path: str) -> AcceptanceModel:
    """An AcceptanceModel JSON (e.g. from bench/measure_acceptance.py); errors name the field."""
    from pathlib import Path

    from pydantic import ValidationError

    try:
        return AcceptanceModel.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except ValidationError as e:
        raise ValueError(
            f"acceptance model {path}: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}"
        ) from None
