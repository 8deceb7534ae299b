"""`specserve demo` (`make demo`): the whole SpecServe loop on one machine, no cluster, no GPU.

Starts a local Kubernetes 1.20.2 control plane (binaries from `make envtest`), the local node
agent (pods as local processes), a real Prometheus and the operator; applies
deploy/local/specservice.yaml (the default CPU model pair, a TPOT SLO this machine meets);
waits for Ready (profiling Job → engine pod); replays a short burst of a public trace through
the OpenAI API at the Service's endpoints; shows a live view of P90 TPOT vs SLO, speculative
length, acceptance, policy generation and conditions; writes a PNG of the run; and stops every
process it started (by PID) on exit or Ctrl-C. `--scripted` runs the weight-free engine backend
(a quick smoke run of the control loop without the models).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import logging
import math
import shutil
import signal
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import yaml

from specserve.localnode.stack import REPO_ROOT, LocalStack, service_endpoints, wait_for
from specserve.promlocal import PrometheusSetupError

SAMPLE = REPO_ROOT / "deploy" / "local" / "specservice.yaml"
TRACES = REPO_ROOT.parent / "shared" / "traces"
DEFAULT_TRACE = TRACES / "AzureLLMInferenceTrace_conv.csv"
WORDS = ["def", "value", "return", "list", "index", "sort"]
WORDS += ["key", "data", "item", "count", "total", "result"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", type=Path, default=SAMPLE, help="SpecService YAML to apply")
    p.add_argument("--slo-ms", type=float, help="override spec.slo.tpotMs")
    p.add_argument("--scripted", action="store_true", help="weight-free engine (smoke run)")
    p.add_argument(
        "--no-profiling", action="store_true", help="skip the profiling Job (engine defaults)"
    )
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Azure-format trace CSV")
    p.add_argument("--requests", type=int, default=16, help="requests replayed from the trace")
    p.add_argument("--burst-seconds", type=float, default=60.0, help="squeeze arrivals into this")
    p.add_argument("--max-tokens", type=int, default=32, help="cap on generated tokens/request")
    p.add_argument("--prompt-tokens", type=int, default=48, help="cap on prompt length (words)")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--tail-seconds", type=float, default=20.0, help="keep watching after burst")
    p.add_argument("--ready-timeout", type=float, default=1800.0)
    p.add_argument("--plot", type=Path, default=Path("specserve-demo.png"))
    p.add_argument("--work-dir", type=Path, help="keep logs here (default: a temp dir)")
    p.add_argument("--control-interval", type=float, default=5.0, help="operator loop (s)")


# ----------------------------------------------------------------------------- trace


@dataclass(frozen=True)
class Request:
    at_s: float
    prompt: str
    max_tokens: int


def load_burst(
    path: Path, n: int, burst_s: float, max_tokens: int, prompt_tokens: int
) -> list[Request]:
    """The first `n` rows of an Azure-format trace, arrivals scaled into `burst_s` seconds."""
    if not path.exists():
        raise FileNotFoundError(f"--trace: {path} not found")
    rows: list[tuple[float, int, int]] = []
    with path.open() as f:
        for row in itertools.islice(csv.DictReader(f), n):
            t = time.mktime(time.strptime(row["TIMESTAMP"][:19], "%Y-%m-%d %H:%M:%S"))
            frac = float("0." + row["TIMESTAMP"][20:]) if len(row["TIMESTAMP"]) > 20 else 0.0
            rows.append((t + frac, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    if not rows:
        raise ValueError(f"--trace: {path} has no rows")
    t0, span = rows[0][0], max(rows[-1][0] - rows[0][0], 1e-9)
    scale = burst_s / span
    out = []
    for i, (t, ctx, gen) in enumerate(rows):
        words = [WORDS[(i + j) % len(WORDS)] for j in range(min(ctx, prompt_tokens))]
        prompt = "# task " + str(i) + "\n" + " ".join(words) + "\ndef solve("
        out.append(Request((t - t0) * scale, prompt, max(1, min(gen, max_tokens))))
    return out


# ----------------------------------------------------------------------------- observation


@dataclass
class Sample:
    t: float
    tpot_p90_ms: float | None
    slo_ms: float | None
    budget_ms: float | None
    spec_len: float | None
    acceptance: float | None
    generation: int | None
    engine_generation: float | None


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    sent: int = 0
    done: int = 0
    failed: int = 0
    phase: str = "-"
    conditions: str = "-"
    events: list[str] = field(default_factory=list)


def _scalar(prom_url: str, q: str) -> float | None:
    try:
        r = httpx.get(f"{prom_url}/api/v1/query", params={"query": q}, timeout=3)
        res = r.json()["data"]["result"]
    except (httpx.HTTPError, KeyError, ValueError):
        return None
    if not res:
        return None
    v = float(res[0]["value"][1])
    return None if math.isnan(v) or math.isinf(v) else v


def observe(stack: LocalStack, name: str, ns: str, t0: float, run: Run) -> Sample:
    cr = stack.kube.request(
        "GET", f"/apis/specserve.io/v1alpha1/namespaces/{ns}/specservices/{name}"
    )
    st = cr.get("status") or {}
    pol = st.get("policy") or {}
    run.phase = st.get("phase") or "-"
    run.conditions = "  ".join(
        f"{c['type']}={c['status']}" + (f"({c['reason']})" if c["status"] != "True" else "")
        for c in st.get("conditions") or []
    )
    sel = f'namespace="{ns}", specserve_io_service="{name}"'
    url = stack.prometheus.url if stack.prometheus else ""
    p90 = _scalar(
        url,
        "histogram_quantile(0.9, sum by (le) "
        f"(rate(specserve_request_tpot_seconds_bucket{{{sel}}}[30s])))",
    )
    acc = _scalar(
        url,
        f"sum(rate(specserve_draft_tokens_accepted_total{{{sel}}}[30s])) / "
        f"sum(rate(specserve_draft_tokens_verified_total{{{sel}}}[30s]))",
    )
    k = _scalar(
        url,
        f"sum(rate(specserve_spec_length_sum{{{sel}}}[30s])) / "
        f"sum(rate(specserve_spec_length_count{{{sel}}}[30s]))",
    )
    eg = _scalar(url, f"min(specserve_policy_generation{{{sel}}})")
    s = Sample(
        t=time.monotonic() - t0,
        tpot_p90_ms=p90 * 1000 if p90 is not None else None,
        slo_ms=pol.get("tpotSloMs"),
        budget_ms=pol.get("tpotBudgetMs"),
        spec_len=k,
        acceptance=acc,
        generation=pol.get("generation"),
        engine_generation=eg,
    )
    if run.samples and s.generation != run.samples[-1].generation and s.generation is not None:
        run.events.append(
            f"t={s.t:5.0f}s policy generation {s.generation}: {pol.get('reason', '')}"
        )
    run.samples.append(s)
    return s


def _fmt(v: float | None, unit: str = "", digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}{unit}"


def render(run: Run, name: str) -> Any:
    from rich.panel import Panel
    from rich.table import Table

    s = run.samples[-1] if run.samples else None
    t = Table(title=f"SpecService {name}  phase={run.phase}", expand=True)
    for col in (
        "t",
        "P90 TPOT",
        "SLO",
        "budget",
        "spec len",
        "acceptance",
        "policy gen",
        "engine gen",
    ):
        t.add_column(col, justify="right")
    for x in run.samples[-8:]:
        over = x.tpot_p90_ms is not None and x.slo_ms is not None and x.tpot_p90_ms > x.slo_ms
        t.add_row(
            f"{x.t:.0f}s",
            f"[red]{_fmt(x.tpot_p90_ms, ' ms')}[/]" if over else _fmt(x.tpot_p90_ms, " ms"),
            _fmt(x.slo_ms, " ms", 0),
            _fmt(x.budget_ms, " ms", 0),
            _fmt(x.spec_len, "", 2),
            _fmt(x.acceptance, "", 2),
            str(x.generation if x.generation is not None else "-"),
            _fmt(x.engine_generation, "", 0),
        )
    footer = (
        f"requests sent {run.sent}  done {run.done}  failed {run.failed}\n"
        f"{run.conditions}\n" + "\n".join(run.events[-4:])
    )
    del s
    from rich.console import Group

    return Group(t, Panel(footer, title="conditions / policy changes"))


def plot(run: Run, path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [s.t for s in run.samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    ax = axes[0]
    ax.plot(ts, [s.tpot_p90_ms for s in run.samples], label="P90 TPOT (Prometheus)")
    ax.plot(ts, [s.slo_ms for s in run.samples], "--", label="SLO")
    ax.plot(ts, [s.budget_ms for s in run.samples], ":", label="policy budget")
    ax.set_ylabel("ms")
    ax.legend(loc="best")
    ax.set_title(f"SpecService {name}: local loop")
    ax = axes[1]
    ax.plot(ts, [s.spec_len for s in run.samples], label="mean speculative length")
    ax.plot(ts, [s.acceptance for s in run.samples], label="acceptance rate")
    ax.legend(loc="best")
    ax = axes[2]
    ax.step(ts, [s.generation for s in run.samples], where="post", label="policy generation (CR)")
    ax.step(ts, [s.engine_generation for s in run.samples], where="post", label="engine generation")
    ax.set_xlabel("seconds since the SpecService was applied")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- load


def replay(
    stack: LocalStack, name: str, ns: str, burst: list[Request], concurrency: int, run: Run
) -> threading.Thread:
    """Send the burst (in a background thread) round-robin over the Service's endpoints."""
    eps = service_endpoints(stack.kube, ns, name)
    model = httpx.get(f"http://{eps[0]}:8000/v1/models", timeout=10).json()["data"][0]["id"]
    start = time.monotonic()
    counter = itertools.count()

    def one(req: Request) -> None:
        delay = req.at_s - (time.monotonic() - start)
        if delay > 0:
            time.sleep(delay)
        ip = eps[next(counter) % len(eps)]
        run.sent += 1
        try:
            r = httpx.post(
                f"http://{ip}:8000/v1/completions",
                json={"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens},
                timeout=600,
            )
            r.raise_for_status()
            run.done += 1
        except httpx.HTTPError as e:
            run.failed += 1
            run.events.append(f"request failed: {e}")

    def all_of_them() -> None:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(one, burst))

    t = threading.Thread(target=all_of_them, daemon=True)
    t.start()
    return t


