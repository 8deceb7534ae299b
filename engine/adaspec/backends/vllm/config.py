"""Engine arguments for vLLM from SpecServe's inputs (models, Policy, Profile). No vLLM import.

Two modes:
- plugin (default): `scheduler_cls` = AdaSpecScheduler, K chosen per step (see scheduler.py);
  `num_speculative_tokens` = K_max = the Policy's maxDraftTokens (vLLM sizes buffers by it);
  `async_scheduling=False` (the scheduler extends vLLM's synchronous Scheduler and trims draft
  lists per request; a no-op on CPU, where vLLM always turns async scheduling off).
  Optional switch `adaptive_verification` (GPU only, Model Runner V2): vLLM's adaptive
  verification with AdaSpec deciding the verified-draft budget (mrv2.py); adds
  `enable_adaptive_verification`, `worker_cls` = AdaSpecWorker and the verifier settings.
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
from adaspec.backends.vllm.settings import VerifierSettings
from adaspec.contract import Policy, Profile
from adaspec.policy.time_model import StepTimePredictor, default_cpu_time_model

SCHEDULER_CLS = "adaspec.backends.vllm.scheduler.AdaSpecScheduler"
WORKER_CLS = "adaspec.backends.vllm.mrv2.AdaSpecWorker"


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
    adaptive_verification: VerifierSettings | None = None
    """None: vLLM verifies every scheduled draft (both modes as before). Set: vLLM's adaptive
    verification (Model Runner V2, CUDA only) with AdaSpec choosing how many drafts to verify
    per step; needs use_plugin, a draft model and enforce_eager=False (full CUDA graphs)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Any other vLLM engine arguments (passed through unchanged)."""


def k_max_for(policy: Policy) -> int:
    return max(policy.max_draft_tokens, policy.fixed_draft_tokens, 1)


def _check_verifier_settings(s: VllmSettings) -> None:
    """What the adaptive-verification switch needs, checked before any vLLM import."""
    v = s.adaptive_verification
    assert v is not None
    if s.enforce_eager:
        raise ValueError(
            "adaptive_verification: vLLM's adaptive verification needs full CUDA graphs; "
            "set enforce_eager=False"
        )
    if s.profile is None:
        for name in ("acceptance", "step_cost"):
            if getattr(v, name) == "profile":
                raise ValueError(
                    f"adaptive_verification.{name}='profile' needs a Profile; pass one or "
                    f"set {name}='vllm'"
                )
    if "worker_cls" in s.extra:
        raise ValueError("adaptive_verification sets worker_cls itself; remove extra['worker_cls']")


def engine_kwargs(s: VllmSettings) -> dict[str, Any]:
    """Keyword arguments for `vllm.AsyncEngineArgs` / `vllm.LLM`."""
    if s.adaptive_verification is not None and (not s.use_plugin or s.draft is None):
        raise ValueError(
            "adaptive_verification needs the AdaSpec scheduler plugin (use_plugin=True) and a "
            "draft model"
        )
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
        if s.extra.get("async_scheduling"):
            raise ValueError(
                "extra['async_scheduling']: the AdaSpec scheduler plugin trims drafts per "
                "request on vLLM's synchronous path; leave async scheduling off"
            )
        kw["async_scheduling"] = False
        settings: dict[str, Any] = {"k_max": k_max_for(s.policy)}
        if s.policy_file is not None:
            settings["policy_file"] = str(s.policy_file)
        else:
            settings["policy"] = s.policy.model_dump(mode="json", by_alias=True)
        if s.profile is not None:
            settings["profile_json"] = s.profile.to_json()
        if s.trace_file is not None:
            settings["trace_file"] = str(s.trace_file)
        if s.adaptive_verification is not None:
            _check_verifier_settings(s)
            spec["enable_adaptive_verification"] = True
            kw["worker_cls"] = WORKER_CLS
            settings["verifier"] = s.adaptive_verification.model_dump(mode="json")
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
