"""The AdaSpec step loop on CPU (or any torch device) with transformers models.

Per running request the backend keeps one target slot and one draft slot (see kv.py) and:
- `pending`: the last emitted token. It is not yet in the target cache; every step starts by
  feeding it (plain decoding feeds only it; verification feeds it plus the drafts).
- `draft_lag`: emitted tokens not yet in the draft cache (always ends with `pending`). It is
  usually one token; two when every draft token was accepted (the draft never saw its own last
  token), more when the request did not draft for a few steps. The first draft pass of a step
  feeds all of it, so the draft catches up lazily and only when it is used.

Invariant between steps: target length + 1 == draft length + len(draft_lag) == committed tokens.

Chunked prefill (`begin_prefill` + `step(prefill=...)`): a registered request is *prefilling*
until its whole prompt is in both caches; it is not in the policy's batch. Its invariant between
steps: target length == draft length == prompt tokens fed so far (`_Prefill.done`). A chunk goes
into the target in the step's one ragged verification forward (extra rows after the decoding
rows) and into the draft in the same step: as extra rows of draft pass 0 when the step drafts,
else in one draft forward over the chunks only. On its last chunk the first token is chosen from
the last prompt position exactly as `add` does, and the request becomes a decoding row with
pending = draft_lag = [first]. A failing forward fails the whole step (decoding and prefilling
rows share it); bad input is refused by `begin_prefill`, for that request only.

Draft confidence recorded for the policy: greedy requests use the draft's top-1 probability
(softmax at temperature 1, the quantity the profiler calibrates); sampled requests use the
probability the transformed draft distribution q gave the token it sampled.
`confidence_override` (synthetic-confidence studies) replaces what is recorded.

Per-request draft cap (`SamplingParams.max_draft`): a row drafts while the policy wants it to and
it is under min(Policy K, its cap, room left in max_model_len); a row with cap 0 never drafts and
so never verifies. The policy is only told what rows really did (`drafting`, `lens`).

Step log detail (StepStats.draft_rows / draft_ctx / draft_pass_s / policy_s): each draft pass is
timed from its forward to its bookkeeping, policy calls apart, so the engine's step log can set
the real cost of a pass against the profiler's forward timings. Pass 0 also carries the prompt
chunks' draft rows when the step drafts; without drafting that draft forward is in verify time.

Host traffic: logits stay on the model's device. Greedy rows reduce there to (token, top-1
probability) per draft pass and to argmax ids per verified position; sampled rows keep their
q/p distributions there and move only the scalars the accept/reject decision reads.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from adaspec.backends.base import (
    PrefillChunks,
    SamplingParams,
    SeqState,
    StepResult,
    StepStats,
)
from adaspec.backends.torch.runner import ModelRunner
from adaspec.backends.torch.sampling import (
    accept_greedy,
    check_params,
    is_greedy,
    make_generator,
    probs_from_logits,
    sample,
    verify_sampled,
)
from adaspec.policy.base import SpecPolicy, StepContext, StepOutcome, VerifyDecision

AcceptanceOverride = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(conf (B, K), verified lens (B,)) → accepted counts (B,). Synthetic-acceptance mode: the
first `accepted[i]` draft tokens are emitted as if the target had accepted them, followed by the
target's token at that position. For timing studies with random weights only: not lossless."""

ConfidenceOverride = Callable[[list[str], int, np.ndarray], np.ndarray]
"""(seq ids of the rows that drafted in this pass, draft position j, their real confidences
(n,)) → the confidences to record for them (n,), which the policy then sees. The drafted tokens
are unchanged. Synthetic-confidence mode, for timing studies with random weights."""


@dataclass
class _Row:
    seq_id: str
    t_slot: int
    d_slot: int | None
    params: SamplingParams
    gen: torch.Generator | None
    pending: int
    draft_lag: list[int] = field(default_factory=list)


@dataclass
class _Prefill:
    """A registered request whose prompt is still being fed in chunks."""

    seq_id: str
    t_slot: int
    d_slot: int | None
    params: SamplingParams
    gen: torch.Generator | None
    tokens: list[int]
    """Everything to prefill: prompt + output so far (as `add` prefills)."""
    done: int = 0
    """Tokens already in both caches."""


def _draft_caps(rows: list[_Row], k: int) -> np.ndarray:
    """Per-row draft tokens allowed this step: the Policy's K, lowered by a request's own cap."""
    caps = [k if r.params.max_draft is None else min(k, r.params.max_draft) for r in rows]
    return np.asarray(caps, dtype=np.int64).reshape(len(rows))


