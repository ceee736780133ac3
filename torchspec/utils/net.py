"""Free TCP ports for the services we start (engines, Mooncake master, rendezvous)."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """n distinct free ports (all bound at once, so two calls in a row cannot hand out the same one)."""
    socks = [socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = LOOPBACK) -> int:
    return free_ports(1, host)[0]


def taken_ports(ports, host: str = LOOPBACK) -> list[int]:
    """Those of `ports` that cannot be bound on `host` now (in use by another process, or out of range). Bound
    with SO_REUSEADDR, as the servers that will take them bind: a port of a run that just ended (its
    connections in TIME_WAIT) is free, one another process listens on is not."""
    taken = []
    for port in ports:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, int(port)))
            except (OSError, OverflowError):
                taken.append(int(port))
    return taken
