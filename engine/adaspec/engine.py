"""The engine loop: admission, continuous batching, streaming, policy application, metrics.

Models are not thread-safe, so ONE background thread owns the backend: it admits waiting
requests up to `backend.max_batch`, runs `backend.step` for the running batch under the live
policy, and hands each request's new text to its asyncio consumer with
`loop.call_soon_threadsafe` into a per-request `asyncio.Queue`. Everything that touches the
backend happens in that thread; other threads only enqueue (submit, abort, shutdown).

Admission: with a backend that supports chunked prefill (and `prefill_chunk_tokens` > 0) a
waiting request joins the running batch as *prefilling*: every step the engine plans how many
prompt tokens ride along with the step (`plan_prefill`: FIFO, sized so the step still fits the
live policy's TPOT budget when the batch decodes plainly, at least `prefill_min_chunk` tokens for
the oldest prompt) and the request decodes from the step its first token arrives (TTFT is
observed then). The plan uses the live Policy's tpotBudgetMs for every policy kind, so baselines
get the same chunking as AdaSpec. Otherwise a request's whole prompt is prefilled by
`backend.add` between two steps, and every running request waits for it.

Per-request rules: stop at `max_tokens`, at the context limit, at EOS (unless `ignore_eos`) and
at stop strings (the stop string is not returned; text that could start a stop string is held
back until it is decided). Aborts (client gone) are applied at the next step boundary and free the
backend's slots before the next step (prefilling requests too). A failing `add` or
`begin_prefill` fails that request; a failing `step` fails the whole running batch, prefilling
requests included (they share the step's forwards; the backend cannot say which request broke
it) — each consumer gets a final output with `error` set, nobody hangs. If the loop itself dies,
every request is failed and the engine reports not ready.

Step log (`step_log`, off by default): after every successful backend step the engine thread
appends one record (adaspec.step_log) with the step's timings and counts; closed when the loop
exits. Nothing is measured or built for it when it is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

from adaspec.backends.base import (
    Backend,
    ChunkedPrefillBackend,
    PrefillChunks,
    SamplingParams,
    SeqState,
    StepResult,
    supports_chunked_prefill,
)
from adaspec.contract import Policy, Profile
from adaspec.metrics import EngineMetrics
from adaspec.policy.base import SpecPolicy
from adaspec.policy.factory import PolicySelector, StepLimits
from adaspec.policy.prefill import (
    DEFAULT_MAX_CHUNK,
    DEFAULT_MIN_CHUNK,
    chunk_ctx_work,
    plain_step_s,
    plan_prefill,
)
from adaspec.policy.time_model import StepTimePredictor, default_cpu_time_model
from adaspec.policy_source import PolicySource
from adaspec.step_log import StepLog, step_record

log = logging.getLogger("adaspec.engine")

_PROMPT_TAIL = 6
"""Prompt tokens decoded with the output so the first word's leading space is rendered right."""


class Detokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


# ----------------------------------------------------------------------------- errors


class EngineError(Exception):
    """Base of the errors `submit` raises; the server maps each to an HTTP status."""


class QueueFullError(EngineError):
    """The waiting queue is full (HTTP 429)."""


class EngineUnavailableError(EngineError):
    """Not started, shutting down or dead (HTTP 503)."""


class InvalidRequestError(EngineError):
    """The request cannot be served as given (HTTP 400); `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


# ----------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class RequestOutput:
    """One increment of a request's output; the last one has `finish_reason` set."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    """None while running; 'stop' | 'length' | 'abort' | 'error' at the end."""
    prompt_tokens: int
    completion_tokens: int
    """Generated tokens so far (an EOS token counts, as in the OpenAI usage)."""
    error: str | None = None


@dataclass(frozen=True)
class FinalOutput:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None


