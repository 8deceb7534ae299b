"""Glue for `adaspec serve --backend vllm`: build a started VllmEngine and the text codec.

The server's loader (server/cli.py `make_loader`) would call, in place of LLMEngine:

    from adaspec.backends.vllm.serve import load_vllm_engine
    engine, codec = load_vllm_engine(args, profile, source)

`args` needs target, draft ("none" = no speculation), max_batch and max_model_len, as the
server's flags have. The live policy is the PolicySource's current document; with a policy
file the AdaSpec scheduler inside vLLM watches the same file (hot reload without restart).
`adaptive_verification` (GPU only) and `extra` (more vLLM engine arguments) go to VllmSettings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaspec.backends.vllm.config import VllmSettings
from adaspec.backends.vllm.engine import VllmEngine
from adaspec.backends.vllm.settings import VerifierSettings
from adaspec.contract import Profile
from adaspec.policy_source import PolicySource


def load_vllm_engine(
    args: Any,
    profile: Profile | None,
    source: PolicySource,
    *,
    use_plugin: bool = True,
    trace_file: Path | None = None,
    adaptive_verification: VerifierSettings | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[VllmEngine, Any]:
    from adaspec.models import RichProgress, resolve_model
    from adaspec.server.codec import HFCodec

    progress = RichProgress()
    target_dir = resolve_model(args.target, progress)
    draft_dir = None if args.draft == "none" else resolve_model(args.draft, progress)
    policy, _ = source.current()
    more: dict[str, Any] = dict(extra or {})
    if getattr(args, "tensor_parallel_size", 1) > 1:
        more["tensor_parallel_size"] = args.tensor_parallel_size
    engine = VllmEngine(
        VllmSettings(
            target=target_dir,
            draft=draft_dir,
            policy=policy,
            profile=profile,
            policy_file=source.path,
            use_plugin=use_plugin,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_batch,
            trace_file=trace_file,
            adaptive_verification=adaptive_verification,
            enforce_eager=adaptive_verification is None,  # adaptive verification: CUDA graphs
            extra=more,
        ),
        max_waiting=getattr(args, "max_waiting", 64),
    )
    engine.start()
    return engine, HFCodec.from_folder(str(target_dir))
