"""Ports for tests: taken from the kernel, never fixed or random numbers, so
parallel runs (and other helpers' test runs on this machine) do not collide."""

from __future__ import annotations

import socket


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM, host: str = "0.0.0.0") -> int:
    """A port of `kind` (TCP or UDP) on `host` that was free a moment ago."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


__all__ = ["free_port"]
