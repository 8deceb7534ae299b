"""Trace parsing (all formats), deterministic scaling, exact-length prompts, the streaming replay
client against a real `adaspec serve --backend scripted` process, and Prometheus parsing."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from adaspec.sim.traces import (
    TRACE_DIR_DEFAULT,
    LengthCaps,
    ScaleSpec,
    Trace,
    TraceError,
    load_arrivals_csv,
    load_azure_csv,
    load_mooncake_jsonl,
    load_trace,
    poisson_trace,
    rate_scaled,
    scale_trace,
    with_lengths_from,
)

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from replay.client import parse_prometheus, replay  # noqa: E402
from replay.prompts import PromptBuilder, WordTokenizer, load_prompt_set  # noqa: E402
from replay.runs import split_trace  # noqa: E402
from replay.server import EngineServer  # noqa: E402

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:03.9799600,4808,10
2023-11-16 18:17:04.0319600,3180,8
2023-11-16 18:17:05.5000000,12,1
"""


def test_azure_csv(tmp_path: Path) -> None:
    f = tmp_path / "a.csv"
    f.write_text(AZURE)
    t = load_azure_csv(f)
    assert len(t) == 3
    np.testing.assert_allclose(t.arrival_s, [0.0, 0.052, 1.52004], atol=1e-6)
    assert t.prompt_len.tolist() == [4808, 3180, 12]
    assert t.output_len.tolist() == [10, 8, 1]


def test_azure_csv_bad_field_is_named(tmp_path: Path) -> None:
    f = tmp_path / "a.csv"
    f.write_text(AZURE.replace("3180", "many"))
    with pytest.raises(TraceError, match=r"a.csv:3: field 'ContextTokens'"):
        load_azure_csv(f)
    f.write_text("time,x\n1,2\n")
    with pytest.raises(TraceError, match="header"):
        load_azure_csv(f)