class OutputAccumulator:
    """Joins a request's streamed outputs into its FinalOutput (non-streaming answers)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._text: list[str] = []
        self._ids: list[int] = []

    def add(self, out: RequestOutput) -> FinalOutput | None:
        """Take one output; the FinalOutput once the request has finished, else None."""
        self._text.append(out.text)
        self._ids.extend(out.token_ids)
        if out.finish_reason is None:
            return None
        return FinalOutput(
            self.request_id,
            "".join(self._text),
            self._ids,
            out.finish_reason,
            out.prompt_tokens,
            out.completion_tokens,
            out.error,
        )


class RequestStream:
    """Async iterator over a request's outputs; `abort()` tells the engine the client is gone."""

    def __init__(self, engine: LLMEngine, request_id: str, queue: asyncio.Queue[RequestOutput]):
        self.engine = engine
        self.request_id = request_id
        self._queue = queue
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        if out.finish_reason is not None:
            self.finished = True
        return out

    def abort(self) -> None:
        if not self.finished:
            self.engine.abort(self.request_id)

    def accumulator(self) -> OutputAccumulator:
        return OutputAccumulator(self.request_id)

    async def collect(self) -> FinalOutput:
        acc = self.accumulator()
        try:
            async for out in self:
                final = acc.add(out)
                if final is not None:
                    return final
        finally:
            self.abort()
        raise RuntimeError("request stream ended without a final output")  # pragma: no cover


# ----------------------------------------------------------------------------- requests


@dataclass
class _Request:
    seq: SeqState
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput]
    arrival: float
    max_len: int
    """Upper bound on prompt + output tokens (the backend's context limit)."""
    first_token_at: float | None = None
    generated: int = 0
    prefilling: bool = False
    """Chunked prefill: in the running batch, prompt not fully prefilled, no token yet."""
    prefill_total: int = 0
    prefill_done: int = 0
    # incremental detokenization: ids = prompt tail + output; text = decoded output so far
    detok_ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""
    sent_chars: int = 0
    pending_ids: list[int] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.seq.seq_id


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


# ----------------------------------------------------------------------------- engine