def _argmax_rows(logits: list[torch.Tensor]) -> list[list[int]]:
    """Argmax ids of each [q_i, V] tensor, reduced in one pass on their device."""
    if not logits:
        return []
    ids = torch.cat(logits).argmax(dim=-1).tolist()
    out: list[list[int]] = []
    at = 0
    for lg in logits:
        out.append(ids[at : at + lg.shape[0]])
        at += lg.shape[0]
    return out


def _eos_ids(model: Any) -> frozenset[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        val = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(val, int):
            ids.add(val)
        elif isinstance(val, list | tuple):
            ids.update(int(v) for v in val)
    return frozenset(ids)


class TorchBackend:
    """Backend protocol implementation: continuous batching, slot KV caches with rollback,
    batched drafting with per-request early stop, one ragged verification per step, and chunked
    prefill riding along with that verification (ChunkedPrefillBackend)."""

    chunked_prefill = True

    def __init__(
        self,
        target: Any,
        draft: Any | None,
        *,
        max_batch: int = 8,
        max_model_len: int = 2048,
        device: str = "cpu",
        dtype: torch.dtype | None = torch.bfloat16,
        acceptance_override: AcceptanceOverride | None = None,
        confidence_override: ConfidenceOverride | None = None,
        seed: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        self.target = ModelRunner(target, max_batch, max_model_len, device=device, dtype=dtype)
        self.draft: ModelRunner | None = None
        if draft is not None:
            self.draft = ModelRunner(draft, max_batch, max_model_len, device=device, dtype=dtype)
            if self.draft.vocab_size > self.target.vocab_size:
                raise ValueError(
                    f"draft vocabulary ({self.draft.vocab_size}) is larger than the target's "
                    f"({self.target.vocab_size}); they must share a tokenizer"
                )
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.has_draft = self.draft is not None
        self.eos_token_ids: frozenset[int] = _eos_ids(target)
        self.acceptance_override = acceptance_override
        self.confidence_override = confidence_override
        self._seeds = random.Random(seed)
        self._rows: dict[str, _Row] = {}
        self._prefilling: dict[str, _Prefill] = {}

    # ------------------------------------------------------------------ membership

    @property
    def running(self) -> int:
        """Requests holding slots: decoding and prefilling."""
        return len(self._rows) + len(self._prefilling)

    def add(self, seq: SeqState) -> int:
        """Prefill prompt (+ any output so far) into both caches; return the next token."""
        p = self._register(seq)
        try:
            logits = self.target.forward([p.t_slot], [p.tokens], last_n=1, on_device=True)[0]
            if self.draft is not None and p.d_slot is not None:
                self.draft.forward([p.d_slot], [p.tokens], last_n=0)
        except BaseException:
            self._free(p.t_slot, p.d_slot)
            raise
        return self._finish_prefill(p, logits)

    def begin_prefill(self, seq: SeqState) -> None:
        """Register `seq` (slots, input checks as `add`); its prompt is fed by later steps."""
        p = self._register(seq)
        self._prefilling[p.seq_id] = p

    def remove(self, seq_id: str) -> None:
        row = self._rows.pop(seq_id, None) or self._prefilling.pop(seq_id, None)
        if row is not None:
            self._free(row.t_slot, row.d_slot)

    def _register(self, seq: SeqState) -> _Prefill:
        """Check the request, allocate its slots and its sampling generator."""
        if seq.seq_id in self._rows or seq.seq_id in self._prefilling:
            raise ValueError(f"seq_id {seq.seq_id!r} is already running")
        check_params(seq.params, "params")
        tokens = [*seq.prompt_ids, *seq.output_ids]
        if not seq.prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if len(tokens) + 1 > self.max_model_len:
            raise ValueError(
                f"prompt_ids: {len(tokens)} tokens leave no room to generate "
                f"(max_model_len={self.max_model_len})"
            )
        vocab = self.target.vocab_size
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_ids: token id {bad[0]} outside the vocabulary [0, {vocab})")
        if self.running >= self.max_batch:
            raise RuntimeError(f"batch is full (max_batch={self.max_batch})")
        t_slot = self.target.alloc()
        d_slot = self.draft.alloc() if self.draft is not None else None
        # The generator is drawn at registration in both paths, so a fixed backend seed gives
        # the same per-request streams whether prompts are prefilled whole or in chunks.
        gen = None
        if not is_greedy(seq.params):
            gen = make_generator(seq.params, self._seeds.getrandbits(63))
        return _Prefill(seq.seq_id, t_slot, d_slot, seq.params, gen, tokens)

    def _finish_prefill(self, p: _Prefill, logits: torch.Tensor, first: int | None = None) -> int:
        """Choose the first token from the last prompt position (unless given: a greedy argmax
        taken with the step's others); `p` becomes a decoding row."""
        if first is None:
            first = self._choose(logits[-1:], p.params, p.gen)
        self._rows[p.seq_id] = _Row(p.seq_id, p.t_slot, p.d_slot, p.params, p.gen, first, [first])
        return first

    def _free(self, t_slot: int, d_slot: int | None) -> None:
        self.target.free(t_slot)
        if self.draft is not None and d_slot is not None:
            self.draft.free(d_slot)

    def _chunks(self, prefill: PrefillChunks | None) -> list[tuple[_Prefill, list[int]]]:
        """This step's (request, chunk tokens), in the order given; checks the plan."""
        out: list[tuple[_Prefill, list[int]]] = []
        for sid, n in prefill.tokens.items() if prefill is not None else ():
            p = self._prefilling.get(sid)
            if p is None:
                state = "decoding" if sid in self._rows else "not running"
                raise KeyError(f"prefill: seq_id {sid!r} is {state} (begin_prefill it first)")
            left = len(p.tokens) - p.done
            if not 1 <= int(n) <= left:
                raise ValueError(f"prefill: chunk of {n} tokens for {sid!r} outside [1, {left}]")
            out.append((p, p.tokens[p.done : p.done + int(n)]))
        return out

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def step(
        self,
        seqs: list[SeqState],
        policy: SpecPolicy,
        max_draft: int,
        budget_s: float | None,
        prefill: PrefillChunks | None = None,
    ) -> StepResult:
        rows = []
        for s in seqs:
            row = self._rows.get(s.seq_id)
            if row is None:
                if s.seq_id in self._prefilling:
                    raise KeyError(f"seq_id {s.seq_id!r} is still prefilling")
                raise KeyError(f"seq_id {s.seq_id!r} is not running (add it first)")
            rows.append(row)
        chunks = self._chunks(prefill)
        B = len(rows)
        if B == 0 and not chunks:
            return StepResult({}, StepStats(0, 0, 0.0, 0.0, 0, 0, 0, None, []))
        clock = time.perf_counter
        max_draft = max(0, int(max_draft)) if self.draft is not None and B > 0 else 0
        ctx_lens = np.array([self.target.length(r.t_slot) for r in rows], dtype=np.int64)
        room = self.max_model_len - (ctx_lens + 1)
        if (room < 0).any():
            i = int(np.argmax(room < 0))
            raise ValueError(f"seq {rows[i].seq_id!r} reached max_model_len={self.max_model_len}")
        extra_s = float(prefill.extra_s) if chunks and prefill is not None else 0.0
        ctx = StepContext(
            context_lens=ctx_lens,
            max_draft=max_draft,
            budget_s=budget_s,
            prefill_extra_s=extra_s,
            prefill_backlog_tokens=int(prefill.backlog_tokens) if prefill is not None else 0,
            requests_waiting=int(prefill.waiting_requests) if prefill is not None else 0,
        )
        K = max_draft
        conf = np.zeros((B, K), dtype=np.float64)
        lens = np.zeros(B, dtype=np.int64)
        drafts: list[list[int]] = [[] for _ in range(B)]
        q_probs: list[list[torch.Tensor]] = [[] for _ in range(B)]
        # Per-pass detail for the step log: rows, Σ context and wall time of each draft pass;
        # time spent inside the policy is kept apart (one clock pair per pass and policy call).
        draft_rows: list[int] = []
        draft_ctx: list[int] = []
        pass_s: list[float] = []
        policy_s = 0.0

        # Draft tokens each row may have this step: its own cap, then the cache room left.
        limit = np.minimum(_draft_caps(rows, K), room)
        t0 = clock()
        drafting = np.zeros(B, dtype=np.bool_)
        if K > 0:
            drafting = np.asarray(policy.start(ctx), dtype=np.bool_) & (limit > 0)
            policy_s += clock() - t0
        for j in range(K):
            if not drafting.any():
                break
            tp = clock()
            idx = np.flatnonzero(drafting)
            # The draft's copy of the prompt chunks rides along with pass 0.
            self._draft_pass(rows, idx, j, conf, drafts, q_probs, chunks if j == 0 else ())
            lens[drafting] += 1
            draft_rows.append(len(idx))
            draft_ctx.append(int(ctx_lens[idx].sum()) + j * len(idx))
            tq = clock()
            pass_s.append(tq - tp)
            if j + 1 < K:
                keep = np.asarray(policy.keep_drafting(ctx, conf, lens, drafting), dtype=np.bool_)
                policy_s += clock() - tq
                drafting = drafting & keep & (lens < limit)
        draft_time = clock() - t0

        decision: VerifyDecision | None = None
        verify = np.zeros(B, dtype=np.int64)
        if K > 0:  # also when nothing was drafted: the decision carries guard refusals and
            # infeasibility, which the metrics must see exactly when the guard refused to draft
            tp = clock()
            decision = policy.verify_lengths(ctx, conf, lens)
            policy_s += clock() - tp
            verify = np.clip(np.asarray(decision.lens, dtype=np.int64), 0, lens)

        t1 = clock()
        feeds = [[r.pending, *d[: int(v)]] for r, d, v in zip(rows, drafts, verify, strict=True)]
        # Only a prompt's last position needs logits: ask for as many trailing positions as
        # the longest verification row (chunk rows get that many too, a few wasted rows).
        last_n = max(len(f) for f in feeds) if feeds else 1
        logits = self.target.forward(
            [r.t_slot for r in rows] + [p.t_slot for p, _ in chunks],
            feeds + [c for _, c in chunks],
            last_n=last_n,
            on_device=True,
        )
        if chunks and not draft_rows and self.draft is not None:
            self.draft.forward(
                [int(p.d_slot) for p, _ in chunks if p.d_slot is not None],
                [c for p, c in chunks if p.d_slot is not None],
                last_n=0,
            )
        forced = None
        if self.acceptance_override is not None and verify.any():
            forced = np.clip(
                np.asarray(self.acceptance_override(conf, verify), dtype=np.int64), 0, verify
            )
        # Greedy choices, one argmax over the device logits: every verified position of a
        # greedy decoding row, the last prompt position of a greedy chunk that completes.
        done = [p.done + len(c) == len(p.tokens) for p, c in chunks]
        greedy = [lg for r, lg in zip(rows, logits, strict=False) if r.gen is None]
        greedy += [
            lg[-1:]
            for (p, _), lg, d in zip(chunks, logits[B:], done, strict=True)
            if d and p.gen is None
        ]
        best = iter(_argmax_rows(greedy))
        accepted = np.zeros(B, dtype=np.int64)
        new_tokens: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            nv = int(verify[i])
            ids = next(best) if row.gen is None else None
            n, emitted = self._accept(
                row, drafts[i][:nv], q_probs[i][:nv], logits[i], ids, forced, i
            )
            accepted[i] = n
            new_tokens[row.seq_id] = emitted
            self._commit(row, int(ctx_lens[i]), int(lens[i]), drafts[i], n, emitted[-1])
        finished = 0
        for (p, c), lg, d in zip(chunks, logits[B:], done, strict=True):
            p.done += len(c)
            if d:
                del self._prefilling[p.seq_id]
                first = next(best)[0] if p.gen is None else None
                new_tokens[p.seq_id] = [self._finish_prefill(p, lg, first)]
                finished += 1
        verify_time = clock() - t1

        if B > 0:
            tp = clock()
            policy.observe(
                StepOutcome(
                    conf=conf,
                    verified_lens=verify,
                    accepted=accepted,
                    context_lens=ctx_lens,
                    drafted_lens=lens.copy(),
                    draft_time_s=draft_time,
                    verify_time_s=verify_time,
                    prefill_extra_s=extra_s,
                )
            )
            policy_s += clock() - tp
        stats = StepStats(
            batch=B,
            draft_passes=len(draft_rows),
            draft_time_s=draft_time,
            verify_time_s=verify_time,
            proposed=int(lens.sum()),
            verified=int(verify.sum()),
            accepted=int(accepted.sum()),
            decision=decision,
            spec_lens=[int(v) for v in verify],
            prefill_tokens=sum(len(c) for _, c in chunks),
            prefill_done=finished,
            context_lens=[int(c) for c in ctx_lens],
            draft_rows=draft_rows,
            draft_ctx=draft_ctx,
            draft_pass_s=pass_s,
            policy_s=policy_s,
        )
        return StepResult(new_tokens, stats)

    # ------------------------------------------------------------------ pieces of a step

    def _draft_pass(
        self,
        rows: list[_Row],
        idx: np.ndarray,
        j: int,
        conf: np.ndarray,
        drafts: list[list[int]],
        q_probs: list[list[torch.Tensor]],
        chunks: Sequence[tuple[_Prefill, list[int]]] = (),
    ) -> None:
        """One draft forward over rows `idx`: pass 0 feeds each row's lag, later passes feed
        the previous draft token; `chunks` (pass 0 only) are fed as extra rows. Records the new
        token, its confidence and (sampling) q."""
        assert self.draft is not None
        chosen = [rows[i] for i in idx]
        feeds = [
            r.draft_lag if j == 0 else [drafts[i][-1]] for i, r in zip(idx, chosen, strict=True)
        ]
        slots = [int(r.d_slot) for r in chosen if r.d_slot is not None]
        for pf, chunk in chunks:
            if pf.d_slot is not None:
                slots.append(pf.d_slot)
                feeds.append(chunk)
        out = self.draft.forward(slots, feeds, last_n=1, on_device=True)
        n = len(chosen)
        lg = torch.cat(out[:n])[:, : self.target.vocab_size]  # [n, V] on the draft's device
        toks = [0] * n
        confs = [0.0] * n
        greedy = [k for k, r in enumerate(chosen) if r.gen is None]
        if greedy:  # top-1 (token, probability) on the device; only 2 × rows values move
            sel = lg if len(greedy) == n else lg[torch.tensor(greedy, device=lg.device)]
            top_p, top_i = torch.softmax(sel, dim=-1).max(dim=-1)
            for k, t, c in zip(greedy, top_i.tolist(), top_p.tolist(), strict=True):
                toks[k], confs[k] = int(t), float(c)
        for k, (i, r) in enumerate(zip(idx, chosen, strict=True)):
            if j == 0:
                r.draft_lag = []
            if r.gen is not None:
                q = probs_from_logits(lg[k : k + 1], r.params.temperature, r.params.top_p)[0]
                toks[k] = sample(q, r.gen)
                confs[k] = float(q[toks[k]])
                q_probs[i].append(q)
            drafts[i].append(toks[k])
        got = np.asarray(confs, dtype=np.float64)
        if self.confidence_override is not None:
            got = np.asarray(
                self.confidence_override([r.seq_id for r in chosen], j, got.copy()),
                dtype=np.float64,
            )
            if got.shape != (n,):
                raise ValueError(
                    f"confidence_override returned shape {got.shape} for {n} drafting rows"
                )
        conf[idx, j] = got

    def _accept(
        self,
        row: _Row,
        drafts: list[int],
        q: list[torch.Tensor],
        logits: torch.Tensor,
        best: list[int] | None,
        forced: np.ndarray | None,
        i: int,
    ) -> tuple[int, list[int]]:
        """Verify one row: `best` holds the target's argmax per position for a greedy row
        (None for a sampled row, which uses `logits` on the device)."""
        if forced is not None:
            n = int(forced[i])
            x = (
                best[n]
                if best is not None
                else self._choose(logits[n : n + 1], row.params, row.gen)
            )
            return n, [*drafts[:n], x]
        if row.gen is None:
            assert best is not None, "a greedy row needs its argmax ids"
            v = accept_greedy(drafts, best)
        else:
            p = probs_from_logits(logits, row.params.temperature, row.params.top_p)
            qs = torch.stack(q) if q else torch.empty((0, p.shape[1]), device=p.device)
            if qs.shape[1] < p.shape[1]:  # draft vocab smaller: its q is 0 beyond it
                qs = torch.nn.functional.pad(qs, (0, p.shape[1] - qs.shape[1]))
            v = verify_sampled(drafts, qs, p, row.gen)
        return v.accepted, v.tokens

    def _commit(
        self, row: _Row, ctx_len: int, drafted: int, drafts: list[int], n: int, x: int
    ) -> None:
        """Roll both caches back to the accepted prefix and queue what the draft has not seen."""
        self.target.truncate(row.t_slot, ctx_len + 1 + n)
        if drafted > 0 and self.draft is not None and row.d_slot is not None:
            # The draft cache holds the committed tokens plus drafts[:drafted-1].
            in_cache = min(n, drafted - 1)
            self.draft.truncate(row.d_slot, ctx_len + 1 + in_cache)
            row.draft_lag = [*drafts[in_cache:n], x]
        else:
            row.draft_lag.append(x)
        row.pending = x

    def _choose(
        self, logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None
    ) -> int:
        """The target's own token from a [1, V] logits row (greedy or sampled)."""
        if gen is None:
            return int(logits[0].argmax())
        return sample(probs_from_logits(logits, params.temperature, params.top_p)[0], gen)
