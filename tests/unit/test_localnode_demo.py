"""`specserve demo`'s pure parts: trace burst scaling, spec overrides, the PNG plot."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from specserve import demo


def _trace(tmp_path: Path) -> Path:
    p = tmp_path / "t.csv"
    p.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.0000000,4808,10\n"
        "2023-11-16 18:17:05.0000000,20,300\n"
        "2023-11-16 18:17:13.0000000,100,1\n"
    )
    return p


def test_burst_keeps_relative_arrivals_and_caps_lengths(tmp_path: Path) -> None:
    burst = demo.load_burst(_trace(tmp_path), n=3, burst_s=5.0, max_tokens=32, prompt_tokens=8)
    assert [round(r.at_s, 3) for r in burst] == [0.0, 1.0, 5.0]  # 10 s squeezed into 5 s
    assert [r.max_tokens for r in burst] == [10, 32, 1]
    assert all(len(r.prompt.split("\n")[1].split()) == 8 for r in burst)
    assert len(demo.load_burst(_trace(tmp_path), 2, 5.0, 32, 8)) == 2


def test_missing_trace_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--trace"):
        demo.load_burst(tmp_path / "nope.csv", 3, 5.0, 32, 8)


def _args(**kw: object) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    ns = p.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_sample_spec_and_overrides() -> None:
    doc = demo.load_spec(_args())
    assert doc["kind"] == "SpecService" and doc["spec"]["profiling"]["enabled"] is True
    assert doc["spec"]["engine"]["gpus"] == 0 and doc["spec"]["engine"]["backend"] == "torch"
    quick = demo.load_spec(_args(scripted=True, slo_ms=250.0))
    assert quick["spec"]["slo"]["tpotMs"] == 250.0
    assert quick["spec"]["engine"]["extraArgs"] == ["--backend", "scripted"]
    assert quick["spec"]["profiling"] == {"enabled": False}
    with pytest.raises(ValueError, match="--slo-ms"):
        demo.load_spec(_args(slo_ms=-1.0))


def test_plot_writes_a_png(tmp_path: Path) -> None:
    run = demo.Run()
    for i in range(5):
        run.samples.append(
            demo.Sample(float(i), 100.0 + i, 120.0, 110.0, 2.0, 0.7, 1 + i // 3, 1.0)
        )
    run.samples.append(demo.Sample(5.0, None, None, None, None, None, None, None))
    out = tmp_path / "p.png"
    demo.plot(run, out, "x")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
