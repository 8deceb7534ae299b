"""Step-log analysis (adaspec.sim.step_log) and the simulator's engine overhead.

Synthetic logs come from a small generator that prices each pass with a known time model
(written out here, not with adaspec.sim.pricing), adds a known EngineOverhead and, optionally,
Gaussian noise of known size; the fit must then recover the overhead within what that noise
allows. The simulator must add exactly the overhead's time, and nothing without one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adaspec.contract import Policy, StepTimeModel
from adaspec.sim import (
    EngineOverhead,
    SimConfig,
    StepLogError,
    Trace,
    load_builtin_profile,
    run_policy,
)
from adaspec.sim.step_log import (
    GROUPS,
    check_generations,
    compare,
    fit_leave_one_policy_out,
    fit_overhead,
    load_step_logs,
    nnls,
    read_step_log,
)

ROOT = Path(__file__).resolve().parents[2]
CPU = load_builtin_profile("cpu-qwen-coder-estimate")
TM = CPU.time_model
assert TM.prefill is not None, "the generator prices prompt chunks with the prefill model"
DRAFT_SHARE = 0.3
TRUE = EngineOverhead(
    per_draft_pass_ms=6.0,
    per_draft_row_ms=1.5,
    per_verify_ms=9.0,
    per_verify_row_ms=0.0,  # a coefficient the data should find to be 0
    per_verify_token_ms=0.8,
    per_step_ms=3.0,
    per_step_row_ms=0.4,
    per_gap_ms=2.5,
    per_gap_row_ms=0.3,
    per_gap_emitted_token_ms=0.2,
)


def _lin(m: StepTimeModel, rows: float, tokens: float, ctx: float, intercept: bool = True) -> float:
    c0 = m.intercept_ms if intercept else 0.0
    ms = c0 + m.per_row_ms * rows + m.per_token_ms * tokens + m.per_ctx_ktoken_ms * ctx / 1000
    return ms / 1000.0


@dataclass
class Synthetic:
    records: list[dict[str, Any]] = field(default_factory=list)
    design: dict[str, list[list[float]]] = field(default_factory=lambda: {g: [] for g in GROUPS})
    """Per fitted component, the features (1, …) of every item the fit should use."""


def synthesize(
    n: int,
    oh: EngineOverhead,
    *,
    seed: int,
    noise_ms: float = 0.0,
    policy: str = "fixed-4",
    max_draft: int = 4,
    step0: int = 1,
) -> Synthetic:
    """Records of `n` steps: mixed batches (some only prefilling, some carrying prompt chunks),
    draft lengths 0..max_draft per row, times from TM + `oh` + N(0, noise_ms) per measured time.
    Gaps before steps with no decoding rows are idle waits (large, random)."""
    rng = np.random.default_rng(seed)
    out = Synthetic()
    t = 0.0
    prev: dict[str, Any] | None = None
    assert TM.prefill is not None

    def e() -> float:
        return float(rng.normal(0.0, noise_ms)) / 1000.0 if noise_ms else 0.0

    for i in range(n):
        prefill_only = prev is not None and rng.random() < 0.08
        b = 0 if prefill_only else int(rng.integers(1, 9))
        L = rng.integers(20, 900, b)
        lens = rng.integers(0, max_draft + 1, b) if max_draft else np.zeros(b, dtype=np.int64)
        chunks = prefill_only or rng.random() < 0.2
        p_rows = int(rng.integers(1, 3)) if chunks else 0
        p_tokens = int(rng.integers(32, 400)) * p_rows if chunks else 0
        p_work = float(p_tokens * (p_tokens + 1) / 2) if chunks else 0.0
        # the prompt chunks' cost beyond the forwards they ride along with (target + draft);
        # the engine feeds the draft's share with draft pass 0 when the step drafts
        chunk_s = _lin(TM.prefill, p_rows, p_tokens, p_work, intercept=False) if chunks else 0.0
        draft_share = DRAFT_SHARE * chunk_s if b and lens.any() else 0.0
        draft_rows, draft_ctx, draft_pass = [], [], []
        for j in range(int(lens.max()) if b else 0):
            on = lens > j
            rows = int(on.sum())
            ctx = int((L[on] + j).sum())
            t_pass = _lin(TM.draft, rows, rows, ctx) + oh.draft_pass_s(rows) + e()
            t_pass += draft_share if j == 0 else 0.0
            draft_rows.append(rows)
            draft_ctx.append(ctx)
            draft_pass.append(t_pass)
            if not (j == 0 and chunks):
                out.design["draft_pass"].append([1.0, rows])
        s = np.array([int(rng.integers(0, k + 1)) for k in lens], dtype=np.int64)
        acc = np.array([int(rng.integers(0, k + 1)) for k in s], dtype=np.int64)
        firsts = int(rng.integers(0, p_rows + 1))
        if b:
            tokens = float(s.sum() + b)
            ctx_v = float(((s + 1) * L + s * (s + 1) / 2).sum())
            verify = _lin(TM.verify, b, tokens, ctx_v) + oh.verify_s(b, tokens) + e()
            if chunks:
                verify += chunk_s - draft_share
                if not draft_rows:
                    verify += TM.draft.intercept_ms / 1000.0
            else:
                out.design["verify"].append([1.0, b, tokens])
        else:
            verify = _lin(TM.prefill, p_rows, p_tokens, p_work) + e()
        policy_s = float(rng.uniform(0.0, 0.002)) if b else 0.0
        in_step = oh.in_step_s(b) + e()
        out.design["in_step"].append([1.0, b])
        wall = sum(draft_pass) + verify + policy_s + in_step
        if prev is None:
            gap = None
        elif b:
            gap = oh.gap_s(prev["batch"], prev["emitted"]) + e()
            out.design["gap"].append([1.0, prev["batch"], prev["emitted"]])
        else:
            gap = float(rng.uniform(0.2, 3.0))  # idle: must not enter the fit
        t_start = t + (gap or 0.0)
        rec = {
            "v": 1, "step": step0 + i, "t_start": t_start, "wall_s": wall, "gap_s": gap,
            "policy": policy, "generation": 1, "batch": b,
            "context_lens": [int(x) for x in L], "draft_rows": draft_rows,
            "draft_ctx": draft_ctx, "draft_pass_s": draft_pass,
            "draft_s": sum(draft_pass) + policy_s / 2, "policy_s": policy_s, "verify_s": verify,
            "verified": [int(x) for x in s], "proposed": int(lens.sum()),
            "accepted": int(acc.sum()), "prefill_rows": p_rows, "prefill_tokens": p_tokens,
            "prefill_ctx_work": p_work, "prefill_extra_pred_s": 0.0,
            "emitted": int((acc + 1).sum()) + firsts,
        }  # fmt: skip
        out.records.append(rec)
        prev = rec
        t = t_start + wall
    return out


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _fields(oh: EngineOverhead) -> dict[str, float]:
    return oh.model_dump()


# ----------------------------------------------------------------------------- the fit


def test_noiseless_log_gives_back_the_overhead_exactly(tmp_path: Path) -> None:
    syn = synthesize(400, TRUE, seed=1)
    logs = load_step_logs([_write(tmp_path / "a.jsonl", syn.records)])
    fit = fit_overhead(logs.steps, TM)
    for f, want in _fields(TRUE).items():
        assert getattr(fit.overhead, f) == pytest.approx(want, abs=1e-6), f
    for g, gf in fit.groups.items():
        assert gf.n == len(syn.design[g]), g  # busy gaps only; chunk steps not in verify/draft
        assert gf.rmse_after_ms is not None and gf.rmse_after_ms < 1e-6
    # with the overhead, the simulator's prediction is the measured time, component by component
    cmp = compare(logs.steps, TM, overhead=fit.overhead)
    for c, s in cmp.overall.items():
        if c == "policy":  # not simulated unless charge_policy_time
            assert s.predicted_s == 0.0 and s.measured_s > 0
            continue
        assert s.n > 0, c
        assert s.with_overhead_s is not None
        assert s.with_overhead_s == pytest.approx(s.measured_s - (c == "total") * _policy(cmp))


def _policy(cmp: Any) -> float:
    return float(cmp.overall["policy"].measured_s)


def test_noisy_fit_is_within_four_standard_errors(tmp_path: Path) -> None:
    """Additive N(0, σ) noise on each measured time: the least-squares coefficient of feature
    i has standard error σ·sqrt(((XᵀX)⁻¹)ᵢᵢ) (X from the generator, not from the fit). Four of
    them: a seeded run that fails is a real miss, not bad luck (p ≈ 6e-5 per coefficient)."""
    sigma = 0.5  # ms; the smallest gap is 3 ms, so no measured time goes below 0
    syn = synthesize(1500, TRUE, seed=2, noise_ms=sigma)
    logs = load_step_logs([_write(tmp_path / "a.jsonl", syn.records)])
    fit = fit_overhead(logs.steps, TM)
    for g, fields in GROUPS.items():
        X = np.asarray(syn.design[g])
        se = sigma * np.sqrt(np.diag(np.linalg.inv(X.T @ X)))
        for f, s in zip(fields, se, strict=True):
            got, want = getattr(fit.overhead, f), getattr(TRUE, f)
            assert abs(got - want) <= 4 * s, f"{f}: {got:.4f} vs {want} (4 SE = {4 * s:.4f})"
            reported = fit.groups[g].stderr_ms[f]
            if want > 0:  # the fit's own standard error agrees with the textbook one
                assert reported is not None and 0.7 < reported / s < 1.4, f
        assert fit.groups[g].rmse_after_ms == pytest.approx(sigma, rel=0.15)


def test_profile_error_shows_in_the_comparison(tmp_path: Path) -> None:
    """No overhead in the log: every model component matches the profile; a profile 20 %
    too fast reads as the engine being 1.25× slower on every forward."""
    syn = synthesize(300, EngineOverhead(), seed=3)
    logs = load_step_logs([_write(tmp_path / "a.jsonl", syn.records)])
    exact = compare(logs.steps, TM)
    fast = TM.model_copy(
        update={
            k: getattr(TM, k).model_copy(
                update={
                    f: getattr(getattr(TM, k), f) * 0.8
                    for f in ("intercept_ms", "per_row_ms", "per_token_ms", "per_ctx_ktoken_ms")
                }
            )
            for k in ("draft", "verify", "prefill")
        }
    )
    slow = compare(logs.steps, fast)
    for c in ("draft_pass", "verify", "chunk_step", "prefill_pass"):
        assert exact.overall[c].ratio == pytest.approx(1.0), c
        assert exact.overall[c].mape == pytest.approx(0.0, abs=1e-9), c
        assert slow.overall[c].ratio == pytest.approx(1.25), c
    assert exact.overall["gap"].ratio is None and exact.overall["gap"].measured_s == 0.0


def test_nnls_matches_the_constrained_optimum() -> None:
    """Against a brute-force grid: the exact subset search is at least as good, and never
    negative, where plain least squares goes negative."""
    rng = np.random.default_rng(4)
    A = np.column_stack([np.ones(60), rng.uniform(0, 5, 60), rng.uniform(0, 5, 60)])
    y = A @ np.array([2.0, -1.0, 0.5]) + rng.normal(0, 0.1, 60)
    ols, *_ = np.linalg.lstsq(A, y, rcond=None)
    assert ols[1] < 0
    x = nnls(A, y)
    assert (x >= 0).all() and x[1] == 0.0
    grid = np.linspace(0, 3, 61)
    best = min(
        float(np.sum((A @ np.array([a, b, c]) - y) ** 2)) for a in grid for b in grid for c in grid
    )
    assert float(np.sum((A @ x - y) ** 2)) <= best + 1e-9


def test_leave_one_policy_out_never_sees_the_policy_it_predicts(tmp_path: Path) -> None:
    """Two policies with very different overheads: each one's fit is the other's overhead,
    and its source lists exactly the other's lines."""
    big = EngineOverhead(**{f: 10 * v for f, v in _fields(TRUE).items()})
    a = _write(tmp_path / "a.jsonl", synthesize(200, TRUE, seed=5, policy="fixed-4").records)
    b = _write(tmp_path / "b.jsonl", synthesize(200, big, seed=6, policy="adaspec").records)
    logs = load_step_logs([a, b])
    fits = fit_leave_one_policy_out(logs.steps, TM, ["fixed-4", "adaptive"])
    for kind, want, other in (("fixed-4", big, b), ("adaptive", TRUE, a)):
        fit = fits[kind]
        assert fit.source.excluded_policies == [kind]
        assert list(fit.source.lines) == [str(other)]
        assert fit.source.lines[str(other)] == [(1, 200)]
        for f, v in _fields(want).items():
            assert getattr(fit.overhead, f) == pytest.approx(v, abs=1e-6), (kind, f)
    with pytest.raises(ValueError, match="no step records left"):
        fit_overhead(load_step_logs([a]).steps, TM, exclude=["fixed-4"])


