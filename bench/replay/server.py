"""Start and stop `adaspec serve` processes for the real-engine benchmarks (loopback only)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if the benchmark process dies (no orphaned engines)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EngineServer:
    """`adaspec serve --port P [--spec-policy KIND] --policy-file F [extra...]` as a child process.

    Use as a context manager; waits until the engine is ready (model load takes a while on
    CPU; GET /ready), stops with SIGTERM then SIGKILL. The log goes to `log_path`.
    """

    def __init__(
        self,
        spec_policy: str | None,
        policy_file: Path,
        log_path: Path,
        extra: list[str] | None = None,
        port: int | None = None,
        ready_timeout_s: float = 600.0,
    ) -> None:
        self.port = port or free_port()
        self.cmd = [
            sys.executable, "-m", "adaspec.cli", "serve",
            "--host", "127.0.0.1", "--port", str(self.port),
            *(["--spec-policy", spec_policy] if spec_policy else []),
            "--policy-file", str(policy_file),
            *(extra or []),
        ]  # fmt: skip
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def __enter__(self) -> EngineServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            ["nice", *self.cmd],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"engine exited with {self.proc.returncode} before it was ready; "
                    f"see {self.log_path}"
                )
            try:
                if httpx.get(self.root_url + "/ready", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(
            f"engine not ready after {self.ready_timeout_s:.0f} s; see {self.log_path}"
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
