"""AdaSpec decides exactly as it did before its per-call overhead was cut.

The fixture `data/policy_equivalence.npz` holds every answer of the policy as it was at commit
0245f56 (before the overhead work) on a seeded workload that walks every path of the policy:
batches 0–256, budgets none / loose / tight / infeasible, prompt-chunk extras, backend-style
loops (no keep_drafting after the last pass, rows cut by their room), verify_lengths without
start(), keep_drafting without start(), a stopped row that drafts again, keep_drafting asked
twice, observe() without its verify_lengths(), max_draft 0, four calibrators (one whose table
turns NaN), three blends, time models with negative fitted slopes and with a tiny fixed cost.
The workload does not depend on the policy's answers, so the first step where an answer
differs is the first mismatch reported.

Compared exactly, bit for bit: who drafts after every pass, the verified lengths, pruned,
guard refusals, infeasible, the predicted plain and step times, expected tokens, the time
biases, the acceptance rate and the calibration table (NaN equal to NaN).

Regenerate ONLY when a decision is meant to change (and say so in the commit); this rebuilds
the reference implementation from git in a temporary directory and records with it:
    .venv/bin/python tests/unit/test_policy_equivalence.py --record [COMMIT]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adaspec.contract import AcceptanceCalibration, StepTimeModel, TimeModel
from adaspec.policy import (
    AcceptanceCalibrator,
    AdaSpecPolicy,
    StepContext,
    StepOutcome,
    StepTimePredictor,
    default_cpu_time_model,
)

FIXTURE = Path(__file__).parent / "data" / "policy_equivalence.npz"
REFERENCE_COMMIT = "0245f56"  # the policy before the overhead work
REPO = Path(__file__).resolve().parents[2]
POLICY_FILES = ("adaptive.py", "calibration.py", "time_model.py")

GPU_LIKE = TimeModel(
    draft=StepTimeModel(intercept_ms=2.0, per_row_ms=0.01, per_ctx_ktoken_ms=0.002),
    verify=StepTimeModel(
        intercept_ms=20.0, per_row_ms=0.05, per_token_ms=0.02, per_ctx_ktoken_ms=0.004
    ),
)
# a profiler fit can come out with negative slopes (noise); the shortcuts that assume costs
# grow with context must then stand aside
NEGATIVE_SLOPES = TimeModel(
    draft=StepTimeModel(intercept_ms=2.0, per_row_ms=-0.001, per_ctx_ktoken_ms=0.002),
    verify=StepTimeModel(
        intercept_ms=20.0, per_row_ms=0.05, per_token_ms=0.02, per_ctx_ktoken_ms=-0.001
    ),
)
# verification cost dominated by its tokens (tiny fixed cost): the verifier prunes hard
TOKEN_BOUND = TimeModel(
    draft=StepTimeModel(intercept_ms=0.3, per_row_ms=0.002, per_ctx_ktoken_ms=0.001),
    verify=StepTimeModel(
        intercept_ms=0.5, per_row_ms=0.001, per_token_ms=0.2, per_ctx_ktoken_ms=0.002
    ),
)
MODELS = {
    "gpu": GPU_LIKE,
    "cpu": default_cpu_time_model(),
    "negative": NEGATIVE_SLOPES,
    "token-bound": TOKEN_BOUND,
}

# A profile-like calibration: uneven bins, a non-monotone prior (PAVA has work to do), counts.
PROFILE_CAL = AcceptanceCalibration(
    bin_edges=[0.0, 0.2, 0.45, 0.6, 0.8, 0.93, 1.0],
    accept_prob=[0.1, 0.35, 0.3, 0.7, 0.65, 0.95],
    counts=[40, 20, 30, 50, 60, 300],
)
EDGE_CONF = np.array([0.0, 0.1, 0.2, 0.45, 0.5, 0.9, 0.93, 1.0])  # values on bin edges


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str
    batches: tuple[int, ...]
    budget: str  # none | loose | tight | infeasible | mixed
    extra_prob: float  # chance that a step carries prompt chunks
    pattern: str  # bench | backend | ragged (half the steps) | mixed (all patterns)
    blend: float = 0.5
    calibrator: str = "identity"  # identity | profile | sure | unweighted
    max_draft: tuple[int, ...] = (8,)
    steps: int = 40


SCENARIOS = [
    Scenario("gpu-free-bench", "gpu", (1, 16, 64, 256), "none", 0.0, "bench"),
    Scenario("gpu-loose-bench", "gpu", (1, 16, 64, 256), "loose", 0.0, "bench"),
    Scenario("gpu-tight-bench", "gpu", (1, 5, 16, 64), "tight", 0.0, "bench"),
    Scenario("gpu-infeasible", "gpu", (1, 7, 32, 128), "infeasible", 0.3, "bench"),
    Scenario("gpu-mixed", "gpu", (0, 1, 3, 16, 48, 256), "mixed", 0.4, "mixed", steps=80),
    Scenario("cpu-free", "cpu", (1, 2, 4, 8), "none", 0.5, "backend", max_draft=(4, 6)),
    Scenario("cpu-tight", "cpu", (1, 2, 4, 8), "tight", 0.5, "backend", max_draft=(4,)),
    Scenario("cpu-mixed", "cpu", (0, 1, 2, 3, 6), "mixed", 0.5, "mixed", max_draft=(0, 3, 5)),
    Scenario("blend0", "gpu", (1, 8, 40), "mixed", 0.2, "mixed", blend=0.0),
    Scenario("blend1", "gpu", (1, 8, 40), "mixed", 0.2, "mixed", blend=1.0),
    Scenario("profile-cal", "gpu", (1, 12, 96), "mixed", 0.3, "mixed", calibrator="profile"),
    Scenario("profile-cpu", "cpu", (1, 3, 5), "mixed", 0.3, "mixed", calibrator="profile"),
    Scenario("sure-deep", "gpu", (1, 4, 32, 256), "mixed", 0.2, "mixed", calibrator="sure"),
    Scenario("k1-k2", "gpu", (1, 9, 64), "mixed", 0.3, "mixed", max_draft=(1, 2)),
    Scenario("ragged", "gpu", (1, 5, 24, 128), "mixed", 0.3, "ragged", steps=60),
    Scenario("negative-slopes", "negative", (1, 6, 64, 256), "mixed", 0.3, "mixed"),
    Scenario("nan-table", "gpu", (2, 16, 64), "mixed", 0.2, "mixed", calibrator="unweighted"),
    Scenario("token-bound", "token-bound", (1, 8, 64, 256), "mixed", 0.2, "mixed"),
]


def _calibrator(kind: str) -> AcceptanceCalibrator:
    if kind == "profile":
        return AcceptanceCalibrator.from_profile(PROFILE_CAL)
    if kind == "sure":
        return AcceptanceCalibrator(np.linspace(0, 1, 11), np.full(10, 0.97), initial_rate=0.97)
    if kind == "unweighted":  # no prior weight: a bin nobody has landed in yet turns NaN
        edges = np.linspace(0, 1, 11)
        return AcceptanceCalibrator(edges, (edges[:-1] + edges[1:]) / 2, prior_weight=0.0)
    return AcceptanceCalibrator.identity()


def drive(
    sc: Scenario, make: Callable[..., AdaSpecPolicy] = AdaSpecPolicy
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Run the scenario; per step (ints, floats): everything the policy answered."""
    with np.errstate(invalid="ignore"):  # the NaN-table scenario divides 0 by 0 on purpose
        return _drive(sc, make)