def test_gaps_need_chunked_prefill_and_consecutive_steps(tmp_path: Path) -> None:
    recs = synthesize(120, TRUE, seed=7).records
    whole = [dict(r, prefill_rows=0, prefill_tokens=0, prefill_ctx_work=0.0) for r in recs]
    whole = [r for r in whole if r["batch"] > 0]  # whole-prompt logs have no prefill-only steps
    logs = load_step_logs([_write(tmp_path / "whole.jsonl", whole)])
    cmp = compare(logs.steps, TM)
    assert cmp.overall["gap"].n == 0 and cmp.gap_files_left_out == [str(tmp_path / "whole.jsonl")]
    # a missing step number (a failed step is not logged) drops the gap after it
    holey = [r for r in recs if r["step"] != 50]
    n_full = compare(load_step_logs([_write(tmp_path / "f.jsonl", recs)]).steps, TM)
    n_holey = compare(load_step_logs([_write(tmp_path / "h.jsonl", holey)]).steps, TM)
    lost = int(recs[50]["batch"] > 0) + int(recs[49]["batch"] > 0)  # steps 50 and 51
    assert n_full.overall["gap"].n - n_holey.overall["gap"].n == lost


# ----------------------------------------------------------------------------- the loader


def _one(**change: Any) -> dict[str, Any]:
    rec = synthesize(3, TRUE, seed=8).records[1]
    return {**rec, **change}


