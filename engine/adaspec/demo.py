"""`adaspec run-demo`: serve the default model pair and stream one demo request.

Obtains and caches the built-in pair on first use (progress bar), starts the server in this
process on 127.0.0.1:8000 (or a free port if 8000 is taken), waits for /ready, prints how to
query it, streams a short chat request token by token, prints tokens per target forward and the
draft acceptance rate from /metrics, and keeps serving until Ctrl-C (`--exit-after-demo` stops
after the demo, for CI). Accepts every `adaspec serve` flag.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from adaspec import metric_names as mn
from adaspec.contract import ContractError
from adaspec.server import cli as serve_cli

DEMO_PROMPT = "Write a Python function that checks whether a number is prime."


def add_arguments(p: argparse.ArgumentParser) -> None:
    serve_cli.add_arguments(p)
    d = p.add_argument_group("demo")
    d.add_argument("--exit-after-demo", action="store_true", help="stop after the demo request")
    d.add_argument("--prompt", default=DEMO_PROMPT, help="the demo chat message")
    d.add_argument("--demo-max-tokens", type=int, default=64, help="default: 64")
    d.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for /ready")


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def usage_text(base: str, model: str) -> str:
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}
    )
    return f"""
SpecServe is serving {model!r} at {base}
  curl:   curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' \\
            -d '{body}'
  python: from openai import OpenAI
          client = OpenAI(base_url="{base}/v1", api_key="unused")
          r = client.chat.completions.create(model="{model}",
                  messages=[{{"role": "user", "content": "Hello!"}}], max_tokens=32)
          print(r.choices[0].message.content)
  metrics: {base}/metrics   probes: {base}/health {base}/ready
"""


def wait_ready(base: str, timeout_s: float, failed: threading.Event) -> bool:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5.0) as c:
        while time.monotonic() < deadline and not failed.is_set():
            try:
                if c.get(f"{base}/ready").status_code == 200:
                    return True
                h = c.get(f"{base}/health")
                if h.status_code == 503:
                    return False
            except httpx.TransportError:
                pass
            time.sleep(0.5)
    return False


def stream_demo(base: str, model: str, prompt: str, max_tokens: int) -> tuple[int, float]:
    """Stream one chat request, printing text as it arrives; return (tokens, seconds)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    t0 = time.monotonic()
    print(f"\n> {prompt}\n", flush=True)
    with (
        httpx.Client(timeout=None) as c,
        c.stream("POST", f"{base}/v1/chat/completions", json=body) as r,
    ):
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"demo request failed: HTTP {r.status_code}: {r.text}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk: dict[str, Any] = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"demo request failed: {chunk['error'].get('message')}")
            for ch in chunk.get("choices", []):
                sys.stdout.write(ch.get("delta", {}).get("content") or "")
                sys.stdout.flush()
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    return tokens, time.monotonic() - t0


def scrape(base: str) -> dict[str, float]:
    """Label-free samples by name (counters, gauges, histogram _sum/_count)."""
    text = httpx.get(f"{base}/metrics", timeout=5.0).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.labels:
                out[s.name] = s.value
    return out


def summary(m: dict[str, float]) -> str:
    gen = m.get(mn.GENERATED_TOKENS, 0.0)
    fwd = m.get(mn.TARGET_FORWARDS, 0.0)
    ver = m.get(mn.DRAFT_VERIFIED, 0.0)
    acc = m.get(mn.DRAFT_ACCEPTED, 0.0)
    per_fwd = gen / fwd if fwd else float("nan")
    rate = acc / ver if ver else float("nan")
    return (
        f"tokens per target forward: {per_fwd:.2f}   draft acceptance: {rate:.0%} "
        f"({acc:.0f}/{ver:.0f} verified draft tokens)"
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from adaspec.server.app import ServerState, create_app

    serve_cli.setup_logging("warning" if args.log_level == "info" else args.log_level)
    problem = serve_cli.check_args(args)
    if problem:
        print(f"adaspec run-demo: {problem}", file=sys.stderr)
        return 2
    try:
        profile = serve_cli.load_profile_arg(args.profile_file)
    except (OSError, ContractError) as e:
        print(f"adaspec run-demo: --profile-file: {e}", file=sys.stderr)
        return 2
    try:  # opened here so a bad path is a usage error, not a failed model load
        step_log = serve_cli.open_step_log(args)  # the engine closes it; process exit otherwise
    except OSError as e:
        why = e.strerror or str(e)
        print(f"adaspec run-demo: --step-log: cannot write {args.step_log}: {why}", file=sys.stderr)
        return 2
    if args.backend == "torch":
        # Obtain the pair in the foreground so the progress bar is the first thing users see.
        from adaspec.models import ModelError, RichProgress, resolve_model

        try:
            for src in (args.target, args.draft):
                if src != "none":
                    resolve_model(src, RichProgress())
        except ModelError as e:
            print(f"adaspec run-demo: {e}", file=sys.stderr)
            return 1
    if not port_is_free(args.host, args.port):
        new = free_port(args.host)
        print(f"port {args.port} is in use; serving on {new} instead", file=sys.stderr)
        args.port = new
    base = f"http://{args.host}:{args.port}"
    state = ServerState(model_name=serve_cli.served_name(args), drain_timeout_s=5.0)
    failed = threading.Event()
    loader = serve_cli.make_loader(
        args, profile, serve_cli.build_policy_source(args), step_log=step_log
    )

    def load(st: ServerState) -> None:
        try:
            loader(st)
        except BaseException:
            failed.set()
            raise

    config = uvicorn.Config(
        create_app(state, load), host=args.host, port=args.port, log_level="warning"
    )
    server = uvicorn.Server(config)
    result = {"rc": 0}

    def demo() -> None:
        try:
            print(f"loading models and starting the engine at {base} ...", flush=True)
            if not wait_ready(base, args.ready_timeout, failed):
                why = state.load_error or "timeout"
                print(f"adaspec run-demo: server did not become ready ({why})", file=sys.stderr)
                result["rc"] = 1
                server.should_exit = True
                return
            print(usage_text(base, state.model_name), flush=True)
            tokens, secs = stream_demo(base, state.model_name, args.prompt, args.demo_max_tokens)
            print(f"\n\n{tokens} tokens in {secs:.1f} s ({tokens / secs:.1f} tokens/s)")
            print(summary(scrape(base)), flush=True)
            if args.exit_after_demo:
                server.should_exit = True
            else:
                print("\nstill serving; press Ctrl-C to stop", flush=True)
        except Exception as e:
            print(f"\nadaspec run-demo: {e}", file=sys.stderr)
            result["rc"] = 1
            server.should_exit = True

    threading.Thread(target=demo, name="demo-client", daemon=True).start()
    server.run()
    return result["rc"]