def test_mooncake_jsonl(tmp_path: Path) -> None:
    f = tmp_path / "m.jsonl"
    rows = [
        {"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0]},
        {"timestamp": 1500, "input_length": 10, "output_length": 0, "hash_ids": []},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    t = load_mooncake_jsonl(f)
    assert t.arrival_s.tolist() == [0.0, 1.5]
    assert t.prompt_len.tolist() == [6758, 10]
    assert t.output_len.tolist() == [500, 1]  # zero-length outputs still produce one token
    f.write_text('{"timestamp": 0, "input_length": 5}\n')
    with pytest.raises(TraceError, match="missing field 'output_length'"):
        load_mooncake_jsonl(f)
    f.write_text("{not json\n")
    with pytest.raises(TraceError, match=r"m\.jsonl:1: not valid JSON"):
        load_mooncake_jsonl(f)


def test_arrival_window_gets_seeded_capped_lengths(tmp_path: Path) -> None:
    f = tmp_path / "w.csv"
    f.write_text("Timestamp\n0.5\n0.1\n2.0\n")
    arr = load_arrivals_csv(f)
    assert arr.tolist() == [0.1, 0.5, 2.0]
    src = Trace(
        "src",
        np.arange(4, dtype=np.float64),
        np.array([100, 5000, 900, 1500]),
        np.array([50, 10, 2000, 10]),
    )
    a = with_lengths_from("w", arr, src, seed=1)
    b = with_lengths_from("w", arr, src, seed=1)
    assert a.prompt_len.tolist() == b.prompt_len.tolist()
    # only (100, 50) fits prompt <= 1024 and prompt + output <= 2048
    assert set(zip(a.prompt_len.tolist(), a.output_len.tolist(), strict=True)) == {(100, 50)}
    with pytest.raises(TraceError, match="no request fits"):
        with_lengths_from("w", arr, src, 0, LengthCaps(max_prompt=10))


@pytest.mark.skipif(not TRACE_DIR_DEFAULT.exists(), reason="shared traces folder not mounted")
@pytest.mark.parametrize(
    ("name", "rows"),
    [
        ("azure-code", 8819),
        ("azure-conv", 19366),
        ("mooncake", 12031),
        ("adaspec-code", 719),
        ("adaspec-conv", 2867),
        ("adaspec-mooncake", 1077),
    ],
)
def test_shared_traces_load(name: str, rows: int) -> None:
    t = load_trace(name)
    assert len(t) == rows  # row counts documented in traces/README.md
    assert t.arrival_s[0] >= 0 and t.prompt_len.min() >= 1


def test_unknown_trace_is_named() -> None:
    with pytest.raises(TraceError, match="unknown trace 'nope'"):
        load_trace("nope")


def test_scaling_is_deterministic_and_does_what_it_says() -> None:
    t = poisson_trace("p", rate=10.0, n=2000, prompt_len=1000, output_len=200, seed=0)
    spec = ScaleSpec(
        window_s=100.0,
        keep_fraction=0.2,
        time_scale=2.0,
        prompt_scale=0.05,
        output_scale=0.5,
        max_output=64,
        max_requests=50,
        seed=3,
    )
    a, b = scale_trace(t, spec), scale_trace(t, spec)
    assert a.rows() == b.rows()
    assert len(a) == 50 and a.arrival_s[0] == 0.0
    assert set(a.prompt_len.tolist()) == {50} and set(a.output_len.tolist()) == {64}
    c = scale_trace(t, spec.model_copy(update={"seed": 4}))
    assert a.rows() != c.rows()
    # thinning keeps about keep_fraction of the window; stretching doubles the gaps
    full = scale_trace(t, ScaleSpec(window_s=100.0))
    thin = scale_trace(t, ScaleSpec(window_s=100.0, keep_fraction=0.2, seed=3))
    assert 0.12 < len(thin) / len(full) < 0.28
    slow = scale_trace(t, ScaleSpec(window_s=100.0, time_scale=2.0))
    np.testing.assert_allclose(slow.arrival_s, 2.0 * full.arrival_s)
    np.testing.assert_allclose(rate_scaled(full, 4.0).arrival_s, full.arrival_s / 4.0)
    with pytest.raises(TraceError, match="leaves no request"):
        scale_trace(t, ScaleSpec(start_s=1e9))


def test_split_trace_covers_every_request_once() -> None:
    t = poisson_trace("p", rate=1.0, n=11, prompt_len=5, output_len=5, seed=0)
    parts = split_trace(t, 3)
    assert [len(p) for p in parts] == [4, 4, 3]
    assert all(p.arrival_s[0] == 0.0 for p in parts)


def test_prompts_have_exact_token_lengths_and_are_seeded() -> None:
    tok = WordTokenizer()
    b = PromptBuilder(tok, load_prompt_set(), seed=0)
    for i, n in enumerate([1, 17, 300, b.corpus_tokens + 5]):
        ids = b.token_ids(i, n)
        assert len(ids) == n
        assert len(tok.encode(b.prompt(i, n))) == n
    assert b.token_ids(3, 40) == PromptBuilder(tok, load_prompt_set(), seed=0).token_ids(3, 40)
    assert b.token_ids(3, 40) != b.token_ids(4, 40)
    with pytest.raises(ValueError, match="prompt length"):
        b.token_ids(0, 0)


def test_parse_prometheus_sums_labels() -> None:
    text = """# HELP x
specserve_draft_tokens_verified_total 12.0
specserve_requests_total{outcome="stop"} 3
specserve_requests_total{outcome="length"} 2
specserve_spec_length_count 7
"""
    m = parse_prometheus(text)
    assert m["specserve_draft_tokens_verified_total"] == 12.0
    assert m["specserve_requests_total"] == 5.0
    assert m["specserve_spec_length_count"] == 7.0


def test_replay_client_against_scripted_server(tmp_path: Path) -> None:
    """Real process, real HTTP, real openai client; the scripted backend needs no weights."""
    policy = tmp_path / "p.json"
    policy.write_text(
        json.dumps({"generation": 1, "mode": "fixed", "tpotSloMs": 500, "tpotBudgetMs": 450})
    )
    trace = Trace("tiny", np.array([0.0, 0.05, 0.3]), np.array([5, 9, 3]), np.array([6, 12, 1]))
    builder = PromptBuilder(WordTokenizer(), load_prompt_set(), seed=0)
    extra = ["--backend", "scripted", "--max-batch", "2"]
    with EngineServer("fixed", policy, tmp_path / "serve.log", extra, ready_timeout_s=60) as srv:
        res = asyncio.run(replay(srv.base_url, trace, builder))
        metrics = parse_prometheus(__import__("httpx").get(srv.metrics_url).text)
    assert [r.error for r in res] == [None, None, None]
    recs = [r.record for r in res]
    assert all(r is not None for r in recs)
    assert [r.output_len for r in recs if r] == [6, 12, 1]
    assert [r.prompt_len for r in recs if r] == [5, 9, 3]  # ids sent as ids: exact lengths
    for r in recs:
        assert r is not None and r.arrival_s <= r.first_token_s <= r.finish_s
    assert metrics.get("specserve_draft_tokens_verified_total", 0.0) > 0
