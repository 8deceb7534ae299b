"""Discrete-event simulator of the engine loop, driving the real SpecPolicy code.

It mirrors adaspec.engine: each loop iteration admits waiting requests FIFO up to `max_batch`,
then runs one decoding step for the running batch exactly as adaspec.policy.base describes
(start → draft passes with keep_drafting → verify_lengths → observe). Arrivals during a step
wait for the next iteration. When nothing runs, the clock jumps to the next arrival.

Prompts are prefilled one of two ways (`SimConfig.prefill_chunk_tokens`):
- chunked (default, what the engine does): an admitted request is *prefilling*; each step the
  shared planner (adaspec.policy.prefill.plan_prefill) sizes its prompt chunk so the step still
  fits the Policy's TPOT budget when the batch decodes plainly, the chunks ride along with the
  step's verification forward (they add the prefill model's cost without its intercept; a step
  that drafts nothing also runs the draft over them, one draft forward's fixed cost; a step with
  no decoding rows is a prefill pass of its own), and the policy sees their predicted cost in
  `StepContext.prefill_extra_s`. The first token comes at the end of the step that feeds the
  prompt's last chunk; the request decodes from the next step on. The planner predicts with
  the policy's profile and no online correction, as the engine does.
- whole-prompt (0, the baseline): each admission runs a batch-1 target pass over its prompt plus
  a draft pass over it between two steps, stalling the batch; the prefill emits the first token.

Times come from the Profile's TimeModel (the "truth"; prompts use `TimeModel.prefill` when the
profile has it, else the verification model plus the draft model, as before it existed). The
policy and the chunk planner get their own StepTimePredictor built from a profile, which may
differ from the truth to test robustness. Each pass is optionally multiplied by log-normal
noise. Engine time the profile does not see (`SimConfig.overhead`, an EngineOverhead fitted
from real step logs by adaspec.sim.step_log) is added without noise to each draft pass,
verification and step, and between steps (after the step's tokens are out, before the next step
admits). Confidences and acceptance come from an AcceptanceSource (adaspec.sim.acceptance): the
statistical AcceptanceModel, or the measured texts of a real run
(adaspec.sim.measured_text.MeasuredAcceptance), drawn per request by its index in the whole
trace (`SimConfig.request_offset` + the index within the simulated window); a source that knows
off-path confidences by where the step's first rejection was (RejectionKeyedDraws) is asked
for those first. All randomness is seeded: same inputs, same result.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from adaspec.contract import Policy, Profile, TimeModel
from adaspec.policy.base import SpecPolicy, StepContext, StepOutcome
from adaspec.policy.factory import StepLimits, limits_for, make_policy
from adaspec.policy.prefill import (
    DEFAULT_MAX_CHUNK,
    DEFAULT_MIN_CHUNK,
    chunk_ctx_work,
    plain_step_s,
    plan_prefill,
)
from adaspec.policy.time_model import StepTimePredictor
from adaspec.sim.acceptance import AcceptanceModel, AcceptanceSource, RejectionKeyedDraws
from adaspec.sim.overhead import EngineOverhead
from adaspec.sim.pricing import (
    chunk_extra_s,
    draft_fixed_s,
    draft_pass_s,
    prompt_s,
    verify_pass_s,
    verify_work,
)
from adaspec.sim.results import RequestRecord, StepLog, Summary, summarize
from adaspec.sim.traces import Trace


@runtime_checkable
class ClairvoyantPolicy(Protocol):
    """A simulator-only policy that is told the future: before each step's `start`, the
    simulator calls `reveal(run_lens)` with, per running request, how many of its next draft
    tokens the target would accept (capped at max_draft). No real engine can do this; it gives
    an upper reference for what any drafting policy could reach on the same trace."""

    def reveal(self, accept_run_lens: NDArray[np.int64]) -> None: ...


class SimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_batch: int = Field(default=8, ge=1)
    noise_sigma: float = Field(default=0.0, ge=0.0, description="log-normal sd per pass")
    prefill_draft: bool = Field(default=True, description="prefill also runs the draft model")
    record_spec_lens: bool = False
    charge_policy_time: bool = Field(
        default=False, description="add the policy's measured wall time to each step (not seeded)"
    )
    prefill_chunk_tokens: int = Field(
        default=DEFAULT_MAX_CHUNK,
        ge=0,
        description="prompt tokens per step across prefilling requests (chunked prefill); "
        "0: each admission prefills its whole prompt in a pass of its own, stalling the batch",
    )
    prefill_min_chunk: int = Field(
        default=DEFAULT_MIN_CHUNK,
        ge=1,
        description="prompt tokens the oldest prefilling request gets per step even when the "
        "budget leaves no room",
    )
    overhead: EngineOverhead | None = Field(
        default=None,
        description="engine time the profile misses (adaspec.sim.step_log.fit_overhead), added "
        "without noise to every draft pass, verification and step and between steps; None adds "
        "nothing",
    )
    request_offset: int = Field(
        default=0,
        ge=0,
        description="index in the whole trace of the simulated trace's first request: a window "
        "of a longer trace draws each request's text by its global index (the measured texts "
        "are the whole trace's)",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check_chunks(self) -> SimConfig:
        if self.prefill_chunk_tokens and self.prefill_min_chunk > self.prefill_chunk_tokens:
            raise ValueError(
                f"prefill_min_chunk ({self.prefill_min_chunk}) must not exceed "
                f"prefill_chunk_tokens ({self.prefill_chunk_tokens})"
            )
        return self

    @property
    def chunked(self) -> bool:
        return self.prefill_chunk_tokens > 0


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


class _Clock:
    """Step-time truth: the time model plus seeded multiplicative noise (mean 1)."""

    def __init__(self, model: TimeModel, sigma: float, seed: int, prefill_draft: bool) -> None:
        self.model = model
        self.sigma = sigma
        self.prefill_draft = prefill_draft
        self._rng = np.random.default_rng([seed, 0xC10C])

    def _noise(self) -> float:
        if self.sigma <= 0:
            return 1.0
        return math.exp(self.sigma * float(self._rng.standard_normal()) - self.sigma**2 / 2)

    def draft(self, rows: float, ctx_work: float) -> float:
        return draft_pass_s(self.model, rows, ctx_work) * self._noise()

    def verify(self, rows: float, tokens: float, ctx_work: float, extra_s: float = 0.0) -> float:
        """A verification forward; `extra_s`: noiseless cost of prompt chunks riding along
        (one forward, so one noise draw for both)."""
        return (verify_pass_s(self.model, rows, tokens, ctx_work) + extra_s) * self._noise()

    def _prompt(self, rows: float, tokens: float, ctx_work: float, intercept: bool) -> float:
        return prompt_s(self.model, rows, tokens, ctx_work, intercept, self.prefill_draft)

    def prefill(self, prompt: int) -> float:
        """A whole prompt in a pass of its own (unchunked admission)."""
        return self._prompt(1, prompt, prompt * (prompt + 1) / 2.0, True) * self._noise()

    def prefill_pass(self, rows: float, tokens: float, ctx_work: float) -> float:
        """Prompt chunks in a pass of their own (a step with no decoding rows)."""
        return self._prompt(rows, tokens, ctx_work, True) * self._noise()

    def draft_fixed(self) -> float:
        """A draft forward's fixed cost: a step with prompt chunks that drafts nothing still
        runs the draft over the chunks (adaspec.backends.torch.backend)."""
        return draft_fixed_s(self.model) * self._noise()

    def chunk_extra(self, rows: float, tokens: float, ctx_work: float) -> float:
        """What chunks add to a verification forward: the prompt cost without its intercept
        (noiseless; the forward's noise applies)."""
        return chunk_extra_s(self.model, rows, tokens, ctx_work, self.prefill_draft)


def simulate(
    trace: Trace,
    policy: SpecPolicy,
    limits: StepLimits,
    time_model: TimeModel,
    acceptance: AcceptanceSource,
    config: SimConfig | None = None,
    *,
    planner_times: StepTimePredictor | None = None,
    prefill_budget_s: float | None = None,
) -> SimResult:
    """Replay `trace` through `policy`; returns per-request records and a per-step log.

    Chunked prefill: `planner_times` is what the engine's chunk planner believes (default: the
    truth `time_model`); `prefill_budget_s` the TPOT budget it sizes chunks against, the Policy
    document's whatever the policy kind (None: chunks of `prefill_chunk_tokens`).
    """
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
    sampler = acceptance.sampler(cfg.seed)
    offset = cfg.request_offset
    # off-path confidence by (first rejection q, depth) where the source knows it (measured
    # texts): flat row of q, column depth − 1; NaN: use the position-keyed off_conf
    keyed = sampler if isinstance(sampler, RejectionKeyedDraws) and K > 1 else None
    off_after = np.full((total, K - 1), np.nan) if keyed is not None else None
    clock = _Clock(time_model, cfg.noise_sigma, cfg.seed, cfg.prefill_draft)
    planner = planner_times or StepTimePredictor(time_model)
    oh = cfg.overhead

    first_tok = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    steps = StepLog()
    # running batch as parallel arrays (admission order = batch order, like the engine)
    r_idx = np.zeros(0, dtype=np.int64)
    r_gen = np.zeros(0, dtype=np.int64)  # tokens emitted so far (first token included)
    # chunked prefill: requests still feeding their prompt (FIFO) and tokens fed so far
    pf_idx: list[int] = []
    pf_done: list[int] = []
    waiting: deque[int] = deque()
    now = float(arrival[0]) if n else 0.0
    ai = 0
    done = 0
    request_steps = proposed_total = verified_total = accepted_total = 0
    policy_wall = 0.0
    pc = time.perf_counter
    reveal = policy.reveal if isinstance(policy, ClairvoyantPolicy) else None

    def draw(r: int) -> None:
        lo = int(base_of[r])
        c_on, a_on, c_off = sampler.draw(offset + r, int(span[r]))
        on_conf[lo : lo + span[r]], on_acc[lo : lo + span[r]] = c_on, a_on
        off_conf[lo : lo + span[r]] = c_off
        if keyed is not None and off_after is not None:
            off_after[lo : lo + span[r]] = keyed.offpath_after(offset + r, int(span[r]), K - 1)

    while done < n:
        while ai < n and arrival[ai] <= now:
            waiting.append(ai)
            ai += 1
        admitted: list[int] = []
        if cfg.chunked:
            # ---- admission: prefilling requests hold batch slots (their KV cache fills up)
            while r_idx.shape[0] + len(pf_idx) < cfg.max_batch and waiting:
                r = waiting.popleft()
                draw(r)
                pf_idx.append(r)
                pf_done.append(0)
        else:
            # ---- admission: prefill FIFO up to max_batch (each prefill advances the clock)
            while r_idx.shape[0] + len(admitted) < cfg.max_batch and waiting:
                r = waiting.popleft()
                draw(r)
                now += clock.prefill(int(prompt[r]))
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
        if b == 0 and not pf_idx:
            if ai < n:
                now = max(now, float(arrival[ai]))
            continue

        L = prompt[r_idx] + r_gen - 1  # target KV: the last emitted token is fed next step
        # ---- this step's prompt chunks
        chunks: tuple[int, ...] = ()
        extra_pred = chunk_rows = chunk_tokens = chunk_work = 0.0
        backlog = 0
        if pf_idx:
            # as the engine plans: a plain step, plus a draft forward over the chunks
            plain_s = plain_step_s(planner, b, float(L.sum()) if b else 0.0, cfg.prefill_draft)
            plan = plan_prefill(
                planner,
                [int(prompt[r]) - d for r, d in zip(pf_idx, pf_done, strict=True)],
                pf_done,
                decode_rows=b,
                plain_step_s=plain_s,
                budget_s=prefill_budget_s,
                max_chunk=cfg.prefill_chunk_tokens,
                min_chunk=cfg.prefill_min_chunk,
            )
            chunks, extra_pred = plan.chunks, plan.extra_s
            backlog = sum(int(prompt[r]) - d for r, d in zip(pf_idx, pf_done, strict=True))
            backlog -= sum(chunks)
            for d, c in zip(pf_done, chunks, strict=True):
                if c > 0:
                    chunk_rows += 1
                    chunk_tokens += c
                    chunk_work += chunk_ctx_work(d, c)

        start = now
        if b == 0:
            # ---- nothing decodes: the chunks are a prefill pass of their own
            step_s = clock.prefill_pass(chunk_rows, chunk_tokens, chunk_work) if chunks else 0.0
            if oh is not None and chunks:
                step_s += oh.in_step_s(0.0)
            lens = s = accepted = emitted = np.zeros(0, dtype=np.int64)
        else:
            # ---- one decoding step (prompt chunks ride along with its verification)
            ctx = StepContext(
                context_lens=L.copy(),
                max_draft=K,
                budget_s=limits.budget_s,
                prefill_extra_s=extra_pred,
                prefill_backlog_tokens=backlog,
                requests_waiting=len(waiting),
            )
            conf = np.zeros((b, K))
            lens = np.zeros(b, dtype=np.int64)
            onpath = np.ones(b, dtype=np.bool_)
            first_rej = np.full(b, K + 1, dtype=np.int64)
            pos0 = base_of[r_idx] + r_gen  # flat index of the next output token
            if reveal is not None and K > 0:
                # sim-only clairvoyance (adaspec.sim.oracle): each row's run of on-path
                # acceptances from its next output position, capped at K and at what it has left
                ahead = on_acc[pos0[:, None] + np.arange(K)]
                run = np.cumprod(ahead, axis=1).sum(axis=1).astype(np.int64)
                # drafts past a request's last token are never emitted
                reveal(np.minimum(run, out_len[r_idx] - r_gen - 1))
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
                if off_after is not None and not ok_path.all():
                    off_rows = rows[~ok_path]
                    at = first_rej[off_rows]  # the step's rejection, within the step
                    v = off_after[pos0[off_rows] + at, j - at - 1]
                    known = ~np.isnan(v)
                    conf[off_rows[known], j] = v[known]
                rej = ok_path & ~on_acc[p]
                first_rej[rows[rej]] = j
                onpath[rows[rej]] = False
                lens[rows] += 1
                n_rows = float(rows.shape[0])
                draft_s += clock.draft(n_rows, float((L[rows] + j).sum()))
                if oh is not None:
                    draft_s += oh.draft_pass_s(n_rows)
                t0 = pc()
                drafting = drafting & policy.keep_drafting(ctx, conf, lens, drafting)
                policy_s += pc() - t0
            t0 = pc()
            decision = policy.verify_lengths(ctx, conf, lens)
            policy_s += pc() - t0
            s = np.minimum(np.maximum(decision.lens.astype(np.int64), 0), lens)
            accepted = np.minimum(s, first_rej)
            v_tokens, v_work = verify_work(s, L)
            verify_s = clock.verify(
                float(b), v_tokens, v_work, clock.chunk_extra(chunk_rows, chunk_tokens, chunk_work)
            )
            if chunk_tokens and cfg.prefill_draft and not lens.any():
                # no draft pass carried the draft's copy of the chunks: a forward of its own
                verify_s += clock.draft_fixed()
            if oh is not None:
                verify_s += oh.verify_s(float(b), v_tokens)
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
                    prefill_extra_s=extra_pred,
                )
            )
            policy_s += pc() - t0
            policy_wall += policy_s
            step_s = draft_s + verify_s + (policy_s if cfg.charge_policy_time else 0.0)
            if oh is not None:
                step_s += oh.in_step_s(float(b))
            remaining = out_len[r_idx] - r_gen
            emitted = np.minimum(accepted + 1, remaining)
            r_gen = r_gen + emitted
        now += step_s
        steps.start_s.append(start)
        steps.duration_s.append(step_s)
        steps.batch.append(b)
        steps.proposed.append(int(lens.sum()))
        steps.verified.append(int(s.sum()))
        steps.accepted.append(int(accepted.sum()))
        steps.emitted.append(int(emitted.sum()))
        steps.prefill_tokens.append(int(chunk_tokens))
        if cfg.record_spec_lens:
            steps.spec_lens.append(s.tolist())
        request_steps += b
        proposed_total += int(lens.sum())
        verified_total += int(s.sum())
        accepted_total += int(accepted.sum())
        if b:
            fin = r_gen >= out_len[r_idx]
            if fin.any():
                finish[r_idx[fin]] = now
                done += int(fin.sum())
                r_idx, r_gen = r_idx[~fin], r_gen[~fin]
        firsts = 0
        if pf_idx:
            # ---- prompts whose last chunk was fed: first token now, decoding from next step
            joined: list[int] = []
            still: list[int] = []
            still_done: list[int] = []
            for r, d, c in zip(pf_idx, pf_done, chunks, strict=True):
                if d + c < prompt[r]:
                    still.append(r)
                    still_done.append(d + c)
                    continue
                first_tok[r] = now
                firsts += 1
                if out_len[r] <= 1:
                    finish[r] = now
                    done += 1
                else:
                    joined.append(r)
            pf_idx, pf_done = still, still_done
            if joined:
                r_idx = np.concatenate((r_idx, np.asarray(joined, dtype=np.int64)))
                r_gen = np.concatenate((r_gen, np.ones(len(joined), dtype=np.int64)))
        if oh is not None:
            # ---- the engine's work between steps: delivering this step's tokens (first tokens
            # included), admitting, planning; the next step starts after it
            now += oh.gap_s(float(b), float(int(emitted.sum()) + firsts))

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
    acceptance: AcceptanceSource | None = None,
    config: SimConfig | None = None,
    policy_profile: Profile | None = None,
) -> SimResult:
    """Simulate `trace` under policy `kind`; `profile` is the truth, `policy_profile` (default:
    the same) is what the policy and the chunk planner believe; `acceptance` (default: the
    profile's calibration) where the drafts come from. Chunks are sized against the
    document's `tpotBudgetMs` for every kind (the engine plans prefill the same way whatever
    the policy), so policies are compared on equal prefill."""
    pol, lim = policy_for(kind, policy_profile or profile, doc)
    return run_with_policy(pol, lim, trace, profile, doc, acceptance, config, policy_profile)


def run_with_policy(
    policy: SpecPolicy,
    limits: StepLimits,
    trace: Trace,
    profile: Profile,
    doc: Policy,
    acceptance: AcceptanceSource | None = None,
    config: SimConfig | None = None,
    policy_profile: Profile | None = None,
) -> SimResult:
    """`run_policy` for a policy instance built elsewhere (e.g. adaspec.sim.oracle): the same
    truth, chunk planner, TPOT budget for chunks and default acceptance."""
    believed = policy_profile or profile
    acc = (
        acceptance
        if acceptance is not None
        else AcceptanceModel.from_calibration(profile.calibration)
    )
    return simulate(
        trace,
        policy,
        limits,
        profile.time_model,
        acc,
        config,
        planner_times=StepTimePredictor(believed.time_model),
        prefill_budget_s=doc.tpot_budget_ms / 1000.0,
    )
