"""The events that echo this shim's own image record writes.

containerd publishes an ImageCreate or ImageUpdate for every record the shim
writes itself. Reading each one back (Images.Get, then the manifest and config
from the content store) costs a dozen round trips just as a pull returns, the
moment kubelet and critest ask ImageStatus. A write announced here is skipped
once when its event arrives: the store already holds what the write said.
Another client's change to the same name still arrives as an event of its own
and is read back, so whichever event comes last, the store ends up with
containerd's current record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# An echo not seen by then is not coming (the event stream was lost; the reload
# that follows a loss clears every expectation anyway).
ECHO_TTL = 30.0
# Names with an expectation, past which expired ones are swept on the next write.
SWEEP_AT = 1024


class WriteEchoes:
    def __init__(self, ttl: float = ECHO_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        # name -> deadlines of the writes whose events have not arrived, oldest first.
        self._expected: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return sum(len(deadlines) for deadlines in self._expected.values())

    @contextmanager
    def expecting(self, name: str) -> Iterator[None]:
        """Around one write of record `name`. Announced before the write is sent: its
        event may be dispatched before the reply reaches the caller. A write that
        raises is forgotten, whether or not containerd made it: its event, if any,
        is then read back like a stranger's, which is always correct."""
        if len(self._expected) > SWEEP_AT:
            self._sweep()
        deadline = self._clock() + self._ttl
        self._expected.setdefault(name, []).append(deadline)
        try:
            yield
        except BaseException:
            deadlines = self._expected.get(name, [])
            if deadline in deadlines:
                deadlines.remove(deadline)
            if not deadlines:
                self._expected.pop(name, None)
            raise

    def claim(self, name: str) -> bool:
        """Whether an event for `name` is the echo of a write of ours (consumed)."""
        deadlines = self._expected.get(name)
        if deadlines is None:
            return False
        now = self._clock()
        while deadlines and deadlines[0] < now:
            deadlines.pop(0)
        claimed = bool(deadlines)
        if claimed:
            deadlines.pop(0)
        if not deadlines:
            del self._expected[name]
        return claimed

    def forget(self, name: str) -> None:
        """The record was deleted: an echo still to come for it must be read back
        (it finds the record gone, or re-created by whoever came last)."""
        self._expected.pop(name, None)

    def clear(self) -> None:
        """containerd is being read whole again: nothing is expected any more."""
        self._expected.clear()

    def _sweep(self) -> None:
        now = self._clock()
        for name in list(self._expected):
            live = [d for d in self._expected[name] if d >= now]
            if live:
                self._expected[name] = live
            else:
                del self._expected[name]


__all__ = ["WriteEchoes"]
