"""Draft confidence → acceptance probability, corrected online from verification outcomes.

AdaSpec uses raw draft confidence as the acceptance probability; raw confidence is
miscalibrated (it depends on the pair, the prompt mix and temperature), so we keep a binned
map with a Beta prior per bin (from the profile, or the identity when there is none) and add the
observed outcomes with exponential forgetting. The map is kept monotone (pool-adjacent-
violators) because a more confident draft token is never less likely to be accepted.
"""

from __future__ import annotations

import numpy as np

from adaspec.contract import AcceptanceCalibration
from adaspec.policy.base import FloatArray, IntArray


def _isotonic(values: FloatArray, weights: FloatArray) -> FloatArray:
    """Weighted pool-adjacent-violators: the closest non-decreasing sequence."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values.tolist(), weights.tolist(), strict=True):
        blocks.append([v, max(w, 1e-9), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    out = [m for m, _, c in blocks for _ in range(int(c))]
    return np.asarray(out, dtype=np.float64)


def _within_unit(table: FloatArray) -> bool:
    """Every acceptance in [0, 1] (so survival never grows along a request's drafts)."""
    return bool(((table >= 0.0) & (table <= 1.0)).all())


class AcceptanceCalibrator:
    """Binned calibration with a Beta prior per bin and online, forgetting updates."""

    def __init__(
        self,
        bin_edges: FloatArray,
        prior_prob: FloatArray,
        prior_weight: float = 40.0,
        forget: float = 0.999,
        initial_rate: float | None = None,
    ) -> None:
        edges = np.asarray(bin_edges, dtype=np.float64)
        prior = np.asarray(prior_prob, dtype=np.float64)
        if edges.ndim != 1 or prior.shape != (edges.shape[0] - 1,):
            raise ValueError("bin_edges must have one more entry than prior_prob")
        if not 0.0 < forget <= 1.0:
            raise ValueError("forget must be in (0, 1]")
        self._inner_edges = edges[1:-1].copy()
        self._prior = np.clip(prior, 1e-3, 1.0 - 1e-3)
        self._prior_weight = float(prior_weight)
        self._forget = float(forget)
        self._successes = np.zeros_like(self._prior)
        self._trials = np.zeros_like(self._prior)
        self._table = self._prior.copy()
        # every acceptance within [0, 1]: survival never grows along a request's drafts, which
        # AdaSpecPolicy's verifier shortcut relies on (a prior weight of 0 can make it NaN)
        self.bounded = _within_unit(self._table)
        rate = float(np.mean(self._prior)) if initial_rate is None else float(initial_rate)
        self._rate = rate  # running per-token acceptance, for not-yet-drafted tokens
        self._prior_rate = rate
        self._rate_weight = 0.02
        self._updates = 0
        self.refresh_every = 8

    # -- construction -------------------------------------------------------------------

    @classmethod
    def identity(cls, n_bins: int = 10) -> AcceptanceCalibrator:
        """Raw confidence as acceptance (AdaSpec's assumption) until outcomes arrive."""
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        centers = (edges[:-1] + edges[1:]) / 2.0
        return cls(edges, centers, initial_rate=0.6)

    @classmethod
    def from_profile(cls, cal: AcceptanceCalibration) -> AcceptanceCalibrator:
        edges = np.asarray(cal.bin_edges, dtype=np.float64)
        edges[0], edges[-1] = 0.0, 1.0
        prior = np.asarray(cal.accept_prob, dtype=np.float64)
        rate = None
        if cal.counts is not None and sum(cal.counts) > 0:
            rate = float(np.average(prior, weights=np.asarray(cal.counts, dtype=np.float64)))
        return cls(edges, prior, initial_rate=rate)

    # -- prediction ---------------------------------------------------------------------

    def predict(self, conf: FloatArray) -> FloatArray:
        """P(accept) for each draft confidence (any shape)."""
        out: FloatArray = self._table[self._inner_edges.searchsorted(conf, side="right")]
        return out

    @property
    def mean_rate(self) -> float:
        """Running per-token acceptance rate: the prior for a token not yet drafted."""
        return self._rate

    @property
    def table(self) -> FloatArray:
        return self._table.copy()

    # -- online correction --------------------------------------------------------------

    def update(self, conf: FloatArray, verified_lens: IntArray, accepted: IntArray) -> None:
        """Add verification outcomes.

        For request i, draft positions j < accepted[i] were accepted; position accepted[i] was
        rejected if accepted[i] < verified_lens[i]; later positions were never tested (they
        say nothing about acceptance and are left out).
        """
        if conf.size == 0:
            return
        k = conf.shape[1]
        n_bins = self._prior.shape[0]
        pos = np.arange(k)[None, :]
        # Outcome counts per bin are integers: exact whatever the order they are counted in.
        integers = verified_lens.dtype.kind in "iu" and accepted.dtype.kind in "iu"
        if integers and int(verified_lens.max()) <= 1:
            # at most one token verified per request (large batches): column 0 alone
            observed = (verified_lens > 0) & (accepted >= 0)
            n_observed = int(np.count_nonzero(observed))
            if n_observed == 0:
                return
            bins = self._inner_edges.searchsorted(conf[:, 0][observed], side="right")
            accepted_0 = accepted[observed] > 0
            succ = np.bincount(bins, weights=accepted_0, minlength=n_bins)
            tri = np.bincount(bins, minlength=n_bins).astype(np.float64)
            n_ok = int(np.count_nonzero(accepted_0))
        elif integers:
            # j < verified and j <= accepted  ⇔  j < min(verified, accepted + 1)
            reach = np.minimum(verified_lens, accepted + 1)
            observed = pos < reach[:, None]
            n_observed = int(np.count_nonzero(observed))
            if n_observed == 0:
                return
            bins = self._inner_edges.searchsorted(conf[observed], side="right")
            tri_n = np.bincount(bins, minlength=n_bins)
            # Every observed token was accepted but the one at position `accepted` where
            # verification rejected it: the last observed token of its row, so its index in
            # the row-major `bins` is the running count of observed tokens up to its row, - 1.
            rejected = np.flatnonzero((accepted < verified_lens) & (accepted >= 0) & (accepted < k))
            per_row = np.minimum(np.maximum(reach, 0), k)
            last = per_row.cumsum()[rejected] - 1
            succ = (tri_n - np.bincount(bins[last], minlength=n_bins)).astype(np.float64)
            tri = tri_n.astype(np.float64)
            n_ok = n_observed - rejected.shape[0]
        else:
            acc = accepted[:, None]
            observed = (pos < verified_lens[:, None]) & (pos <= acc)
            ok = (pos < acc) & observed
            n_observed = int(np.count_nonzero(observed))
            if n_observed == 0:
                return
            n_ok = int(np.count_nonzero(ok))
            bins = self._inner_edges.searchsorted(conf[observed], side="right")
            succ = np.bincount(bins, weights=ok[observed].astype(np.float64), minlength=n_bins)
            tri = np.bincount(bins, minlength=n_bins).astype(np.float64)
        decay = self._forget ** float(n_observed)
        self._successes = self._successes * decay + succ
        self._trials = self._trials * decay + tri
        self._updates += 1
        if self._updates % self.refresh_every == 0 or self._updates < self.refresh_every:
            self._refresh()
        step_rate = float(n_ok) / float(n_observed)
        self._rate += self._rate_weight * (step_rate - self._rate)

    def relax(self, weight: float = 0.01) -> None:
        """Move the running rate back towards its prior; called on steps that drafted nothing.

        The rate is only learned from drafted tokens, so after a run of hard requests pushes it
        below break-even nothing would ever be drafted again to show that later requests are
        easy. Relaxing while idle makes the policy probe again after ~100 plain steps."""
        self._rate += weight * (self._prior_rate - self._rate)

    def _refresh(self) -> None:
        """Recompute the monotone table (PAVA is a Python loop: not on every step)."""
        w = self._prior_weight
        raw = (w * self._prior + self._successes) / (w + self._trials)
        if (raw[:-1] > raw[1:]).any():  # PAVA would pool these neighbours
            self._table = _isotonic(raw, w + self._trials)
        else:  # already monotone: PAVA returns it as it is
            self._table = raw
        self.bounded = _within_unit(self._table)

    def expected_error(
        self, conf: FloatArray, verified_lens: IntArray, accepted: IntArray
    ) -> float:
        """|predicted − observed| accepted tokens per verified token (for a metric)."""
        k = conf.shape[1] if conf.ndim == 2 else 0
        if k == 0 or int(verified_lens.sum()) == 0:
            return 0.0
        mask = np.arange(k)[None, :] < verified_lens[:, None]
        surv = np.cumprod(np.where(mask, self.predict(conf), 1.0), axis=1) * mask
        predicted = float(surv.sum())
        return abs(predicted - float(accepted.sum())) / float(verified_lens.sum())
