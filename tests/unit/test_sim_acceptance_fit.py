"""Off-path drafts: recorded by the acceptance measurement, fitted into the simulator's model.

The measurement side runs the real ModelRunner on the tiny random pair (fp32, seconds); the fit
side recovers known parameters from sequences the simulator's own sampler drew.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from adaspec.backends.torch.runner import ModelRunner
from adaspec.backends.torch.tiny import noisy_copy, tiny_model
from adaspec.profile.measure import measure_acceptance
from adaspec.sim.acceptance import (
    OFFPATH_SHIFT_DEFAULT,
    AcceptanceModel,
    AcceptanceSampler,
    load_acceptance_model,
)
from adaspec.sim.fit import (
    ObservedStep,
    fit_acceptance,
    fit_acceptance_steps,
    fit_offpath_shift,
    sampled_steps,
    step_statistics,
)

EDGES = [0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0]


def _truth(**kw: float) -> AcceptanceModel:
    return AcceptanceModel(
        bin_edges=EDGES,
        conf_mass=[10, 12, 12, 6, 6, 6, 30],
        accept_prob=[0.3, 0.5, 0.7, 0.85, 0.9, 0.97, 1.0],
        **kw,
    )


def _draft_greedy_confidence(runner: ModelRunner, prefix: list[int], n: int) -> list[float]:
    """Top-1 probabilities of `n` plain greedy draft tokens after `prefix` (fresh cache)."""
    slot = runner.alloc()
    try:
        out: list[float] = []
        feed = prefix
        for _ in range(n):
            probs = torch.softmax(runner.forward([slot], [feed], last_n=1)[0][-1].float(), dim=-1)
            conf, tok = probs.max(dim=-1)
            out.append(float(conf))
            feed = [int(tok)]
        return out
    finally:
        runner.free(slot)


def test_measurement_records_every_draft_of_a_step_on_and_off_path() -> None:
    """Each step's drafts are the draft's own greedy continuation of the true text so far, so
    on-path + off-path confidences must equal a plain greedy draft run from that prefix; the
    off-path part is exactly the drafts after the first rejected one."""
    target_model = tiny_model(seed=3)
    target = ModelRunner(target_model, 4, 128, dtype=torch.float32)
    draft = ModelRunner(noisy_copy(target_model, 0.3, seed=5), 4, 128, dtype=torch.float32)
    prompts = [[5, 9, 11, 20], [7, 3], [40, 41, 42, 43, 44, 45]]
    k = 4
    run = measure_acceptance(target, draft, prompts, k, 20, frozenset())

    # the step records carry the same on-path observations the flat lists do, in order
    assert [c for s in run.steps for c in s.on_confidence] == run.confidence
    assert [a for s in run.steps for a in s.on_accepted] == run.accepted
    n_off = 0
    emitted = [0] * len(prompts)
    for s in run.steps:
        observed = len(s.on_confidence)
        assert len(s.on_accepted) == observed >= 1
        assert all(s.on_accepted[:-1])
        assert len(s.off_confidence) == (0 if s.on_accepted[-1] else k - observed)
        if s.on_accepted[-1]:
            assert observed == k  # all accepted: nothing was drafted off the path
        prefix = prompts[s.request] + run.outputs[s.request][: emitted[s.request]]
        drafted = [*s.on_confidence, *s.off_confidence]
        np.testing.assert_allclose(drafted, _draft_greedy_confidence(draft, prefix, k), atol=1e-4)
        emitted[s.request] += sum(s.on_accepted) + 1
        n_off += len(s.off_confidence)
    assert n_off > 0  # the noisy draft was rejected mid-step at least once
    assert emitted == [len(o) for o in run.outputs]


def _measure_like(
    model: AcceptanceModel, n_req: int, n_out: int, k: int, seed: int
) -> list[list[ObservedStep]]:
    """What measure_acceptance would record if the sampler's draws were the pair's text,
    written out step by step (independent of adaspec.sim.fit's own replay)."""
    smp = AcceptanceSampler(model, seed)
    out = []
    for r in range(n_req):
        on, acc, off = smp.draw(r, n_out + k + 2)
        steps: list[ObservedStep] = []
        pos = 0
        while pos < n_out:
            c_on: list[float] = []
            a_on: list[bool] = []
            c_off: list[float] = []
            on_path = True
            for j in range(k):
                if on_path:
                    c_on.append(float(on[pos + j]))
                    a_on.append(bool(acc[pos + j]))
                    on_path = bool(acc[pos + j])
                else:
                    c_off.append(float(off[pos + j]))
            steps.append(ObservedStep(c_on, a_on, c_off))
            pos += sum(a_on) + 1
        out.append(steps)
    return out


def test_sampled_steps_replay_the_measurement() -> None:
    truth = _truth(request_sigma=0.3, local_sigma=0.5, local_len=4.0, offpath_shift=0.5)
    mine = _measure_like(truth, 5, 30, 6, seed=3)
    theirs = sampled_steps(truth, [30] * 5, 6, replicas=1, seed=3)
    assert [[tuple(map(list, s)) for s in r] for r in mine] == [
        [tuple(map(list, s)) for s in r] for r in theirs
    ]


@pytest.mark.parametrize("shift", [0.7, -0.3])
def test_fit_recovers_a_known_offpath_shift(shift: float) -> None:
    """400 requests × 30 tokens, K = 6 (~2500 off-path drafts): the fit's spread at this size is
    about 0.02 (it is ~0.085 at the real measurement's 16 requests, checked by repeated fits),
    so 0.1 is a 5-sigma band that a wrong sign or the 1.0 default would still fail."""
    truth = _truth(request_sigma=0.25, local_sigma=0.6, local_len=5.0, offpath_shift=shift)
    steps = _measure_like(truth, 400, 30, 6, seed=11)
    fit = fit_acceptance_steps(steps, replicas=4, seed=0)
    assert fit.offpath_shift == pytest.approx(shift, abs=0.1)
    # the off-path fit alone, given the true on-path model, lands in the same place
    again = fit_offpath_shift(truth.model_copy(update={"offpath_shift": 1.0}), steps, replicas=4)
    assert again.offpath_shift == pytest.approx(shift, abs=0.1)
    # what a threshold policy sees off the path is reproduced by the fitted model
    measured = step_statistics(steps)
    drawn = step_statistics(sampled_steps(fit, [30] * 400, 6, replicas=1, seed=5))
    assert drawn["p_off_above"] == pytest.approx(measured["p_off_above"], abs=0.03)


def test_fit_recovers_within_step_persistence() -> None:
    """Lag-1 correlation of the normal scores (step-to-step persistence) and its parts from
    200 × 150 tokens: repeated fits spread ~0.02 in lag-1 and ~0.04 in each variance."""
    truth = _truth(request_sigma=math.sqrt(0.1), local_sigma=math.sqrt(0.4), local_len=4.0)
    smp = AcceptanceSampler(truth, seed=2)
    reqs = [tuple(x.tolist() for x in smp.draw(r, 150)[:2]) for r in range(200)]
    fit = fit_acceptance(reqs)

    def lag1(m: AcceptanceModel) -> float:
        return m.request_sigma**2 + m.local_sigma**2 * math.exp(-1.0 / m.local_len)

    assert lag1(fit) == pytest.approx(lag1(truth), abs=0.06)
    assert fit.request_sigma**2 == pytest.approx(0.1, abs=0.1)
    assert fit.local_sigma**2 == pytest.approx(0.4, abs=0.12)
    assert 2.0 <= fit.local_len <= 8.0
    # a request-only model (no local noise) is told apart from a local one
    flat = _truth(request_sigma=0.6, local_sigma=0.0)
    smp = AcceptanceSampler(flat, seed=2)
    reqs = [tuple(x.tolist() for x in smp.draw(r, 150)[:2]) for r in range(200)]
    fit = fit_acceptance(reqs)
    assert fit.request_sigma**2 == pytest.approx(0.36, abs=0.08)
    assert fit.local_sigma**2 < 0.1


def test_zero_shift_off_path_marginal_is_the_histogram() -> None:
    """With offpath_shift 0 an off-path draft is as confident as an on-path one at the same
    place: both marginals are the histogram; a positive shift lowers it."""
    m = _truth(request_sigma=0.3, local_sigma=0.5, offpath_shift=0.0)
    on, off = [], []
    for r in range(300):
        c, _, o = AcceptanceSampler(m, 1).draw(r, 100)
        on.append(c)
        off.append(o)
    share = np.asarray(m.conf_mass) / sum(m.conf_mass)
    for x in (np.concatenate(on), np.concatenate(off)):
        got = np.bincount(np.searchsorted(EDGES[1:-1], x, side="right"), minlength=7) / x.size
        np.testing.assert_allclose(got, share, atol=0.02)
    lower = AcceptanceSampler(m.model_copy(update={"offpath_shift": 1.0}), 1).draw(0, 2000)[2]
    assert lower.mean() < np.concatenate(off).mean() - 0.1


def test_models_written_before_the_off_path_fit_still_load(tmp_path: Path) -> None:
    """A model file as bench/measure_acceptance.py wrote it before (fixed shift 1.0) loads with
    its shift; one with the field missing gets the measured default."""
    old = (
        '{"bin_edges": [0.0, 0.5, 1.0], "conf_mass": [1.0, 3.0], "accept_prob": [0.4, 0.9], '
        '"request_sigma": 0.0, "local_sigma": 0.47, "local_len": 16.0, "offpath_shift": 1.0, '
        '"source": "measured (366 observations, 16 requests; correlation by method of moments)"}'
    )
    (tmp_path / "old.json").write_text(old)
    m = load_acceptance_model(str(tmp_path / "old.json"))
    assert m.offpath_shift == 1.0 and m.local_len == 16.0
    (tmp_path / "bare.json").write_text(
        '{"bin_edges": [0.0, 1.0], "conf_mass": [1.0], "accept_prob": [0.8]}'
    )
    bare = load_acceptance_model(str(tmp_path / "bare.json"))
    assert bare.offpath_shift == OFFPATH_SHIFT_DEFAULT == 0.0
    (tmp_path / "bad.json").write_text(old.replace('"offpath_shift": 1.0', '"offpath_shift": 9'))
    with pytest.raises(ValueError, match="offpath_shift"):
        load_acceptance_model(str(tmp_path / "bad.json"))


def test_off_path_fit_rejects_unusable_steps() -> None:
    with pytest.raises(ValueError, match="draft_len"):
        fit_offpath_shift(
            _truth(), [[ObservedStep([0.9], [False], [0.5]), ObservedStep([0.9], [False], [])]]
        )
    with pytest.raises(ValueError, match="no off-path"):
        fit_offpath_shift(_truth(), [[ObservedStep([0.9, 0.8], [True, True], [])]])