# ----------------------------------------------------------------------------- main


def load_spec(args: argparse.Namespace) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(args.spec.read_text())
    spec = doc["spec"]
    if args.slo_ms is not None:
        if args.slo_ms <= 0:
            raise ValueError("--slo-ms must be > 0")
        spec["slo"]["tpotMs"] = args.slo_ms
    if args.no_profiling:
        spec["profiling"] = {"enabled": False}
    if args.scripted:
        spec["targetModel"] = {"name": "scripted-target"}
        spec["draftModel"] = {"name": "scripted-draft"}
        spec["engine"]["extraArgs"] = ["--backend", "scripted"]
        spec["engine"].pop("resources", None)
        spec["profiling"] = {"enabled": False}
    return doc


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    logging.basicConfig(level=logging.WARNING)
    # the loopback API server self-signs its serving certificate; TLS checks are off on purpose
    warnings.filterwarnings("ignore", message="Unverified HTTPS request")
    try:
        doc = load_spec(args)
        burst = load_burst(
            args.trace, args.requests, args.burst_seconds, args.max_tokens, args.prompt_tokens
        )
    except (OSError, ValueError, KeyError) as e:
        console.print(f"[red]demo: {e}[/]")
        return 2
    name, ns = doc["metadata"]["name"], doc["metadata"].get("namespace", "default")

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    wall0 = time.monotonic()
    stack = LocalStack(args.work_dir)
    runinfo = Run()
    ok = False
    try:
        console.print(f"[bold]SpecServe local loop[/] (work dir {stack.work_dir})")
        stack.start(
            operator_env={
                "SPECSERVE_CONTROL_INTERVAL_SECONDS": str(args.control_interval),
                "SPECSERVE_PROM_WINDOW": "30s",
            }
        )
        console.print(f"started {stack.timings}; pids {stack.pids()}")
        stack.kube.request("POST", f"/apis/specserve.io/v1alpha1/namespaces/{ns}/specservices", doc)
        t0 = time.monotonic()
        with Live(render(runinfo, name), console=console, refresh_per_second=2) as live:
            while True:
                observe(stack, name, ns, t0, runinfo)
                live.update(render(runinfo, name))
                if runinfo.phase == "Ready":
                    break
                if runinfo.phase == "Failed":
                    console.print(f"[red]SpecService failed: {runinfo.conditions}[/]")
                    return 1
                if time.monotonic() - t0 > args.ready_timeout:
                    console.print("[red]timed out waiting for Ready[/]")
                    return 1
                time.sleep(2)
            ready_s = time.monotonic() - t0
            runinfo.events.append(f"t={ready_s:5.0f}s Ready; replaying {len(burst)} requests")
            wait_for("service endpoints", lambda: service_endpoints(stack.kube, ns, name))
            loader = replay(stack, name, ns, burst, args.concurrency, runinfo)
            end_at: float | None = None
            while end_at is None or time.monotonic() < end_at:
                observe(stack, name, ns, t0, runinfo)
                live.update(render(runinfo, name))
                if end_at is None and not loader.is_alive():
                    end_at = time.monotonic() + args.tail_seconds
                time.sleep(2)
        plot(runinfo, args.plot, name)
        console.print(
            f"Ready after {ready_s:.0f}s; {runinfo.done}/{len(burst)} requests ok, "
            f"{runinfo.failed} failed; plot: {args.plot}; wall {time.monotonic() - wall0:.0f}s"
        )
        ok = runinfo.failed == 0
        return 0 if ok else 1
    except (FileNotFoundError, PrometheusSetupError) as e:
        console.print(f"[red]demo: {e}[/]")
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; stopping everything")
        if runinfo.samples:
            plot(runinfo, args.plot, name)
        return 130
    finally:
        pids = stack.pids()
        stack.stop()
        console.print(f"stopped {len(pids)} processes: {sorted(pids)}")
        if args.work_dir is None and ok:
            shutil.rmtree(stack.work_dir, ignore_errors=True)
        elif not ok:
            console.print(f"logs kept in {stack.work_dir}")
