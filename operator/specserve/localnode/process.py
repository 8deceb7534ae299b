"""One container as one local process (own session, output to a log file, killed by group)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from specserve.localnode.env import UnsupportedPodError


def die_with_parent() -> None:
    """preexec_fn: SIGKILL the child when the thread that started it dies (Linux
    prctl(PR_SET_PDEATHSIG)), so a killed agent/demo/test leaves no servers behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def resolve_executable(name: str) -> str:
    """The project's own entry points first (the venv's bin dir), then PATH."""
    if "/" in name:
        return name
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.is_file() and os.access(venv_bin, os.X_OK):
        return str(venv_bin)
    found = shutil.which(name)
    if not found:
        raise UnsupportedPodError(f"command {name!r} is not installed in this environment")
    return found


class LocalProcess:
    """A started container process; `exit_code()` maps death by signal N to 128+N."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path) -> None:
        self.argv = [resolve_executable(argv[0]), *argv[1:]]
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        with log.open("ab") as out:
            self._p = subprocess.Popen(
                self.argv,
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: children die with it
                preexec_fn=die_with_parent,  # worker threads live as long as their pod runs
            )
        self.pid = self._p.pid
        self.started_at = time.time()

    def exit_code(self) -> int | None:
        rc = self._p.poll()
        if rc is None:
            return None
        return 128 - rc if rc < 0 else rc

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, grace_s: float) -> int:
        """SIGTERM the group, SIGKILL after `grace_s`; returns the exit code."""
        if self.exit_code() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self._p.wait(timeout=max(grace_s, 0.0))
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self._p.wait()
        self.signal_group(signal.SIGKILL)  # stragglers in the group
        code = self.exit_code()
        return code if code is not None else -1

    def log_tail(self, limit: int = 8192) -> str:
        try:
            with self.log.open("rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - limit))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""
