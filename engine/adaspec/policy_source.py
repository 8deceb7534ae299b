"""The live Policy: a JSON file watched for changes, or a fixed default from CLI flags.

The operator writes the policy into a ConfigMap mounted into the engine pod. Kubernetes updates
such a mount by swapping a `..data` symlink, so mtime and inotify on the file are unreliable:
we poll (default 1 s) and compare a hash of the *content*.

Rules (DESIGN §3):
- a valid file becomes the live policy; the engine applies it at the next step boundary;
- an invalid file (bad JSON, a field out of range — the ContractError message names the field)
  keeps the last good policy, increments `specserve_policy_reload_errors_total`, sets
  `specserve_policy_invalid` to 1 and logs one line; the next valid file clears the flag;
- a missing file keeps the last good policy (logged once; a mount can briefly vanish);
- a *lower* generation than the live one is still applied (the file is the source of truth: an
  operator that was reinstalled restarts at 0) but logged as a warning, never silently;
- the same content is never re-applied, so the generation gauge only moves on real changes.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from adaspec.contract import ContractError, Policy, SpecMode, parse_policy

log = logging.getLogger("adaspec.policy_source")

DEFAULT_TPOT_SLO_MS = 500.0
"""Default SLO for the built-in CPU pair: target decode ≈ 250 ms/token on 2 cores (MODELS.md)."""
DEFAULT_MAX_DRAFT = 8
DEFAULT_FIXED_DRAFT = 3


def default_policy(
    mode: str = "adaptive",
    tpot_slo_ms: float = DEFAULT_TPOT_SLO_MS,
    tpot_budget_ms: float | None = None,
    max_draft_tokens: int = DEFAULT_MAX_DRAFT,
    fixed_draft_tokens: int = DEFAULT_FIXED_DRAFT,
) -> Policy:
    """The policy used without a policy file (generation 0; budget defaults to the SLO)."""
    return Policy(
        generation=0,
        mode=SpecMode(mode),
        tpot_slo_ms=tpot_slo_ms,
        tpot_budget_ms=tpot_budget_ms if tpot_budget_ms is not None else tpot_slo_ms,
        max_draft_tokens=max_draft_tokens,
        fixed_draft_tokens=fixed_draft_tokens,
        reason="default from command-line flags",
    )


class PolicySource:
    """Holds the live policy; `poll()` re-reads the file, `start()` polls in a daemon thread.

    `version` increases by one each time a new policy becomes live, so the engine loop can check
    cheaply at each step boundary whether to re-select its SpecPolicy. The engine attaches its
    metrics with `attach(on_error, on_invalid)`; rejections seen before that are replayed.
    """

    def __init__(
        self, default: Policy, path: Path | None = None, *, poll_interval_s: float = 1.0
    ) -> None:
        self.path = path
        self.poll_interval_s = poll_interval_s
        self._on_error: Callable[[], None] | None = None
        self._on_invalid: Callable[[bool], None] | None = None
        self.error_count = 0
        self._lock = threading.Lock()
        self._policy = default
        self._version = 0
        self._last_digest: bytes | None = None
        self._invalid = False
        self._missing_logged = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if path is not None:
            self.poll()

    def attach(self, on_error: Callable[[], None], on_invalid: Callable[[bool], None]) -> None:
        """Report every rejected file to `on_error` and validity changes to `on_invalid`."""
        with self._lock:
            self._on_error, self._on_invalid = on_error, on_invalid
            replay, invalid = self.error_count, self._invalid
        for _ in range(replay):
            on_error()
        on_invalid(invalid)

    @property
    def version(self) -> int:
        with self._lock:
            return self._version

    @property
    def invalid(self) -> bool:
        with self._lock:
            return self._invalid

    def current(self) -> tuple[Policy, int]:
        """The live policy and its version."""
        with self._lock:
            return self._policy, self._version

    def set(self, policy: Policy) -> None:
        """Make `policy` live (tests, or embedding without a file)."""
        with self._lock:
            self._policy = policy
            self._version += 1

    def poll(self) -> bool:
        """Re-read the file; return True when a new policy became live."""
        if self.path is None:
            return False
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            if not self._missing_logged:
                log.warning("policy file %s not found; keeping the current policy", self.path)
                self._missing_logged = True
            return False
        except OSError as e:
            self._reject(None, f"cannot read policy file {self.path}: {e}")
            return False
        self._missing_logged = False
        digest = hashlib.sha256(data).digest()
        if digest == self._last_digest:
            return False
        try:
            policy = parse_policy(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            self._reject(digest, f"policy file {self.path} is not UTF-8: {e}")
            return False
        except ContractError as e:
            self._reject(digest, f"policy file {self.path} rejected, keeping last good policy: {e}")
            return False
        self._last_digest = digest
        with self._lock:
            old = self._policy
            self._policy = policy
            self._version += 1
            was_invalid, self._invalid = self._invalid, False
        if policy.generation < old.generation:
            log.warning(
                "policy generation went backwards (%d -> %d); applying the file anyway",
                old.generation,
                policy.generation,
            )
        log.info(
            "policy generation %d applied: mode=%s sloMs=%g budgetMs=%g maxDraft=%d reason=%r",
            policy.generation,
            policy.mode.value,
            policy.tpot_slo_ms,
            policy.tpot_budget_ms,
            policy.max_draft_tokens,
            policy.reason,
        )
        if was_invalid and self._on_invalid:
            self._on_invalid(False)
        return True

    def _reject(self, digest: bytes | None, message: str) -> None:
        # Remember the bad content so an unchanged bad file is counted and logged once.
        self._last_digest = digest
        log.error("%s", message)
        with self._lock:
            was_invalid, self._invalid = self._invalid, True
            self.error_count += 1
        if self._on_error:
            self._on_error()
        if not was_invalid and self._on_invalid:
            self._on_invalid(True)

    # ------------------------------------------------------------------ background polling

    def start(self) -> None:
        if self.path is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="policy-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll()
            except Exception:  # never let the watcher die silently
                log.exception("policy watcher failed; retrying")
