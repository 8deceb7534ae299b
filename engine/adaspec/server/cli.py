"""`adaspec serve`: load the model pair, start the engine loop and the OpenAI-compatible server.

Without `--policy-file` the live policy comes from the flags below (defaults: adaptive mode,
TPOT SLO 500 ms — plain decoding of the built-in 1.5B target takes ≈ 250 ms/token on 2 CPU
cores —, budget = SLO, at most 8 draft tokens, fixed K = 3). With `--policy-file` the same flags
are only the fallback used until the file is valid; the file is re-read every second and applied
without restart (see adaspec.policy_source). Logs go to stderr.

Chunked prefill (torch backend) is on by default: a new prompt is fed over the next steps in
chunks of at most `--prefill-chunk-tokens`, sized so a step still fits the live policy's TPOT
budget, instead of stalling every running request while it is prefilled whole.

`--step-log PATH` (torch and scripted backends) writes one JSON line per engine step with its
timings and counts (format: adaspec.step_log), to see where real step time goes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, cast

from adaspec.contract import MAX_DRAFT_TOKENS_LIMIT, ContractError, Profile, load_profile
from adaspec.policy.factory import OVERRIDES
from adaspec.policy.prefill import DEFAULT_MAX_CHUNK, DEFAULT_MIN_CHUNK
from adaspec.policy_source import (
    DEFAULT_FIXED_DRAFT,
    DEFAULT_MAX_DRAFT,
    DEFAULT_TPOT_SLO_MS,
    PolicySource,
    default_policy,
)
from adaspec.step_log import StepLog

log = logging.getLogger("adaspec.serve")

DTYPES = ("bfloat16", "float32", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("models")
    m.add_argument(
        "--target",
        default="default-target",
        help="target model: built-in name/alias, a folder with config.json, or a .gguf file "
        "(default: the built-in Qwen2.5-Coder-1.5B-Instruct)",
    )
    m.add_argument(
        "--draft",
        default="default-draft",
        help="draft model, same forms as --target, or 'none' for plain decoding only "
        "(default: the built-in Qwen2.5-Coder-0.5B-Instruct)",
    )
    m.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="default: bfloat16")
    m.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    m.add_argument(
        "--backend",
        choices=("torch", "vllm", "scripted"),
        default="torch",
        help="'vllm' embeds vLLM 0.32.0 (must be installed; scripts/vllm-env.sh on CPU); "
        "'scripted' serves a deterministic test double without model weights "
        "(smoke tests of the HTTP layer, the operator and Prometheus rules)",
    )
    m.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="vllm backend only: GPUs per replica (default: 1)",
    )
    m.add_argument(
        "--vllm-config-only",
        action="store_true",
        help="vllm backend: no AdaSpec scheduler plugin, a static K table from the policy",
    )
    m.add_argument("--served-model-name", help="model id in the API (default: the target name)")
    m.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")

    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="default: 8000")
    s.add_argument("--max-batch", type=int, default=8, help="running requests (default: 8)")
    s.add_argument(
        "--max-waiting",
        type=int,
        default=64,
        help="queued requests before answering 429 (default: 64)",
    )
    s.add_argument(
        "--max-model-len", type=int, default=2048, help="prompt + output tokens (default: 2048)"
    )
    s.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=DEFAULT_MAX_CHUNK,
        help="torch backend: most prompt tokens prefilled per step, riding along with the "
        "decoding step and sized to fit the TPOT budget (chunked prefill); 0 prefills each "
        f"prompt whole between steps (default: {DEFAULT_MAX_CHUNK})",
    )
    s.add_argument(
        "--prefill-min-chunk",
        type=int,
        help="prompt tokens the oldest prefilling request gets per step even when the budget "
        f"leaves no room (default: {DEFAULT_MIN_CHUNK}, or --prefill-chunk-tokens if smaller)",
    )
    s.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds to let running requests finish on shutdown (default: 30)",
    )
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    s.add_argument(
        "--step-log",
        type=Path,
        help="write one JSON line per engine step (timings per draft pass, verification, "
        "policy, gaps between steps; format adaspec.step_log v1) to this file, truncated at "
        "startup; torch and scripted backends (default: off)",
    )

    q = p.add_argument_group("policy")
    q.add_argument("--policy-file", type=Path, help="Policy JSON, watched and hot-reloaded")
    q.add_argument(
        "--profile-file", type=Path, help="Profile JSON (time model, acceptance calibration)"
    )
    q.add_argument(
        "--spec-policy",
        choices=OVERRIDES,
        help="override the policy kind (benchmarks); limits still come from the policy",
    )
    q.add_argument(
        "--mode",
        choices=("adaptive", "fixed", "off"),
        default="adaptive",
        help="default policy mode without a policy file (default: adaptive)",
    )
    q.add_argument("--tpot-slo-ms", type=float, default=DEFAULT_TPOT_SLO_MS)
    q.add_argument("--tpot-budget-ms", type=float, help="default: the SLO")
    q.add_argument("--max-draft-tokens", type=int, default=DEFAULT_MAX_DRAFT)
    q.add_argument("--fixed-draft-tokens", type=int, default=DEFAULT_FIXED_DRAFT)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def check_args(args: argparse.Namespace) -> str | None:
    """Return an error message naming the bad flag, or None."""
    for flag, value, low in (
        ("--max-batch", args.max_batch, 1),
        ("--max-waiting", args.max_waiting, 1),
        ("--max-model-len", args.max_model_len, 2),
        ("--port", args.port, 0),
    ):
        if value < low:
            return f"{flag} must be >= {low}, got {value}"
    for flag, value in (
        ("--max-draft-tokens", args.max_draft_tokens),
        ("--fixed-draft-tokens", args.fixed_draft_tokens),
    ):
        if not 0 <= value <= MAX_DRAFT_TOKENS_LIMIT:
            return f"{flag} must be within [0, {MAX_DRAFT_TOKENS_LIMIT}], got {value}"
    if args.prefill_chunk_tokens < 0:
        return (
            f"--prefill-chunk-tokens must be >= 0 (0: whole-prompt prefill), "
            f"got {args.prefill_chunk_tokens}"
        )
    if args.prefill_min_chunk is not None:
        if args.prefill_min_chunk < 1:
            return f"--prefill-min-chunk must be >= 1, got {args.prefill_min_chunk}"
        if 0 < args.prefill_chunk_tokens < args.prefill_min_chunk:
            return (
                f"--prefill-min-chunk ({args.prefill_min_chunk}) must not exceed "
                f"--prefill-chunk-tokens ({args.prefill_chunk_tokens})"
            )
    if args.tpot_slo_ms <= 0 or (args.tpot_budget_ms is not None and args.tpot_budget_ms <= 0):
        return "--tpot-slo-ms and --tpot-budget-ms must be > 0"
    if args.tensor_parallel_size < 1:
        return f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}"
    if args.backend != "vllm" and (args.tensor_parallel_size != 1 or args.vllm_config_only):
        return "--tensor-parallel-size and --vllm-config-only need --backend vllm"
    if args.backend == "vllm" and getattr(args, "step_log", None) is not None:
        return "--step-log needs --backend torch or scripted (vLLM runs its own step loop)"
    return None


def open_step_log(args: argparse.Namespace) -> StepLog | None:
    """The --step-log file opened for writing, or None; OSError says why it cannot be."""
    path = getattr(args, "step_log", None)
    return None if path is None else StepLog.open(path)


def prefill_min_chunk(args: argparse.Namespace) -> int:
    """--prefill-min-chunk, defaulting to DEFAULT_MIN_CHUNK capped by the chunk limit."""
    if args.prefill_min_chunk is not None:
        return int(args.prefill_min_chunk)
    return max(1, min(DEFAULT_MIN_CHUNK, args.prefill_chunk_tokens))


def build_policy_source(args: argparse.Namespace) -> PolicySource:
    default = default_policy(
        args.mode,
        args.tpot_slo_ms,
        args.tpot_budget_ms,
        args.max_draft_tokens,
        min(args.fixed_draft_tokens, args.max_draft_tokens)
        if args.mode == "fixed"
        else args.fixed_draft_tokens,
    )
    return PolicySource(default, args.policy_file)


def load_profile_arg(path: Path | None) -> Profile | None:
    if path is None:
        return None
    return load_profile(path)


def make_loader(
    args: argparse.Namespace,
    profile: Profile | None,
    source: PolicySource,
    step_log: StepLog | None = None,
) -> Any:
    """The function that loads models and starts the engine (run in a thread at startup).

    `step_log`: the --step-log file as `run` opened it (the engine closes it when it stops);
    without it, a --step-log in `args` is opened by the loader itself."""
    from adaspec.engine import LLMEngine
    from adaspec.server.app import ServerState

    def load(state: ServerState) -> None:
        nonlocal step_log
        backend: Any
        if args.backend == "vllm":
            from adaspec.backends.vllm.serve import load_vllm_engine

            vllm_engine, vllm_codec = load_vllm_engine(
                args, profile, source, use_plugin=not args.vllm_config_only
            )
            state.metrics.include_default_registry = True  # vLLM's own vllm:* metrics
            state.codec = vllm_codec
            # VllmEngine offers the surface the app uses (submit/abort/ready/counts/shutdown)
            state.engine = cast(Any, vllm_engine)
            log.info(
                "ready: serving %r on http://%s:%d (vllm)", state.model_name, args.host, args.port
            )
            return
        if args.backend == "scripted":
            from adaspec.server.scripted import ScriptedBackend

            backend = ScriptedBackend(max_batch=args.max_batch, max_model_len=args.max_model_len)
            codec: Any = backend.codec
        else:
            backend, codec = load_torch_backend(args)
        if step_log is None:
            step_log = open_step_log(args)
        engine = LLMEngine(
            backend,
            codec,
            source,
            profile=profile,
            spec_policy_override=args.spec_policy,
            max_waiting=args.max_waiting,
            metrics=state.metrics,
            prefill_chunk_tokens=args.prefill_chunk_tokens,
            prefill_min_chunk=prefill_min_chunk(args),
            step_log=step_log,
        )
        if step_log is not None:
            log.info("step log: one JSON line per engine step to %s", step_log.path)
        if engine.chunked_prefill:
            log.info(
                "chunked prefill: at most %d prompt tokens per step, at least %d",
                engine.prefill_chunk_tokens,
                engine.prefill_min_chunk,
            )
        else:
            log.info("prompts are prefilled whole between steps")
        engine.start()
        state.codec = codec
        state.engine = engine
        log.info("ready: serving %r on http://%s:%d", state.model_name, args.host, args.port)

    return load


def load_torch_backend(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from adaspec.backends.torch.backend import TorchBackend
    from adaspec.models import RichProgress, resolve_model
    from adaspec.server.codec import HFCodec

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    progress = RichProgress()
    target_dir = resolve_model(args.target, progress)
    draft_dir = None if args.draft == "none" else resolve_model(args.draft, progress)
    log.info("loading target from %s", target_dir)
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=dtype).eval()
    draft = None
    if draft_dir is not None:
        log.info("loading draft from %s", draft_dir)
        draft = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=dtype).eval()
    backend = TorchBackend(
        target,
        draft,
        max_batch=args.max_batch,
        max_model_len=args.max_model_len,
        device=args.device,
        dtype=dtype,
    )
    return backend, HFCodec.from_folder(str(target_dir))


def served_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return str(args.served_model_name)
    if args.backend == "scripted":
        return "scripted"
    from adaspec.models import lookup_builtin

    builtin = lookup_builtin(args.target)
    return builtin.name if builtin is not None else Path(args.target).name


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    problem = check_args(args)
    if problem:
        print(f"adaspec serve: {problem}", file=sys.stderr)
        return 2
    try:
        profile = load_profile_arg(args.profile_file)
    except (OSError, ContractError) as e:
        print(f"adaspec serve: --profile-file: {e}", file=sys.stderr)
        return 2
    try:
        step_log = open_step_log(args)
    except OSError as e:
        why = e.strerror or str(e)
        print(f"adaspec serve: --step-log: cannot write {args.step_log}: {why}", file=sys.stderr)
        return 2
    try:
        return _serve(args, profile, step_log)
    finally:
        if step_log is not None:
            step_log.close()  # the engine closed it already unless it never started


def _serve(args: argparse.Namespace, profile: Profile | None, step_log: StepLog | None) -> int:
    import uvicorn

    from adaspec.server.app import ServerState, create_app

    source = build_policy_source(args)
    state = ServerState(model_name=served_name(args), drain_timeout_s=args.drain_timeout)
    servers: list[uvicorn.Server] = []
    load_engine = make_loader(args, profile, source, step_log)

    def load(st: ServerState) -> None:
        try:
            load_engine(st)
        except BaseException:
            # A server that can never become ready is useless here: stop it (exit code 1).
            for srv in servers:
                srv.should_exit = True
            raise

    config = uvicorn.Config(
        create_app(state, load),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(args.drain_timeout) + 5,
    )
    server = uvicorn.Server(config)
    servers.append(server)
    server.run()
    if state.load_error is not None:
        print(f"adaspec serve: loading the models failed: {state.load_error}", file=sys.stderr)
        return 1
    return 0
