"""Discrete-event simulator of the engine loop, driving the real SpecPolicy code.

It mirrors adaspec.engine: each loop iteration admits waiting requests FIFO up to `max_batch`
(one prefill each, a batch-1 target pass over the prompt plus a draft pass over it; the prefill
emits the first token), then runs one decoding step for the whole running batch exactly as
adaspec.policy.base describes (start → draft passes with keep_drafting → verify_lengths →
observe). Arrivals during a step wait for the next iteration. When nothing runs, the clock jumps
to the next arrival.

Times come from the Profile's TimeModel (the "truth"; the policy gets its own
StepTimePredictor built from a profile, which may differ to test robustness), each pass
optionally multiplied by log-normal noise. Confidences and acceptance come from an
AcceptanceModel (adaspec.sim.acceptance). All randomness is seeded: same inputs, same result.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from adaspec.contract import Policy, Profile, StepTimeModel, TimeModel
from adaspec.policy.base import SpecPolicy, StepContext, StepOutcome
from adaspec.policy.factory import StepLimits, limits_for, make_policy
from adaspec.sim.acceptance import AcceptanceModel, AcceptanceSampler
from adaspec.sim.results import RequestRecord, StepLog, Summary, summarize
from adaspec.sim.traces import Trace


class SimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_batch: int = Field(default=8, ge=1)
    noise_sigma: float = Field(default=0.0, ge=0.0, description="log-normal sd per pass")
    prefill_draft: bool = Field(default=True, description="prefill also runs the draft model")
    record_spec_lens: bool = False
    charge_policy_time: bool = Field(
        default=False, description="add the policy's measured wall time to each step (not seeded)"
    )
    seed: int = 0


@dataclass
class SimResult:
    policy: str
    requests: list[RequestRecord]
    steps: StepLog
    request_steps: int
    proposed: int
    verified: int
    accepted: int
    policy_wall_s: float
    sim_wall_s: float

    def summary(self, tpot_slo_s: float) -> Summary:
        return summarize(
            self.requests,
            tpot_slo_s,
            verified=float(self.verified),
            accepted=float(self.accepted),
            request_steps=float(self.request_steps),
            steps=len(self.steps.batch),
        )


def _secs(m: StepTimeModel, rows: float, tokens: float, ctx_work: float) -> float:
    ms = m.intercept_ms + m.per_row_ms * rows + m.per_token_ms * tokens
    return (ms + m.per_ctx_ktoken_ms * ctx_work / 1000.0) / 1000.0


class _Clock:
    """Step-time truth: the time model plus seeded multiplicative noise (mean 1)."""

    def __init__(self, model: TimeModel, sigma: float, seed: int) -> None:
        self.model = model
        self.sigma = sigma
        self._rng = np.random.default_rng([seed, 0xC10C])

    def _noise(self) -> float:
        if self.sigma <= 0:
            return 1.0
        return math.exp(self.sigma * float(self._rng.standard_normal()) - self.sigma**2 / 2)

    def draft(self, rows: float, ctx_work: float) -> float:
        return _secs(self.model.draft, rows, rows, ctx_work) * self._noise()

    def verify(self, rows: float, tokens: float, ctx_work: float) -> float:
        return _secs(self.model.verify, rows, tokens, ctx_work) * self._noise()

    def prefill(self, prompt: int, with_draft: bool) -> float:
        work = prompt * (prompt + 1) / 2.0
        t = _secs(self.model.verify, 1, prompt, work)
        if with_draft:
            t += _secs(self.model.draft, 1, prompt, work)
        return t * self._noise()


def simulate(
    trace: Trace,
    policy: SpecPolicy,
    limits: StepLimits,
    time_model: TimeModel,
    acceptance: AcceptanceModel,
    config: SimConfig | None = None,
) -> SimResult:
    """Replay `trace` through `policy`; returns per-request records and a per-step log."""
    cfg = config or SimConfig()
    wall0 = time.perf_counter()
    n = len(trace)
    arrival = trace.arrival_s
    prompt = trace.prompt_len
    out_len = trace.output_len
    K = max(0, limits.max_draft)
    # flat per-position acceptance store: request r owns [base[r], base[r] + out_len[r] + K + 2)
    span = out_len + K + 2
    base_of = np.concatenate(([0], np.cumsum(span)[:-1])).astype(np.int64)
    total = int(span.sum())
    on_conf = np.zeros(total)
    on_acc = np.zeros(total, dtype=np.bool_)
    off_conf = np.zeros(total)
    sampler = AcceptanceSampler(acceptance, cfg.seed)
    clock = _Clock(time_model, cfg.noise_sigma, cfg.seed)

    first_tok = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    steps = StepLog()
    # running batch as parallel arrays (admission order = batch order, like the engine)
    r_idx = np.zeros(0, dtype=np.int64)
    r_gen = np.zeros(0, dtype=np.int64)  # tokens emitted so far (first token included)
    waiting: deque[int] = deque()
    now = float(arrival[0]) if n else 0.0
    ai = 0
    done = 0
    request_steps = proposed_total = verified_total = accepted_total = 0
    policy_wall = 0.0
    pc = time.perf_counter

    while done < n:
        while ai < n and arrival[ai] <= now:
            waiting.append(ai)
            ai += 1
        # ---- admission: prefill FIFO up to max_batch (each prefill advances the clock)
        admitted: list[int] = []
        while r_idx.shape[0] + len(admitted) < cfg.max_batch and waiting:
            r = waiting.popleft()
            lo = int(base_of[r])
            c_on, a_on, c_off = sampler.draw(r, int(span[r]))
            on_conf[lo : lo + span[r]], on_acc[lo : lo + span[r]] = c_on, a_on
            off_conf[lo : lo + span[r]] = c_off
            now += clock.prefill(int(prompt[r]), cfg.prefill_draft)
            first_tok[r] = now
            if out_len[r] <= 1:
                finish[r] = now
                done += 1
            else:
                admitted.append(r)
            while ai < n and arrival[ai] <= now:
                waiting.append(ai)
                ai += 1
        if admitted:
            r_idx = np.concatenate((r_idx, np.asarray(admitted, dtype=np.int64)))
            r_gen = np.concatenate((r_gen, np.ones(len(admitted), dtype=np.int64)))
        b = int(r_idx.shape[0])
        if b == 0:
            if ai < n:
                now = max(now, float(arrival[ai]))
            continue

        # ---- one decoding step
        L = prompt[r_idx] + r_gen - 1  # target KV: the last emitted token is fed next step
        ctx = StepContext(context_lens=L.copy(), max_draft=K, budget_s=limits.budget_s)
        conf = np.zeros((b, K))
        lens = np.zeros(b, dtype=np.int64)
        onpath = np.ones(b, dtype=np.bool_)
        first_rej = np.full(b, K + 1, dtype=np.int64)
        pos0 = base_of[r_idx] + r_gen  # flat index of the next output token
        t0 = pc()
        drafting = policy.start(ctx) if K > 0 else np.zeros(b, dtype=np.bool_)
        policy_s = pc() - t0
        draft_s = 0.0
        for j in range(K):
            if not drafting.any():
                break
            rows = np.nonzero(drafting)[0]
            p = pos0[rows] + j
            ok_path = onpath[rows]
            conf[rows, j] = np.where(ok_path, on_conf[p], off_conf[p])
            rej = ok_path & ~on_acc[p]
            first_rej[rows[rej]] = j
            onpath[rows[rej]] = False
            lens[rows] += 1
            draft_s += clock.draft(float(rows.shape[0]), float((L[rows] + j).sum()))
            t0 = pc()
            drafting = drafting & policy.keep_drafting(ctx, conf, lens, drafting)
            policy_s += pc() - t0
        t0 = pc()
        decision = policy.verify_lengths(ctx, conf, lens)
        policy_s += pc() - t0
        s = np.minimum(np.maximum(decision.lens.astype(np.int64), 0), lens)
        accepted = np.minimum(s, first_rej)
        sf = s.astype(np.float64)
        verify_s = clock.verify(
            float(b), float(sf.sum() + b), float(((sf + 1.0) * L + sf * (sf + 1.0) / 2.0).sum())
        )
        t0 = pc()
        policy.observe(
            StepOutcome(
                conf=conf,
                verified_lens=s,
                accepted=accepted,
                context_lens=L,
                drafted_lens=lens,
                draft_time_s=draft_s,
                verify_time_s=verify_s,
            )
        )
        policy_s += pc() - t0
        policy_wall += policy_s
        step_s = draft_s + verify_s + (policy_s if cfg.charge_policy_time else 0.0)
        start = now
        now += step_s
        remaining = out_len[r_idx] - r_gen
        emitted = np.minimum(accepted + 1, remaining)
        r_gen = r_gen + emitted
        steps.start_s.append(start)
        steps.duration_s.append(step_s)
        steps.batch.append(b)
        steps.proposed.append(int(lens.sum()))
        steps.verified.append(int(s.sum()))
        steps.accepted.append(int(accepted.sum()))
        steps.emitted.append(int(emitted.sum()))
        if cfg.record_spec_lens:
            steps.spec_lens.append(s.tolist())
        request_steps += b
        proposed_total += int(lens.sum())
        verified_total += int(s.sum())
        accepted_total += int(accepted.sum())
        fin = r_gen >= out_len[r_idx]
        if fin.any():
            finish[r_idx[fin]] = now
            done += int(fin.sum())
            r_idx, r_gen = r_idx[~fin], r_gen[~fin]

    records = [
        RequestRecord(
            index=i,
            arrival_s=float(arrival[i]),
            first_token_s=float(first_tok[i]),
            finish_s=float(finish[i]),
            prompt_len=int(prompt[i]),
            output_len=int(out_len[i]),
        )
        for i in range(n)
    ]
    return SimResult(
        policy=str(getattr(policy, "name", type(policy).__name__)),
        requests=records,
        steps=steps,
        request_steps=request_steps,
        proposed=proposed_total,
        verified=verified_total,
        accepted=accepted_total,
        policy_wall_s=policy_wall,
        sim_wall_s=time.perf_counter() - wall0,
    )


# ----------------------------------------------------------------------------- convenience

POLICY_KINDS = ("off", "fixed-1", "fixed-3", "fixed-5", "smartspec", "threshold", "adaptive")


def policy_for(kind: str, profile: Profile | None, doc: Policy) -> tuple[SpecPolicy, StepLimits]:
    """A fresh policy and its limits exactly as the engine builds them (adaspec.policy.factory).

    `kind` is a factory kind ("adaptive", "off", "smartspec", "threshold", "fixed") or
    "fixed-K" for a static K that overrides the document's fixedDraftTokens.
    """
    if kind.startswith("fixed-"):
        try:
            k = int(kind.removeprefix("fixed-"))
        except ValueError:
            raise ValueError(f"policy {kind!r}: K after 'fixed-' must be an integer") from None
        doc = doc.model_copy(update={"fixed_draft_tokens": k})
        return make_policy("fixed", profile, fixed_k=k), limits_for(doc, "fixed")
    return make_policy(kind, profile, fixed_k=doc.fixed_draft_tokens), limits_for(doc, kind)


def run_policy(
    kind: str,
    trace: Trace,
    profile: Profile,
    doc: Policy,
    acceptance: AcceptanceModel | None = None,
    config: SimConfig | None = None,
    policy_profile: Profile | None = None,
) -> SimResult:
    """Simulate `trace` under policy `kind`; `profile` is the truth, `policy_profile` (default:
    the same) is what the policy believes."""
    pol, lim = policy_for(kind, policy_profile or profile, doc)
    acc = acceptance or AcceptanceModel.from_calibration(profile.calibration)
    return simulate(trace, pol, lim, profile.time_model, acc, config)
