"""`VllmEngine`: vLLM's AsyncLLM behind the surface `adaspec.server` calls on `LLMEngine`.

The torch path's `LLMEngine` owns the step loop and drives a `Backend` step by step; vLLM owns
its own loop (EngineCore), so this adapter replaces the *engine* instead: `start`, `ready`,
`dead_reason`, `shutdown`, `submit` (→ the same `RequestStream` of `RequestOutput`s), `abort`,
`counts` and `backend.max_model_len`. The AdaSpec policy runs inside vLLM through the scheduler
plugin (scheduler.py) or, in config-only mode, through the static K table (config.py).

`submit` must be called from the asyncio loop that consumes the stream (as with LLMEngine);
AsyncLLM starts its output handler on that loop at the first request.

Per-request draft cap: `submit(..., max_draft=n)` (or `SamplingParams.max_draft`, which the
OpenAI server fills from the request's `max_draft_tokens`) becomes
`SamplingParams.extra_args["adaspec_max_draft"]`, which the AdaSpec scheduler applies (0 = this
request never speculates; the SLO guard also counts such a request's time per token).
With vLLM's `per_request_spec_decode_metrics` on (via `extra`), each finished request's
acceptance record is kept for `request_spec_metrics(request_id)`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from adaspec.backends.base import SamplingParams
from adaspec.backends.vllm.config import VllmSettings, engine_kwargs
from adaspec.backends.vllm.settings import MAX_DRAFT_ARG
from adaspec.backends.vllm.verify_plan import check_verifier_platform
from adaspec.backends.vllm.version import check_vllm_version
from adaspec.engine import (
    EngineUnavailableError,
    InvalidRequestError,
    QueueFullError,
    RequestOutput,
    RequestStream,
)

log = logging.getLogger("adaspec.vllm")

SPEC_METRICS_KEPT = 256
"""Finished requests whose vLLM spec-decode record `request_spec_metrics` can still return."""


@dataclass(frozen=True)
class BackendInfo:
    """What the server reads from `engine.backend`."""

    max_model_len: int
    max_batch: int
    eos_token_ids: frozenset[int]


class VllmEngine:
    def __init__(self, settings: VllmSettings, *, max_waiting: int = 64) -> None:
        if max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        self.settings = settings
        self.max_waiting = max_waiting
        self.backend = BackendInfo(settings.max_model_len, settings.max_num_seqs, frozenset())
        self.llm: Any = None
        self.vllm_version: str | None = None
        self.dead_reason: str | None = None
        self._accepting = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ids = itertools.count()
        self._spec_metrics: OrderedDict[str, dict[str, Any]] = OrderedDict()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Check the vLLM version (and, with adaptive_verification, the platform), then build
        AsyncLLM (loads both models; minutes on CPU)."""
        self.vllm_version = check_vllm_version()
        kwargs = engine_kwargs(self.settings)
        from vllm import AsyncEngineArgs  # type: ignore[import-not-found, unused-ignore]
        from vllm.v1.engine.async_llm import (  # type: ignore[import-not-found, unused-ignore]
            AsyncLLM,
        )

        if self.settings.adaptive_verification is not None:
            from vllm.platforms import (  # type: ignore[import-not-found, unused-ignore]
                current_platform,
            )

            check_verifier_platform(
                str(current_platform.device_name), os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
            )
        args = AsyncEngineArgs(**kwargs, disable_log_stats=False)
        self.llm = AsyncLLM.from_engine_args(args)
        eos = getattr(self.llm.get_tokenizer(), "eos_token_id", None)
        self.backend = BackendInfo(
            self.settings.max_model_len,
            self.settings.max_num_seqs,
            frozenset([eos]) if isinstance(eos, int) else frozenset(),
        )
        self._accepting = True

    @property
    def ready(self) -> bool:
        if not self._accepting or self.llm is None:
            return False
        if self.llm.errored:
            self.dead_reason = self.dead_reason or f"vLLM engine died: {self.llm.dead_error}"
            return False
        return True

    @property
    def chunked_prefill(self) -> bool:
        """vLLM splits prompts into chunks scheduled alongside decoding itself (its
        `enable_chunked_prefill`); SpecServe's own chunk planner is not involved."""
        cfg = getattr(self.llm, "vllm_config", None)
        return bool(cfg is not None and cfg.scheduler_config.enable_chunked_prefill)

    def counts(self) -> tuple[int, int]:
        """(in flight, 0): vLLM keeps its own waiting queue; everything submitted is in flight."""
        return len(self._tasks), 0

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while self._tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    # ------------------------------------------------------------------ requests

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        stop: Sequence[str] = (),
        request_id: str | None = None,
        *,
        max_draft: int | None = None,
    ) -> RequestStream:
        """Start a request; `max_draft` caps its own draft tokens per step (0 = plain
        decoding for this request); by default `params.max_draft` if the params carry one."""
        if max_draft is None:
            max_draft = getattr(params, "max_draft", None)
        if max_draft is not None and (
            isinstance(max_draft, bool) or not isinstance(max_draft, int) or max_draft < 0
        ):
            raise InvalidRequestError(
                f"max_draft must be an integer >= 0, got {max_draft!r}", "max_draft"
            )
        if not self.ready:
            raise EngineUnavailableError(
                self.dead_reason or "engine is not accepting requests (starting or stopping)"
            )
        n = len(prompt_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if n >= self.backend.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens; this model's context is "
                f"{self.backend.max_model_len} tokens (prompt plus at least one generated token)",
                "prompt",
            )
        if params.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1", "max_tokens")
        if len(self._tasks) >= self.max_waiting + self.backend.max_batch:
            raise QueueFullError(f"{len(self._tasks)} requests in flight; retry later")
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        if rid in self._tasks:
            raise InvalidRequestError(f"request id {rid!r} is already in use", "request_id")
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._tasks[rid] = loop.create_task(
            self._pump(rid, list(prompt_ids), params, tuple(s for s in stop if s), queue, max_draft)
        )
        # RequestStream only calls engine.abort(); this engine provides it.
        return RequestStream(cast(Any, self), rid, queue)

    def abort(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None and not task.done():
            task.get_loop().call_soon_threadsafe(task.cancel)

    def request_spec_metrics(self, request_id: str) -> dict[str, Any] | None:
        """vLLM's per-request spec-decode record of a finished request (`to_dict()` of its
        RequestSpecDecodeMetrics), when `per_request_spec_decode_metrics` is on."""
        return self._spec_metrics.get(request_id)

    def _vllm_params(
        self, params: SamplingParams, stop: tuple[str, ...], max_draft: int | None = None
    ) -> Any:
        from vllm import SamplingParams as VllmParams  # type: ignore[import-not-found, unused-ignore]
        from vllm.sampling_params import (  # type: ignore[import-not-found, unused-ignore]
            RequestOutputKind,
        )

        return VllmParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            ignore_eos=params.ignore_eos,
            stop=list(stop) or None,
            output_kind=RequestOutputKind.DELTA,
            extra_args=None if max_draft is None else {MAX_DRAFT_ARG: max_draft},
        )

    async def _pump(
        self,
        rid: str,
        ids: list[int],
        params: SamplingParams,
        stop: tuple[str, ...],
        queue: asyncio.Queue[RequestOutput],
        max_draft: int | None = None,
    ) -> None:
        generated = 0
        try:
            sp = self._vllm_params(params, stop, max_draft)
            prompt = {"prompt_token_ids": ids}
            async for out in self.llm.generate(prompt, sp, rid):
                c = out.outputs[0]
                generated += len(c.token_ids)
                metrics = getattr(c, "spec_decode_metrics", None)
                if metrics is not None:
                    self._keep_spec_metrics(rid, metrics.to_dict())
                finish = (c.finish_reason or "stop") if out.finished else None
                queue.put_nowait(
                    RequestOutput(rid, c.text, list(c.token_ids), finish, len(ids), generated)
                )
        except asyncio.CancelledError:
            if self.llm is not None:
                await asyncio.shield(self.llm.abort(rid))
            queue.put_nowait(RequestOutput(rid, "", [], "abort", len(ids), generated))
        except Exception as e:  # the engine died or rejected the request: tell the client
            log.warning("vLLM request %s failed: %s", rid, e)
            queue.put_nowait(RequestOutput(rid, "", [], "error", len(ids), generated, str(e)))
        finally:
            self._tasks.pop(rid, None)

    def _keep_spec_metrics(self, rid: str, record: dict[str, Any]) -> None:
        self._spec_metrics[rid] = record
        while len(self._spec_metrics) > SPEC_METRICS_KEPT:
            self._spec_metrics.popitem(last=False)