@pytest.mark.parametrize(
    ("lines", "where", "message"),
    [
        (["{not json"], ":1:", "not valid JSON"),
        ([_one(), '{"v": 1,'], ":2:", "not valid JSON"),  # a broken line that is not last
        ([_one(v=2)], ":1:", "v: format version 2"),
        ([{k: v for k, v in _one().items() if k != "verify_s"}], ":1:", "verify_s: Field required"),
        ([_one(wall_s=-0.1)], ":1:", "wall_s: Input should be greater than or equal to 0"),
        ([_one(), _one(surprise=1)], ":2:", "surprise: Extra inputs are not permitted"),
        ([_one(context_lens=[5])], ":1:", "context_lens: 1 entries for batch"),
        ([_one(draft_pass_s=[0.1])], ":1:", "draft_pass_s: 1 entries for"),
        ([_one(accepted=10_000)], ":1:", "accepted: 10000 > Σ verified"),
        ([[1, 2]], ":1:", "a record must be a JSON object"),
    ],
)
def test_loader_errors_name_file_line_and_field(
    tmp_path: Path, lines: list[Any], where: str, message: str
) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    if lines[-1] == '{"v": 1,':
        p.write_text(p.read_text() + json.dumps(_one()) + "\n")
    with pytest.raises(StepLogError) as err:
        read_step_log(p)
    assert f"{p}{where}" in str(err.value) and message in str(err.value), str(err.value)