def _drive(sc: Scenario, make: Callable[..., AdaSpecPolicy]) -> list[tuple[np.ndarray, np.ndarray]]:
    model = MODELS[sc.model]
    policy = make(StepTimePredictor(model), _calibrator(sc.calibrator), next_token_blend=sc.blend)
    prior = StepTimePredictor(model)  # budgets and timings from the unscaled model
    rng = np.random.default_rng(_seed(sc.name))
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(sc.steps):
        b = int(rng.choice(sc.batches))
        k = int(rng.choice(sc.max_draft))
        ctx_lens = rng.integers(1, 3000, size=b).astype(np.int64)
        plain = prior.verify(b, float(b), float(ctx_lens.sum()))
        kind = (
            sc.budget
            if sc.budget != "mixed"
            else str(rng.choice(["none", "loose", "tight", "infeasible"], p=[0.3, 0.3, 0.3, 0.1]))
        )
        factor = {
            "none": None,
            "loose": rng.uniform(2.0, 4.0),
            "tight": rng.uniform(1.0, 1.4),
            "infeasible": rng.uniform(0.5, 0.95),
        }[kind]
        budget = None if factor is None or b == 0 else plain * float(factor)
        extra = float(rng.uniform(0.0, 0.6) * plain) if rng.random() < sc.extra_prob else 0.0
        ctx = StepContext(ctx_lens, k, budget, extra)
        pattern = (
            sc.pattern
            if sc.pattern != "mixed"
            else str(
                rng.choice(
                    ["bench", "backend", "direct", "mismatch", "nostart", "ragged", "twice"],
                    p=[0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1],
                )
            )
        )
        if pattern == "ragged" and sc.pattern == "ragged":  # half the steps plain bench
            pattern = str(rng.choice(["bench", "ragged"]))
        width = max(k, 1)
        src = np.where(
            rng.random((b, width)) < 0.8, rng.beta(8, 1, (b, width)), rng.beta(1, 2, (b, width))
        )
        on_edge = rng.random((b, width)) < 0.05
        src[on_edge] = rng.choice(EDGE_CONF, size=int(on_edge.sum()))
        room = rng.integers(0, k + 2, size=b) if pattern == "backend" else np.full(b, k + 1)
        acc_draw = rng.geometric(0.25, size=b) - 1
        noise = rng.uniform(0.7, 1.6, size=2)
        direct_lens = rng.integers(0, k + 1, size=b).astype(np.int64)
        revive = rng.integers(0, max(b, 1), size=k + 1)  # "ragged": the row that drafts again
        repeat_at = int(rng.integers(0, k + 1))  # "twice": the pass asked about twice

        ints: list[int] = [b, k]
        floats: list[float] = [policy.plain_step_s(ctx), policy.predicted_plain_step_s(ctx_lens)]
        conf = np.zeros((b, k))
        lens = np.zeros(b, dtype=np.int64)
        passes = 0
        if pattern == "direct":
            lens = np.minimum(direct_lens, k)
            conf = np.where(np.arange(k)[None, :] < lens[:, None], src[:, :k], 0.0)
        else:
            if pattern == "nostart":  # keep_drafting() without start(): the state is rebuilt
                drafting = direct_lens > 0
            else:
                drafting = np.asarray(policy.start(ctx), dtype=np.bool_)
            ints += drafting.astype(int).tolist()
            if pattern == "backend":
                drafting = drafting & (room > 0)
            for j in range(k):
                if not drafting.any():
                    break
                passes += 1
                conf[drafting, j] = src[drafting, j]
                lens[drafting] += 1
                if pattern == "backend" and j + 1 >= k:
                    break
                keep = np.asarray(policy.keep_drafting(ctx, conf, lens, drafting), np.bool_)
                if pattern == "twice" and j == repeat_at:
                    keep = np.asarray(policy.keep_drafting(ctx, conf, lens, drafting), np.bool_)
                ints += keep.astype(int).tolist()
                drafting = drafting & keep
                if pattern == "backend":
                    drafting = drafting & (lens < room)
                if pattern == "ragged" and b and lens[revive[j]] < k:
                    drafting[revive[j]] = True
        d = policy.verify_lengths(ctx, conf, lens)
        ints += np.asarray(d.lens).astype(int).tolist()
        ints += [d.pruned, d.guard_refusals, int(d.infeasible)]
        floats += [d.predicted_step_s, *np.asarray(d.expected_tokens, float).tolist()]
        verified = np.asarray(d.lens, dtype=np.int64)
        if pattern == "mismatch":
            verified = np.maximum(verified - 1, 0)  # observe() without its verify_lengths()
        if k == 0:
            conf = np.zeros((b, 0))
        draft_t = passes * prior.draft_pass(float(max(b, 1)), 0.0) * float(noise[0])
        policy.observe(
            StepOutcome(
                conf=conf,
                verified_lens=verified,
                accepted=np.minimum(acc_draw, verified),
                context_lens=ctx_lens,
                drafted_lens=lens.copy() if pattern != "mismatch" else np.zeros(0, np.int64),
                draft_time_s=draft_t,
                verify_time_s=plain * float(noise[1]),
                prefill_extra_s=extra,
            )
        )
        floats += [policy.times.draft_scale, policy.times.verify_scale, policy.cal.mean_rate]
        floats += policy.cal.table.tolist()
        out.append((np.asarray(ints, dtype=np.int64), np.asarray(floats, dtype=np.float64)))
    return out


