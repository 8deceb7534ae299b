"""vLLM backend: SpecServe's AdaSpec policy inside vLLM 0.32.0 (pinned; see version.py).

- `engine.VllmEngine`: AsyncLLM behind the server's engine surface (submit/abort/ready/...);
  `submit(..., max_draft=n)` sets a request's own draft cap.
- `scheduler.AdaSpecScheduler`: vLLM `scheduler_cls` choosing K per step (goodput + SLO guard
  over each running request's acceptance and cap), trimming draft lists per request, live
  policy-file updates.
- `config.engine_kwargs`: vLLM engine arguments, plugin mode or config-only (static K table);
  the optional `adaptive_verification` switch (GPU, Model Runner V2 only).
- `kplan`: the pure K-planning math shared by the scheduler and the config-only table.
- `verify_plan` / `verifier` / `mrv2`: AdaSpec's confidence-prior verifier and SLO guard deciding
  vLLM's adaptive verification budget (pure math / per-worker state / the vLLM seam).
- `settings`: what crosses into vLLM's processes (`additional_config["adaspec"]`), live policy.

Only `scheduler`, `mrv2` and `engine.VllmEngine.start` import vLLM; the rest imports without it.
"""

from adaspec.backends.vllm.config import SCHEDULER_CLS, WORKER_CLS, VllmSettings, engine_kwargs
from adaspec.backends.vllm.kplan import (
    BatchRequests,
    KPlan,
    PositionAcceptance,
    k_table,
    plan_k,
)
from adaspec.backends.vllm.settings import MAX_DRAFT_ARG, SchedulerSettings, VerifierSettings
from adaspec.backends.vllm.verify_plan import (
    VerifierUnsupportedError,
    VerifyPlan,
    plan_verification,
)
from adaspec.backends.vllm.version import PINNED_VLLM, VllmVersionError, check_vllm_version

__all__ = [
    "MAX_DRAFT_ARG",
    "PINNED_VLLM",
    "SCHEDULER_CLS",
    "WORKER_CLS",
    "BatchRequests",
    "KPlan",
    "PositionAcceptance",
    "SchedulerSettings",
    "VerifierSettings",
    "VerifierUnsupportedError",
    "VerifyPlan",
    "VllmSettings",
    "VllmVersionError",
    "check_vllm_version",
    "engine_kwargs",
    "k_table",
    "plan_k",
    "plan_verification",
]
