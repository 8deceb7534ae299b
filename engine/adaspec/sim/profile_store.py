"""Profiles shipped with the simulator (engine/adaspec/sim/profiles/*.json).

`h200-7b-0.5b-synthetic` is an ESTIMATE for a GPU-class pair (7B target, 0.5B draft on one
H200) derived from public figures (HBM bandwidth, dense bf16 FLOP/s, typical vLLM decode
latencies), NOT measured here; replace it with a real `adaspec profile` output when one exists.
`cpu-qwen-coder-estimate` is the CPU pair's default time model (plus a prefill model rounded from
one profiler run) with a calibration estimated from MODELS.md; a measured CPU profile (adaspec
profile) should be preferred when available.
"""

from __future__ import annotations

from pathlib import Path

from adaspec.contract import Profile, load_profile

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_builtin_profile(name_or_path: str) -> Profile:
    """A shipped profile by name, or any Profile JSON file by path."""
    path = Path(name_or_path)
    if not path.exists():
        path = PROFILE_DIR / f"{name_or_path}.json"
    if not path.exists():
        raise FileNotFoundError(
            f"profile {name_or_path!r}: no such file and not one of {', '.join(builtin_profiles())}"
        )
    return load_profile(path)