def _seed(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name))  # stable across processes


def _pack(steps: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    return {
        "ints": np.concatenate([s[0] for s in steps]).astype(np.int32),
        "int_ends": np.cumsum([s[0].size for s in steps]),
        "floats": np.concatenate([s[1] for s in steps]),
        "float_ends": np.cumsum([s[1].size for s in steps]),
    }


def _unpack(data: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    ints = np.split(data["ints"].astype(np.int64), data["int_ends"][:-1])
    floats = np.split(data["floats"], data["float_ends"][:-1])
    return list(zip(ints, floats, strict=True))


def first_mismatch(
    got: list[tuple[np.ndarray, np.ndarray]], want: list[tuple[np.ndarray, np.ndarray]]
) -> str | None:
    """The first step whose answers differ, described; None when all agree."""
    for step, ((gi, gf), (wi, wf)) in enumerate(zip(got, want, strict=True)):
        if gi.shape != wi.shape or not np.array_equal(gi, wi):
            return f"step {step}: decisions {gi.tolist()} != recorded {wi.tolist()}"
        if gf.shape != wf.shape or not np.array_equal(gf, wf, equal_nan=True):
            return f"step {step}: values {gf.tolist()} != recorded {wf.tolist()}"
    return None


def _recorded() -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    with np.load(FIXTURE) as z:
        return {sc.name: _unpack({key: z[f"{sc.name}/{key}"] for key in _KEYS}) for sc in SCENARIOS}


_KEYS = ("ints", "int_ends", "floats", "float_ends")


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda s: s.name)
def test_decisions_match_the_recorded_policy(sc: Scenario) -> None:
    want = _recorded()[sc.name]
    got = drive(sc)
    assert len(got) == len(want) == sc.steps
    problem = first_mismatch(got, want)
    assert problem is None, f"{sc.name}: {problem}"


def test_the_comparison_catches_a_changed_policy() -> None:
    """The check has teeth: a policy that blends its next-token guess a little differently, or
    one whose draft passes are predicted 2% dearer, no longer matches the recording."""
    want = _recorded()
    sc = next(s for s in SCENARIOS if s.name == "gpu-mixed")

    def blended(
        t: StepTimePredictor, c: AcceptanceCalibrator, next_token_blend: float
    ) -> AdaSpecPolicy:
        return AdaSpecPolicy(t, c, next_token_blend + 0.05)

    assert first_mismatch(drive(sc, blended), want[sc.name]) is not None

    def dearer(
        t: StepTimePredictor, c: AcceptanceCalibrator, next_token_blend: float
    ) -> AdaSpecPolicy:
        draft = t.model.draft.model_copy(update={"intercept_ms": t.model.draft.intercept_ms * 1.02})
        return AdaSpecPolicy(
            StepTimePredictor(t.model.model_copy(update={"draft": draft})), c, next_token_blend
        )

    sc = next(s for s in SCENARIOS if s.name == "gpu-tight-bench")
    assert first_mismatch(drive(sc, dearer), want[sc.name]) is not None


@pytest.mark.parametrize("seed", range(5))
def test_prefix_times_equal_the_increment_formula_bit_for_bit(seed: int) -> None:
    """The drafter's cached-m prefix times are the general formula, to the last bit."""
    rng = np.random.default_rng(seed)
    times = StepTimePredictor(MODELS[("gpu", "cpu", "negative", "token-bound", "gpu")[seed]])
    times.observe(0.01, 0.01 * rng.uniform(0.5, 2.0), 0.02, 0.02 * rng.uniform(0.5, 2.0))
    for n in (1, 3, 64, 257, 40):  # growing and shrinking the cache
        cs = np.cumsum(rng.integers(1, 4000, size=n).astype(np.float64))
        base = float(rng.uniform(0.0, 0.1))
        want = base + times.draft_and_verify_increment(np.arange(1.0, n + 1.0), cs)
        np.testing.assert_array_equal(times.draft_and_verify_prefix(cs, base), want)


@pytest.mark.parametrize("deepest", [1, 2, 6])
def test_integer_outcome_counting_matches_the_general_masks(deepest: int) -> None:
    """The calibrator's counting shortcuts for integer outcomes (one verified token per row,
    or the rejected token found by position) learn exactly what the general masks learn
    (float outcomes take the masks)."""
    rng = np.random.default_rng(deepest)
    fast, general = AcceptanceCalibrator.identity(), AcceptanceCalibrator.identity()
    for _ in range(40):
        b, k = int(rng.integers(1, 70)), 6
        conf = rng.random((b, k))
        conf[rng.random((b, k)) < 0.1] = 0.5  # on a bin edge
        verified = rng.integers(0, deepest + 1, size=b).astype(np.int64)
        accepted = np.minimum(rng.integers(-1, k + 1, size=b), verified).astype(np.int64)
        fast.update(conf, verified, accepted)
        general.update(conf, verified.astype(np.float64), accepted.astype(np.float64))
        np.testing.assert_array_equal(fast.table, general.table)
        assert fast.mean_rate == general.mean_rate


def test_row_sums_are_numpy_row_sums_of_the_padded_matrix() -> None:
    """Summing only the drafted columns gives numpy's sums over all of conf's columns."""
    from adaspec.policy.adaptive import _row_sums  # (here: --record imports the old policy)

    rng = np.random.default_rng(3)
    for width in (1, 2, 3, 5, 8):
        P = rng.random((300, width)) * (rng.random((300, width)) < 0.8)
        padded = np.zeros((300, 8))
        padded[:, :width] = P
        np.testing.assert_array_equal(_row_sums(P, 8), padded.sum(axis=1))


def _record_here() -> None:
    arrays: dict[str, Any] = {}  # (Any: numpy's stub types **kwargs like allow_pickle)
    for sc in SCENARIOS:
        for key, value in _pack(drive(sc)).items():
            arrays[f"{sc.name}/{key}"] = value
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(FIXTURE, **arrays)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")


def record(commit: str) -> None:
    """Record with the policy files of `commit` (the rest of the package as checked out)."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(REPO / "engine" / "adaspec", Path(tmp) / "adaspec")
        for name in POLICY_FILES:
            src = subprocess.run(
                ["git", "-C", str(REPO), "show", f"{commit}:engine/adaspec/policy/{name}"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            (Path(tmp) / "adaspec" / "policy" / name).write_text(src, encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": tmp, "ADASPEC_EXPECT_ROOT": tmp}
        subprocess.run([sys.executable, __file__, "--record-here"], check=True, env=env)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--record-here"]:
        import adaspec

        root = os.environ.get("ADASPEC_EXPECT_ROOT", "")
        if not root or not adaspec.__file__ or not adaspec.__file__.startswith(root):
            raise SystemExit(f"not the reference implementation: {adaspec.__file__}")
        _record_here()
    elif sys.argv[1:2] == ["--record"] and len(sys.argv) <= 3:
        record(sys.argv[2] if len(sys.argv) == 3 else REFERENCE_COMMIT)
    else:
        raise SystemExit("usage: test_policy_equivalence.py --record [COMMIT]  (see the docstring)")
