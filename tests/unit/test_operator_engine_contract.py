"""The commands the operator puts into pods parse with the engine's own CLI parsers.

The operator and the engine are built separately; this is what keeps the pod commands and
`adaspec profile` / `adaspec serve` from drifting apart (a wrong flag would only show up as a
crash-looping pod otherwise).
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from adaspec.profile import cli as profile_cli
from adaspec.server import cli as serve_cli
from specserve import resources as r
from specserve.api import SpecServiceSpec

OWNER = {"apiVersion": "specserve.io/v1alpha1", "kind": "SpecService",
         "metadata": {"name": "chat", "namespace": "ns", "uid": "u-1"}}  # fmt: skip


def torch_spec(**over: Any) -> SpecServiceSpec:
    raw: dict[str, Any] = {
        "targetModel": {"name": "qwen2.5-coder-1.5b-instruct"},
        "draftModel": {"name": "qwen2.5-coder-0.5b-instruct"},
        "slo": {"tpotMs": 300},
        "engine": {"backend": "torch", "gpus": 0},
        "profiling": {"batchSizes": [1, 2], "contextLens": [128, 512]},
    }
    raw.update(over)
    return SpecServiceSpec.model_validate(raw)


def parse(module: Any, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="adaspec")
    module.add_arguments(parser)
    return parser.parse_args(argv)


def args_of(obj: dict[str, Any], subcommand: str) -> list[str]:
    c = obj["spec"]["template"]["spec"]["containers"][0]
    argv = [*c["command"][1:], *c["args"]]
    assert argv[0] == subcommand
    return list(argv[1:])


def test_profiling_job_command_parses_with_adaspec_profile() -> None:
    ns = parse(profile_cli, args_of(r.profiling_job(OWNER, torch_spec()), "profile"))
    assert ns.target == "qwen2.5-coder-1.5b-instruct"
    assert ns.print_json and str(ns.termination_log) == "/dev/termination-log"


def test_engine_deployment_command_parses_with_adaspec_serve() -> None:
    s = torch_spec()
    dep = r.engine_deployment(OWNER, s, profile_digest="abc123")
    ns = parse(serve_cli, args_of(dep, "serve"))
    assert ns.host == "0.0.0.0"
    assert str(ns.policy_file).endswith("policy.json")
    assert str(ns.profile_file).endswith("profile.json")


def test_revision_is_rejected_until_the_engine_can_pin_one() -> None:
    from specserve.validation import validate_spec

    raw = torch_spec(targetModel={"name": "x", "revision": "v1"}).model_dump(by_alias=True)
    result = validate_spec(raw)
    assert not result.ok
    assert "spec.targetModel.revision" in result.message()


@pytest.mark.parametrize("flag", ["--context-lens", "--target-revision"])
def test_old_flags_are_not_in_the_pod_commands(flag: str) -> None:
    job = r.profiling_job(OWNER, torch_spec())
    assert flag not in args_of(job, "profile")


def test_a_profiling_grid_too_small_to_fit_is_rejected_up_front() -> None:
    from specserve.validation import validate_spec

    raw = torch_spec(profiling={"batchSizes": [1], "contextLens": [128]}).model_dump(by_alias=True)
    result = validate_spec(raw)
    assert not result.ok
    assert "spec.profiling.batchSizes" in result.message()
    assert "at least 6" in result.message()
