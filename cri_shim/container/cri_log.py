"""The CRI container log format kubelet reads (`kubectl logs`).

Each line: `<RFC3339Nano time> <stdout|stderr> <F|P> <text>\n`. F marks the
end of a line the process wrote; P a fragment (a line longer than the buffer,
or bytes still waiting for their newline when the stream closes).
"""

from __future__ import annotations

import time

# Lines longer than this are split into P fragments (containerd uses 16 KiB).
MAX_LINE_BYTES = 16 * 1024
FULL = b"F"
PARTIAL = b"P"


def rfc3339_nano(ns: int | None = None) -> bytes:
    """Go's time.RFC3339Nano in UTC: fractional seconds without trailing zeros."""
    now = time.time_ns() if ns is None else ns
    seconds, nanos = divmod(now, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    fraction = f"{nanos:09d}".rstrip("0")
    return (f"{stamp}.{fraction}Z" if fraction else f"{stamp}Z").encode()


def format_entry(stream: bytes, tag: bytes, text: bytes, ns: int | None = None) -> bytes:
    return b" ".join((rfc3339_nano(ns), stream, tag, text)) + b"\n"


class LineSplitter:
    """Turns arbitrary chunks of a process's output into CRI log entries."""

    def __init__(self, stream: str, max_line: int = MAX_LINE_BYTES) -> None:
        self.stream = stream.encode()
        self.max_line = max_line
        self._pending = bytearray()

    @property
    def pending(self) -> int:
        """Bytes fed but not yet in an entry (a line still waiting for its end)."""
        return len(self._pending)

    def feed(self, chunk: bytes) -> list[bytes]:
        self._pending += chunk
        entries: list[bytes] = []
        while True:
            newline = self._pending.find(b"\n")
            if newline == -1 or newline > self.max_line:
                break
            line = bytes(self._pending[:newline])
            del self._pending[: newline + 1]
            entries.append(format_entry(self.stream, FULL, line))
        while (
            len(self._pending) >= self.max_line
            and self._pending.find(b"\n", 0, self.max_line) == -1
        ):
            fragment = bytes(self._pending[: self.max_line])
            del self._pending[: self.max_line]
            entries.append(format_entry(self.stream, PARTIAL, fragment))
        if self._pending.find(b"\n") != -1:
            entries += self.feed(b"")
        return entries

    def close(self) -> list[bytes]:
        """The unterminated tail, as a partial entry."""
        if not self._pending:
            return []
        tail = bytes(self._pending)
        self._pending.clear()
        return [format_entry(self.stream, PARTIAL, tail)]