def test_loader_skips_a_torn_last_line_and_says_so(tmp_path: Path) -> None:
    p = tmp_path / "torn.jsonl"
    good = synthesize(3, TRUE, seed=9).records
    p.write_text("".join(json.dumps(r) + "\n" for r in good) + json.dumps(good[0])[:40])
    logs = read_step_log(p)
    assert len(logs.steps) == 3 and [s.line for s in logs.steps] == [1, 2, 3]
    assert logs.notes == [f"{p}:4: skipped a torn last line (the server stopped mid-write)"]
    with pytest.raises(StepLogError, match="no such step log"):
        read_step_log(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(StepLogError, match="no step records"):
        read_step_log(tmp_path / "empty.jsonl")


def test_generation_map_must_agree_with_the_logged_policy(tmp_path: Path) -> None:
    p = _write(tmp_path / "a.jsonl", synthesize(5, TRUE, seed=10, policy="adaspec").records)
    steps = read_step_log(p).steps
    assert {s.kind for s in steps} == {"adaptive"}
    assert check_generations(steps, {1: "adaptive"}) == 5
    assert check_generations(steps, {2: "off"}) == 0
    with pytest.raises(StepLogError, match=rf"{p}:1: policy: 'adaspec' \(adaptive\) ran under"):
        check_generations(steps, {1: "fixed-3"})


def test_reader_accepts_what_the_engine_writes() -> None:
    """The engine's writer (adaspec.step_log) and this reader describe the same format."""
    writer = pytest.importorskip(
        "adaspec.step_log", reason="the engine's step-log writer (adaspec.step_log) is not here"
    )
    from adaspec.sim.step_log import StepRecord

    assert list(writer.StepRecord.model_fields) == list(StepRecord.model_fields)
    rec = writer.StepRecord.model_validate(_one())
    assert StepRecord.model_validate_json(rec.model_dump_json()).model_dump() == rec.model_dump()


# ----------------------------------------------------------------------------- the simulator

DOC = Policy(generation=1, tpot_slo_ms=400.0, tpot_budget_ms=360.0, max_draft_tokens=8)


def _trace() -> Trace:
    rng = np.random.default_rng(11)
    n = 25
    return Trace(
        "t", np.sort(rng.uniform(0, 15, n)), rng.integers(5, 300, n), rng.integers(1, 40, n)
    )


def _times(res: Any) -> list[float]:
    return [x for r in res.requests for x in (r.first_token_s, r.finish_s)] + list(
        res.steps.duration_s
    )


@pytest.mark.parametrize("kind", ["off", "fixed-3", "adaptive"])
@pytest.mark.parametrize("chunk", [0, 512])
def test_zero_overhead_is_bit_identical_to_none(kind: str, chunk: int) -> None:
    cfg = SimConfig(max_batch=4, noise_sigma=0.1, prefill_chunk_tokens=chunk)
    base = run_policy(kind, _trace(), CPU, DOC, config=cfg)
    zero = run_policy(
        kind, _trace(), CPU, DOC, config=cfg.model_copy(update={"overhead": EngineOverhead()})
    )
    assert _times(zero) == _times(base)
    assert (zero.proposed, zero.verified, zero.accepted) == (
        base.proposed,
        base.verified,
        base.accepted,
    )
    some = run_policy(kind, _trace(), CPU, DOC, config=cfg.model_copy(update={"overhead": TRUE}))
    assert sum(r.finish_s for r in some.requests) > sum(r.finish_s for r in base.requests)


def test_overhead_slows_a_deterministic_run_by_exactly_its_time() -> None:
    """Two requests arriving together, fixed-2, no noise: the batch and every step's drafts do
    not depend on time, so each request ends later by the overhead of every step up to its
    last one, plus the gaps between them — computed here from the plain run's step log."""
    tr = Trace("two", np.zeros(2), np.array([40, 60]), np.array([9, 14]))
    cfg = SimConfig(max_batch=4, noise_sigma=0.0)
    base = run_policy("fixed-2", tr, CPU, DOC, config=cfg)
    slow = run_policy("fixed-2", tr, CPU, DOC, config=cfg.model_copy(update={"overhead": TRUE}))
    st = base.steps
    assert st.batch == slow.steps.batch and st.verified == slow.steps.verified
    assert st.batch[0] == 0 and st.prefill_tokens[0] == 100  # one step prefills both prompts
    delta, gap = [], []
    for i, b in enumerate(st.batch):
        d = TRUE.in_step_s(b)
        if b:
            passes = st.proposed[i] // b  # fixed-2: every row drafts in every pass
            d += passes * TRUE.draft_pass_s(b) + TRUE.verify_s(b, st.verified[i] + b)
        delta.append(d)
        firsts = 2 if i == 0 else 0
        gap.append(TRUE.gap_s(b, st.emitted[i] + firsts))
    ends = np.cumsum(st.duration_s)
    for r0, r1 in zip(base.requests, slow.requests, strict=True):
        last = int(np.argmin(np.abs(ends + st.start_s[0] - r0.finish_s)))
        want = sum(delta[: last + 1]) + sum(gap[:last])
        assert r1.finish_s - r0.finish_s == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert r1.first_token_s - r0.first_token_s == pytest.approx(delta[0], abs=1e-12)


# ----------------------------------------------------------------------------- the scripts


@pytest.fixture
def made() -> Iterator[list[Path]]:
    out: list[Path] = []
    yield out
    for p in out:
        p.unlink(missing_ok=True)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_step_times_script(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.jsonl", synthesize(150, TRUE, seed=12, policy="fixed-4").records)
    b = _write(tmp_path / "b.jsonl", synthesize(150, TRUE, seed=13, policy="adaspec").records)
    out = tmp_path / "st.json"
    proc = _run("bench/step_times.py", "--step-log", str(a), str(b), "--profile",
                "cpu-qwen-coder-estimate", "--exclude-policy", "adaspec",
                "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "fixed-4:" in proc.stdout and "adaptive:" not in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["excluded_policies"] == ["adaptive"]
    assert doc["fit"]["source"]["records_by_policy"] == {"fixed-4": 150}
    for f, v in _fields(TRUE).items():
        assert doc["overhead"][f] == pytest.approx(v, abs=1e-6), f
    bad = _run("bench/step_times.py", "--step-log", str(a), "--profile", "cpu-qwen-coder-estimate",
               "--exclude-policy", "threshold")  # fmt: skip
    assert bad.returncode == 2 and "--exclude-policy threshold: not in the logs" in bad.stderr


def test_sim_validate_with_step_logs(tmp_path: Path, made: list[Path]) -> None:
    """A sim "measurement", then validate with step logs of two policies: each is simulated
    with the other's overhead, and the result says which records fitted which."""
    tag = "-unit-steplog"
    name = f"compare_policies-sim-adaspec-conv-{tag}"
    made += [ROOT / "bench/results" / f"{name}.json", ROOT / "bench/results" / f"{name}.png"]
    proc = _run("bench/compare_policies.py", "--engine", "sim", "--max-requests", "6",
                "--noise", "0", "--policies", "off,adaptive", f"--tag={tag}",
                "--rounds", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    a = _write(
        tmp_path / "off.jsonl", synthesize(100, TRUE, seed=14, policy="off", max_draft=0).records
    )
    big = EngineOverhead(per_verify_ms=40.0, per_gap_ms=30.0)
    b = _write(tmp_path / "ada.jsonl", synthesize(100, big, seed=15, policy="adaspec").records)
    out = tmp_path / "val.json"
    proc = _run("bench/sim_validate.py", "--noise", "0", "validate", "--measured",
                str(made[0]), "--step-logs", str(a), str(b), "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "P90 err+oh" in proc.stdout and "with engine overhead: worst |error|" in proc.stdout
    doc = json.loads(out.read_text())
    assert "worst |error|: P90 TPOT 0.0%, throughput 0.0%" in proc.stdout  # without: unchanged
    fits = doc["overhead"]["fits"]
    assert fits["off"]["source"]["lines"] == {str(b): [[1, 100]]}
    assert fits["adaptive"]["source"]["lines"] == {str(a): [[1, 100]]}
    assert doc["policies"]["off"]["with_overhead"]["overhead"]["per_verify_ms"] == pytest.approx(
        40.0
    )
    # more engine time → a slower simulated run than the measurement (a sim run without it)
    assert doc["policies"]["off"]["with_overhead"]["throughput_error"] < -0.01
    clash = _run("bench/sim_validate.py", "validate", "--measured", str(made[0]),
                 "--step-logs", str(a), "--overhead", str(out))  # fmt: skip
    assert clash.returncode == 2 and "not allowed with argument" in clash.stderr
