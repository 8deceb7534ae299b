"""Loopback pod addresses: every pod gets its own 127.0.0.x (Linux routes all of 127/8 to lo)."""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable


class AddressPoolExhaustedError(RuntimeError):
    pass


def _port_free(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


class AddressPool:
    """Hands out 127.<block>.x addresses; never the host's 127.0.0.1.

    `probe_free(ip, ports)` lets the agent skip addresses where one of the pod's ports is taken
    (a leftover process, a second agent); it is injectable for tests.
    """

    def __init__(
        self,
        network: str = "127.0.10.0/24",
        probe_free: Callable[[str, list[int]], bool] | None = None,
    ) -> None:
        net = ipaddress.ip_network(network)
        if not net.is_loopback:
            raise ValueError(f"pod address range {network!r} must be inside 127.0.0.0/8")
        self.network = network
        self._candidates = [str(h) for h in net.hosts() if str(h) != "127.0.0.1"]
        self._used: dict[str, str] = {}  # ip -> pod uid
        self._probe = probe_free or (lambda ip, ports: all(_port_free(ip, p) for p in ports))
        # Pods start on their own threads: without the lock two of them could both probe the
        # same free address before either records it, and the second pod's bind then fails
        # for good (seen once in the e2e suite: 7 restarts, "Address already in use").
        self._lock = threading.Lock()

    def allocate(self, uid: str, ports: list[int] | None = None) -> str:
        with self._lock:
            for ip, owner in self._used.items():
                if owner == uid:
                    return ip
            for ip in self._candidates:
                if ip not in self._used and self._probe(ip, list(ports or [])):
                    self._used[ip] = uid
                    return ip
        raise AddressPoolExhaustedError("no free loopback pod address left")

    def release(self, uid: str) -> None:
        with self._lock:
            for ip in [ip for ip, owner in self._used.items() if owner == uid]:
                del self._used[ip]
