"""Container path → host path mapping (processes cannot mount, so paths are rewritten).

A pod's volume mounts and its termination-log path are mapped to directories/files under the
pod's host work dir. Every command argument and env value is rewritten: an occurrence of a mount
path at the start of the value, or after `=` (as in `--flag=/etc/x/y`), followed by `/` or the
end of the value, is replaced by the host path. Longest mount paths win. The same mapping is
exported to the process as JSON in SPECSERVE_PATH_MAP for code that builds paths itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

PATH_MAP_ENV = "SPECSERVE_PATH_MAP"


@dataclass(frozen=True)
class PathMap:
    """Ordered (container path → host path) pairs, longest container path first."""

    pairs: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, mapping: Mapping[str, str]) -> PathMap:
        cleaned: dict[str, str] = {}
        for container, host in mapping.items():
            if not container.startswith("/"):
                raise ValueError(f"mountPath: {container!r} must be an absolute path")
            c = container.rstrip("/") or "/"
            cleaned[c] = host.rstrip("/") or "/"
        return cls(tuple(sorted(cleaned.items(), key=lambda kv: len(kv[0]), reverse=True)))

    def map_path(self, path: str) -> str:
        """Host path for a container path (unchanged when no mount covers it)."""
        for container, host in self.pairs:
            if path == container:
                return host
            if container == "/":
                return host + path
            if path.startswith(container + "/"):
                return host + path[len(container) :]
        return path

    def rewrite(self, value: str) -> str:
        """Rewrite a whole argument/env value, or the part after the first `=`."""
        if value.startswith("/"):
            return self.map_path(value)
        key, sep, rest = value.partition("=")
        if sep and rest.startswith("/"):
            return f"{key}={self.map_path(rest)}"
        return value

    def rewrite_all(self, values: Iterable[str]) -> list[str]:
        return [self.rewrite(v) for v in values]

    def to_env(self) -> str:
        return json.dumps(dict(self.pairs), sort_keys=True)