class LLMEngine:
    """Owns the backend in one thread; `submit` from asyncio code, `start`/`shutdown` anywhere."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Detokenizer,
        policy_source: PolicySource,
        *,
        profile: Profile | None = None,
        spec_policy_override: str | None = None,
        max_waiting: int = 64,
        metrics: EngineMetrics | None = None,
        idle_wait_s: float = 0.05,
        prefill_chunk_tokens: int = DEFAULT_MAX_CHUNK,
        prefill_min_chunk: int = DEFAULT_MIN_CHUNK,
        step_log: StepLog | None = None,
    ) -> None:
        if max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        if prefill_chunk_tokens < 0:
            raise ValueError(
                f"prefill_chunk_tokens must be >= 0 (0: whole-prompt admission), "
                f"got {prefill_chunk_tokens}"
            )
        if prefill_min_chunk < 1:
            raise ValueError(f"prefill_min_chunk must be >= 1, got {prefill_min_chunk}")
        if 0 < prefill_chunk_tokens < prefill_min_chunk:
            raise ValueError(
                f"prefill_min_chunk ({prefill_min_chunk}) must not exceed "
                f"prefill_chunk_tokens ({prefill_chunk_tokens})"
            )
        self.backend = backend
        self.step_log = step_log
        """Written by the engine thread only; the engine closes it when its loop exits."""
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prefill_min_chunk = prefill_min_chunk
        self._chunked: ChunkedPrefillBackend | None = (
            cast(ChunkedPrefillBackend, backend)
            if prefill_chunk_tokens > 0 and supports_chunked_prefill(backend)
            else None
        )
        # The planner's own predictor, from the served profile as the policies' (no online
        # bias correction: every policy kind must get the same chunks for fair comparisons).
        self._prefill_times = StepTimePredictor(
            profile.time_model if profile is not None else default_cpu_time_model()
        )
        self.tokenizer = tokenizer
        self.policy_source = policy_source
        self.selector = PolicySelector(profile, spec_policy_override)
        self.max_waiting = max_waiting
        self.metrics = metrics or EngineMetrics()
        self._idle_wait_s = idle_wait_s
        self._lock = threading.Lock()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._requests: dict[str, _Request] = {}
        self._aborts: set[str] = set()
        self._wakeup = threading.Event()
        self._accepting = False
        self._stop = False
        self._closed = False
        """Set under the lock when the loop has exited: no request may be queued after that."""
        self._thread: threading.Thread | None = None
        self.dead_reason: str | None = None
        self._policy_version = -1
        self._spec: SpecPolicy | None = None
        self._limits = StepLimits(0, None)
        self.live_policy: Policy | None = None
        self.steps = 0
        self._ids = itertools.count()
        policy_source.attach(
            self.metrics.policy_reload_errors.inc,
            lambda bad: self.metrics.policy_invalid.set(1.0 if bad else 0.0),
        )
        self._refresh_policy()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()
        self.policy_source.start()

    @property
    def chunked_prefill(self) -> bool:
        """Whether prompts are prefilled in chunks riding along with the decoding steps."""
        return self._chunked is not None

    @property
    def ready(self) -> bool:
        t = self._thread
        return self._accepting and t is not None and t.is_alive() and self.dead_reason is None

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Stop admitting, let in-flight requests finish for up to `drain_timeout_s`, then fail
        what is left with an explicit error and stop the thread."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline and self._thread is not None and self._thread.is_alive():
            with self._lock:
                busy = bool(self._waiting or self._running)
            if not busy:
                break
            time.sleep(0.02)
        self._stop = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=60.0)
        self.policy_source.stop()

    # ------------------------------------------------------------------ client side

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        stop: Sequence[str] = (),
        request_id: str | None = None,
    ) -> RequestStream:
        """Queue a request; must be called from the event loop that will consume the stream."""
        if not self.ready:
            self.metrics.requests.labels(outcome="rejected").inc()
            reason = self.dead_reason or "engine is not accepting requests (starting or stopping)"
            raise EngineUnavailableError(reason)
        n = len(prompt_ids)
        max_len = self.backend.max_model_len
        if n == 0:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if n >= max_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens; this model's context is {max_len} tokens "
                f"(prompt plus at least one generated token)",
                "prompt",
            )
        if params.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1", "max_tokens")
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        tail = list(prompt_ids[-_PROMPT_TAIL:])
        req = _Request(
            seq=SeqState(rid, list(prompt_ids), params),
            stop=tuple(s for s in stop if s),
            loop=loop,
            queue=queue,
            arrival=time.monotonic(),
            max_len=max_len,
            detok_ids=tail,
            read_offset=len(tail),
        )
        with self._lock:
            if self._closed:
                self.metrics.requests.labels(outcome="rejected").inc()
                raise EngineUnavailableError(self.dead_reason or "the engine has stopped")
            if len(self._waiting) >= self.max_waiting:
                self.metrics.requests.labels(outcome="rejected").inc()
                raise QueueFullError(
                    f"the waiting queue is full ({self.max_waiting} requests waiting, "
                    f"{len(self._running)} running); retry later"
                )
            if rid in self._requests:
                raise InvalidRequestError(f"request id {rid!r} is already in use", "request_id")
            self._waiting.append(req)
            self._requests[rid] = req
            self.metrics.waiting.set(len(self._waiting))
        self._wakeup.set()
        return RequestStream(self, rid, queue)

    def abort(self, request_id: str) -> None:
        """Thread-safe; applied before the next step. Unknown/finished ids are ignored."""
        with self._lock:
            if request_id in self._requests:
                self._aborts.add(request_id)
        self._wakeup.set()

    def counts(self) -> tuple[int, int]:
        """(running, waiting)."""
        with self._lock:
            return len(self._running), len(self._waiting)

    # ------------------------------------------------------------------ loop

    def _run(self) -> None:
        try:
            while not self._stop:
                self._apply_aborts()
                self._refresh_policy()
                self._admit()
                if self._running:
                    self._step()
                else:
                    self._wakeup.wait(self._idle_wait_s)
                    self._wakeup.clear()
        except BaseException as e:  # the loop must never die silently
            self.dead_reason = f"engine loop crashed: {type(e).__name__}: {e}"
            log.exception("engine loop crashed; failing all requests")
        finally:
            self._accepting = False
            reason = self.dead_reason or "the server shut down before the request finished"
            with self._lock:
                self._closed = True
                leftovers = list(self._running) + list(self._waiting)
            for req in leftovers:
                self._safe_remove(req)
                self._finish(req, "error", reason)
            with self._lock:
                self._running.clear()
                self._waiting.clear()
            self._update_gauges()
            if self.step_log is not None:
                self.step_log.close()

    def _apply_aborts(self) -> None:
        with self._lock:
            if not self._aborts:
                return
            aborts, self._aborts = self._aborts, set()
            waiting = [r for r in self._waiting if r.id in aborts]
            running = [r for r in self._running if r.id in aborts]
            self._waiting = deque(r for r in self._waiting if r.id not in aborts)
            self._running = [r for r in self._running if r.id not in aborts]
        for req in running:
            self._safe_remove(req)
        for req in waiting + running:
            self._finish(req, "abort", None)
        self._update_gauges()

    def _refresh_policy(self) -> None:
        policy, version = self.policy_source.current()
        if version == self._policy_version:
            return
        self._spec, self._limits = self.selector.select(policy)
        self._policy_version = version
        self.live_policy = policy
        self.metrics.record_policy(policy, self._limits.max_draft, self._limits.budget_s)
        log.info(
            "using policy generation %d: %s, max_draft=%d, budget=%s",
            policy.generation,
            getattr(self._spec, "name", type(self._spec).__name__),
            self._limits.max_draft,
            "none" if self._limits.budget_s is None else f"{self._limits.budget_s * 1000:g} ms",
        )

    def _admit(self) -> None:
        while len(self._running) < self.backend.max_batch:
            with self._lock:
                if not self._waiting:
                    break
                req = self._waiting.popleft()
            if self._chunked is not None:
                self._begin_prefill(self._chunked, req)
                continue
            try:
                first = self.backend.add(req.seq)
            except Exception as e:
                log.exception("prefill failed for %s", req.id)
                self._safe_remove(req)
                self._finish(req, "error", f"prefill failed: {type(e).__name__}: {e}")
                continue
            now = time.monotonic()
            req.first_token_at = now
            self.metrics.ttft.observe(now - req.arrival)
            self.metrics.target_forwards.inc()
            with self._lock:
                self._running.append(req)
            self._deliver(req, [first])
        self._update_gauges()

    def _begin_prefill(self, backend: ChunkedPrefillBackend, req: _Request) -> None:
        """Register `req` with the backend; its prompt rides along with the next steps."""
        try:
            backend.begin_prefill(req.seq)
        except Exception as e:
            log.exception("prefill failed for %s", req.id)
            self._safe_remove(req)
            self._finish(req, "error", f"prefill failed: {type(e).__name__}: {e}")
            return
        req.prefilling = True
        req.prefill_total = len(req.seq.prompt_ids) + len(req.seq.output_ids)
        req.prefill_done = 0
        with self._lock:
            self._running.append(req)

    def _plan_prefill(
        self, backend: ChunkedPrefillBackend, decoding: list[_Request], prefilling: list[_Request]
    ) -> PrefillChunks | None:
        """This step's prompt chunks: the plan keeps a plain step of the decoding rows plus the
        chunks within the live policy's TPOT budget (every policy kind, for fair comparisons)."""
        if not prefilling:
            return None
        b = len(decoding)
        ctx = sum(len(r.seq.prompt_ids) + len(r.seq.output_ids) - 1 for r in decoding)
        plain_s = plain_step_s(self._prefill_times, b, ctx, backend.has_draft)
        policy = self.live_policy
        plan = plan_prefill(
            self._prefill_times,
            [r.prefill_total - r.prefill_done for r in prefilling],
            [r.prefill_done for r in prefilling],
            decode_rows=b,
            plain_step_s=plain_s,
            budget_s=policy.tpot_budget_ms / 1000.0 if policy is not None else None,
            max_chunk=self.prefill_chunk_tokens,
            min_chunk=self.prefill_min_chunk,
        )
        left = sum(r.prefill_total - r.prefill_done for r in prefilling) - sum(plan.chunks)
        return PrefillChunks(
            {r.id: n for r, n in zip(prefilling, plan.chunks, strict=True) if n > 0},
            plan.extra_s,
            backlog_tokens=left,
            waiting_requests=len(self._waiting),
        )

    def _step(self) -> None:
        assert self._spec is not None
        batch = list(self._running)
        decoding = [r for r in batch if not r.prefilling]
        prefilling = [r for r in batch if r.prefilling]
        chunks: PrefillChunks | None = None
        spec, limits, live = self._spec, self._limits, self.live_policy
        t0 = time.monotonic()
        try:
            result: StepResult
            seqs = [r.seq for r in decoding]
            if self._chunked is not None:
                chunks = self._plan_prefill(self._chunked, decoding, prefilling)
                result = self._chunked.step(
                    seqs, spec, limits.max_draft, limits.budget_s, prefill=chunks
                )
            else:
                result = self.backend.step(seqs, spec, limits.max_draft, limits.budget_s)
        except Exception as e:
            log.exception("decoding step failed; failing %d running requests", len(batch))
            for req in batch:
                self._safe_remove(req)
                self._drop_running(req)
                self._finish(req, "error", f"decoding step failed: {type(e).__name__}: {e}")
            self._update_gauges()
            return
        self.steps += 1
        now = time.monotonic()
        work = 0.0
        if self.step_log is not None and chunks is not None:  # before prefill_done moves on
            work = sum(
                chunk_ctx_work(r.prefill_done, chunks.tokens[r.id])
                for r in prefilling
                if r.id in chunks.tokens
            )
        firsts: list[_Request] = []
        for req in prefilling:
            req.prefill_done += chunks.tokens.get(req.id, 0) if chunks is not None else 0
            if req.prefill_done >= req.prefill_total:
                firsts.append(req)
        # one target forward per prefill (counted when it completes) and per decoding request
        self.metrics.record_step(result.stats, now - t0, forwards=len(decoding) + len(firsts))
        for req in decoding:
            toks = result.new_tokens.get(req.id)
            if not toks:
                self._safe_remove(req)
                self._drop_running(req)
                self._finish(req, "error", "the backend returned no token for this request")
                continue
            self._deliver(req, toks)
        for req in firsts:
            req.prefilling = False
            toks = result.new_tokens.get(req.id)
            if not toks:
                self._safe_remove(req)
                self._drop_running(req)
                self._finish(req, "error", "the backend returned no first token after prefill")
                continue
            req.first_token_at = now
            self.metrics.ttft.observe(now - req.arrival)
            self._deliver(req, toks)
        self._update_gauges()
        if self.step_log is not None:
            self.step_log.write(
                step_record(
                    result.stats,
                    step=self.steps,
                    t_start=t0,
                    wall_s=now - t0,
                    gap_s=self.step_log.gap_before(t0),
                    policy=str(getattr(spec, "name", type(spec).__name__)),
                    generation=live.generation if live is not None else None,
                    prefill_rows=len(chunks.tokens) if chunks else 0,
                    prefill_ctx_work=work,
                    prefill_extra_pred_s=chunks.extra_s if chunks and chunks.tokens else 0.0,
                    emitted=sum(len(t) for t in result.new_tokens.values()),
                )
            )

    # ------------------------------------------------------------------ per request

    def _deliver(self, req: _Request, toks: list[int]) -> None:
        """`_take_tokens`, failing only this request if its output cannot be processed."""
        try:
            self._take_tokens(req, toks)
        except Exception as e:
            log.exception("processing the output of %s failed", req.id)
            self._safe_remove(req)
            self._drop_running(req)
            self._finish(req, "error", f"output processing failed: {type(e).__name__}: {e}")

    def _take_tokens(self, req: _Request, toks: list[int]) -> None:
        """Append tokens (truncating at a stop condition), emit new text, finish if done."""
        seq = req.seq
        params = seq.params
        eos = self.backend.eos_token_ids
        limit = min(params.max_tokens, req.max_len - len(seq.prompt_ids))
        finish: str | None = None
        start = len(seq.output_ids)
        generated_before = req.generated
        for t in toks:
            req.generated += 1
            if t in eos and not params.ignore_eos:
                finish = "stop"
                break
            seq.output_ids.append(t)
            if self._detok(req, t):
                finish = "stop"
                break
            if len(seq.output_ids) >= limit:
                finish = "length"
                break
        self.metrics.generated.inc(req.generated - generated_before)
        new_ids = seq.output_ids[start:]
        if finish is not None:
            self._safe_remove(req)
            self._drop_running(req)
            self._finish(req, finish, None, new_ids)
            return
        end = len(req.text) - _held_back(req.text, req.stop) if req.stop else len(req.text)
        delta = req.text[req.sent_chars : end] if end > req.sent_chars else ""
        req.sent_chars = max(req.sent_chars, end)
        req.pending_ids.extend(new_ids)
        if delta:
            self._emit(req, delta, req.pending_ids, None, None)
            req.pending_ids = []

    def _detok(self, req: _Request, token: int) -> bool:
        """Add one token's text to `req.text`; True when a stop string completed (text cut)."""
        req.detok_ids.append(token)
        prefix = self.tokenizer.decode(
            req.detok_ids[req.prefix_offset : req.read_offset], skip_special_tokens=True
        )
        full = self.tokenizer.decode(req.detok_ids[req.prefix_offset :], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False  # an incomplete UTF-8 sequence: wait for the next token
        before = len(req.text)
        req.text += full[len(prefix) :]
        req.prefix_offset = req.read_offset
        req.read_offset = len(req.detok_ids)
        if not req.stop:
            return False
        window = max(len(s) for s in req.stop)
        search_from = max(0, before - window + 1)
        hits = [i for i in (req.text.find(s, search_from) for s in req.stop) if i >= 0]
        if hits:
            req.text = req.text[: min(hits)]
            return True
        return False

    def _emit(
        self,
        req: _Request,
        text: str,
        ids: list[int],
        finish: str | None,
        error: str | None,
    ) -> None:
        out = RequestOutput(
            req.id,
            text,
            list(ids),
            finish,
            len(req.seq.prompt_ids),
            req.generated,
            error,
        )
        try:
            req.loop.call_soon_threadsafe(req.queue.put_nowait, out)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            if finish is None:
                self.abort(req.id)

    def _finish(
        self, req: _Request, reason: str, error: str | None, new_ids: list[int] | None = None
    ) -> None:
        with self._lock:
            if self._requests.pop(req.id, None) is None:
                return  # already finished
            self._aborts.discard(req.id)
        ids = req.pending_ids + (new_ids or [])
        tail = req.text[req.sent_chars :] if reason != "error" else ""
        self._emit(req, tail, ids, reason, error)
        tpot = None
        if reason in ("stop", "length") and req.first_token_at is not None and req.generated > 1:
            tpot = (time.monotonic() - req.first_token_at) / (req.generated - 1)
        self.metrics.record_finish(reason, tpot)
        log.debug("request %s finished: %s (%d tokens)", req.id, reason, req.generated)

    # ------------------------------------------------------------------ helpers

    def _drop_running(self, req: _Request) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._running.remove(req)

    def _safe_remove(self, req: _Request) -> None:
        """Free the request's backend slots; a backend that never saw it may raise — ignore."""
        try:
            self.backend.remove(req.id)
        except Exception as e:
            log.debug("backend.remove(%s) failed: %s", req.id, e)

    def _update_gauges(self) -> None:
        with self._lock:
            self.metrics.running.set(len(self._running))
            self.metrics.waiting.set(len(self._waiting))
