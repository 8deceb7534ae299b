"""Engine arguments for vLLM from SpecServe's inputs (models, Policy, Profile). No vLLM import.

Two modes:
- plugin (default): `scheduler_cls` = AdaSpecScheduler, K chosen per step (see scheduler.py);
  `num_speculative_tokens` = K_max = the Policy's maxDraftTokens (vLLM sizes buffers by it).
- config-only (`use_plugin=False`, the documented fallback): no vLLM internals are touched.
  fixed → `num_speculative_tokens = fixedDraftTokens`; off → no speculative_config at all;
  adaptive → `num_speculative_tokens_per_batch_size`, a static batch-size → K table computed
  once by `kplan.k_table` from the Profile's time model, its calibrated mean acceptance, the
  Policy's TPOT budget and maxDraftTokens (at the context length `ctx_hint`). Changing the
  Policy then needs an engine restart (the operator's rollout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaspec.backends.vllm.kplan import k_table, profile_rate, static_k
from adaspec.contract import Policy, Profile
from adaspec.policy.time_model import StepTimePredictor, default_cpu_time_model

SCHEDULER_CLS = "adaspec.backends.vllm.scheduler.AdaSpecScheduler"


@dataclass(frozen=True)
class VllmSettings:
    target: Path
    draft: Path | None
    policy: Policy
    profile: Profile | None = None
    policy_file: Path | None = None
    use_plugin: bool = True
    max_model_len: int = 2048
    max_num_seqs: int = 8
    dtype: str = "bfloat16"
    enforce_eager: bool = True
    ctx_hint: int = 512
    """Context length the config-only K table is computed for."""
    trace_file: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Any other vLLM engine arguments (passed through unchanged)."""


def k_max_for(policy: Policy) -> int:
    return max(policy.max_draft_tokens, policy.fixed_draft_tokens, 1)


def engine_kwargs(s: VllmSettings) -> dict[str, Any]:
    """Keyword arguments for `vllm.AsyncEngineArgs` / `vllm.LLM`."""
    kw: dict[str, Any] = {
        "model": str(s.target),
        "dtype": s.dtype,
        "max_model_len": s.max_model_len,
        "max_num_seqs": s.max_num_seqs,
        "enforce_eager": s.enforce_eager,
        "seed": 0,
        **s.extra,
    }
    if s.draft is None:
        return kw
    spec: dict[str, Any] = {"method": "draft_model", "model": str(s.draft)}
    if s.use_plugin:
        spec["num_speculative_tokens"] = k_max_for(s.policy)
        kw["scheduler_cls"] = SCHEDULER_CLS
        settings: dict[str, Any] = {"k_max": k_max_for(s.policy)}
        if s.policy_file is not None:
            settings["policy_file"] = str(s.policy_file)
        else:
            settings["policy"] = s.policy.model_dump(mode="json", by_alias=True)
        if s.profile is not None:
            settings["profile_json"] = s.profile.to_json()
        if s.trace_file is not None:
            settings["trace_file"] = str(s.trace_file)
        kw["additional_config"] = {"adaspec": settings}
        kw["speculative_config"] = spec
        return kw
    fixed = static_k(s.policy)
    if fixed == 0:
        return kw  # off: plain decoding, no drafter loaded
    if fixed is not None:
        spec["num_speculative_tokens"] = fixed
    else:
        times = StepTimePredictor(s.profile.time_model if s.profile else default_cpu_time_model())
        table = k_table(s.policy, times, profile_rate(s.profile), s.max_num_seqs, float(s.ctx_hint))
        spec["num_speculative_tokens"] = max(1, max(k for _, _, k in table))
        spec["num_speculative_tokens_per_batch_size"] = table
    kw["speculative_config"] = spec
    return kw
