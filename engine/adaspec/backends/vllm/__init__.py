"""vLLM backend: SpecServe's AdaSpec policy inside vLLM 0.32.0 (pinned; see version.py).

- `engine.VllmEngine`: AsyncLLM behind the server's engine surface (submit/abort/ready/...).
- `scheduler.AdaSpecScheduler`: vLLM `scheduler_cls` choosing K per step (goodput + SLO guard),
  trimming draft lists per request, live policy-file updates.
- `config.engine_kwargs`: vLLM engine arguments, plugin mode or config-only (static K table).
- `kplan`: the pure K-planning math shared by the scheduler and the config-only table.

Only `scheduler` and `engine.VllmEngine.start` import vLLM; the rest imports without it.
"""

from adaspec.backends.vllm.config import SCHEDULER_CLS, VllmSettings, engine_kwargs
from adaspec.backends.vllm.kplan import KPlan, PositionAcceptance, k_table, plan_k
from adaspec.backends.vllm.version import PINNED_VLLM, VllmVersionError, check_vllm_version

__all__ = [
    "PINNED_VLLM",
    "SCHEDULER_CLS",
    "KPlan",
    "PositionAcceptance",
    "VllmSettings",
    "VllmVersionError",
    "check_vllm_version",
    "engine_kwargs",
    "k_table",
    "plan_k",
]
