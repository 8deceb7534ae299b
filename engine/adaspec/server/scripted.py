"""A deterministic CPU twin of a model backend, for server/engine tests and smoke runs.

It implements the Backend protocol without weights: every sequence emits the bytes of a fixed
reply (ByteCodec ids), drafts with a repeating confidence pattern, and accepts a draft token iff
its confidence is ≥ `accept_threshold`. It drives the real SpecPolicy exactly like the torch
backend does (start → keep_drafting → verify_lengths → observe), so policy metrics are real.
Timing is simulated by sleeping `draft_pass_s` per draft pass and `verify_s` per verification.
Fault injection: set `fail_next_step` / `fail_next_add` to an exception instance.
Its StepStats leave the per-pass step-log fields (context_lens, draft_rows, draft_ctx,
draft_pass_s, policy_s) at their empty defaults: its timings are simulated, not measured.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from adaspec.backends.base import SeqState, StepResult, StepStats
from adaspec.policy.base import SpecPolicy, StepContext, StepOutcome, VerifyDecision
from adaspec.server.codec import ByteCodec

DEFAULT_REPLY = "Hello from the scripted backend. "


class ScriptedBackend:
    def __init__(
        self,
        reply: str = DEFAULT_REPLY,
        *,
        eos_at_end: bool = False,
        max_batch: int = 4,
        max_model_len: int = 512,
        draft_pass_s: float = 0.0,
        verify_s: float = 0.0,
        confidences: tuple[float, ...] = (0.95, 0.9, 0.85, 0.6, 0.3),
        accept_threshold: float = 0.7,
    ) -> None:
        self.codec = ByteCodec()
        self.script = self.codec.encode(reply) + ([ByteCodec.EOS] if eos_at_end else [])
        if not self.script:
            raise ValueError("reply must not be empty")
        self.eos_token_ids: frozenset[int] = frozenset({ByteCodec.EOS})
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.draft_pass_s = draft_pass_s
        self.verify_s = verify_s
        self.confidences = confidences
        self.accept_threshold = accept_threshold
        self.positions: dict[str, int] = {}
        """seq_id -> tokens emitted so far (its 'slot'); empty when everything was freed."""
        self.prompt_lens: dict[str, int] = {}
        self.fail_next_step: BaseException | None = None
        self.fail_next_add: BaseException | None = None
        self.steps = 0
        self.batch_sizes: list[int] = []
        self.step_started = threading.Event()
        """Set at the start of every step (tests wait on it to act mid-generation)."""

    def _tok(self, pos: int) -> int:
        return self.script[pos % len(self.script)]

    def add(self, seq: SeqState) -> int:
        if self.fail_next_add is not None:
            err, self.fail_next_add = self.fail_next_add, None
            raise err
        if seq.seq_id in self.positions:
            raise ValueError(f"seq_id {seq.seq_id!r} is already running")
        if len(self.positions) >= self.max_batch:
            raise RuntimeError(f"batch is full (max_batch={self.max_batch})")
        if len(seq.prompt_ids) + 1 > self.max_model_len:
            raise ValueError("prompt_ids: no room to generate")
        self.positions[seq.seq_id] = 1
        self.prompt_lens[seq.seq_id] = len(seq.prompt_ids)
        return self._tok(0)

    def remove(self, seq_id: str) -> None:
        self.positions.pop(seq_id, None)
        self.prompt_lens.pop(seq_id, None)

    def step(
        self, seqs: list[SeqState], policy: SpecPolicy, max_draft: int, budget_s: float | None
    ) -> StepResult:
        self.step_started.set()
        if self.fail_next_step is not None:
            err, self.fail_next_step = self.fail_next_step, None
            raise err
        ids = [s.seq_id for s in seqs]
        missing = [i for i in ids if i not in self.positions]
        if missing:
            raise KeyError(f"seq_id {missing[0]!r} is not running (add it first)")
        B = len(ids)
        pos = np.array([self.positions[i] for i in ids], dtype=np.int64)
        ctx_lens = np.array([self.prompt_lens[i] for i in ids], dtype=np.int64) + pos - 1
        K = max(0, int(max_draft))
        ctx = StepContext(context_lens=ctx_lens, max_draft=K, budget_s=budget_s)
        pattern = np.array(self.confidences, dtype=np.float64)
        full_conf = pattern[(pos[:, None] + np.arange(K)[None, :]) % len(pattern)]
        conf = np.zeros((B, K), dtype=np.float64)
        lens = np.zeros(B, dtype=np.int64)
        room = self.max_model_len - (ctx_lens + 1)
        passes = 0
        drafting = np.zeros(B, dtype=np.bool_)
        if K > 0:
            drafting = np.asarray(policy.start(ctx), dtype=np.bool_) & (room > 0)
        for j in range(K):
            if not drafting.any():
                break
            conf[drafting, j] = full_conf[drafting, j]
            lens[drafting] += 1
            passes += 1
            if j + 1 < K:
                keep = np.asarray(policy.keep_drafting(ctx, conf, lens, drafting), dtype=np.bool_)
                drafting = drafting & keep & (lens < room)
        decision: VerifyDecision | None = None
        verify = np.zeros(B, dtype=np.int64)
        if K > 0:
            # Also when nothing was drafted: the policy then reports guard refusals and
            # infeasibility of the plain step through its decision.
            decision = policy.verify_lengths(ctx, conf, lens)
            verify = np.clip(np.asarray(decision.lens, dtype=np.int64), 0, lens)
        draft_time = passes * self.draft_pass_s
        if self.draft_pass_s or self.verify_s:
            time.sleep(draft_time + self.verify_s)
        accepted = np.zeros(B, dtype=np.int64)
        new_tokens: dict[str, list[int]] = {}
        for i, sid in enumerate(ids):
            n = 0
            while n < verify[i] and conf[i, n] >= self.accept_threshold:
                n += 1
            accepted[i] = n
            p = int(pos[i])
            new_tokens[sid] = [self._tok(p + t) for t in range(n + 1)]
            self.positions[sid] = p + n + 1
        policy.observe(
            StepOutcome(
                conf=conf,
                verified_lens=verify,
                accepted=accepted,
                context_lens=ctx_lens,
                drafted_lens=lens.copy(),
                draft_time_s=draft_time,
                verify_time_s=self.verify_s,
            )
        )
        self.steps += 1
        self.batch_sizes.append(B)
        stats = StepStats(
            batch=B,
            draft_passes=passes,
            draft_time_s=draft_time,
            verify_time_s=self.verify_s,
            proposed=int(lens.sum()),
            verified=int(verify.sum()),
            accepted=int(accepted.sum()),
            decision=decision,
            spec_lens=[int(v) for v in verify],
        )
        return StepResult(new_tokens, stats)
