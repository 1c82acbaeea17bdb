"""A container's stdio: FIFOs containerd's shim writes to, and the copier
that turns them into the CRI log file.

The read end of each FIFO is opened non-blocking before the task exists,
together with a placeholder write end so that no EOF is seen until the shim
has opened its own; once the task is created the placeholder is dropped and
EOF then means the process (and every child holding its stdout) is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from cri_shim.container.cri_log import LineSplitter
from cri_shim.logs import log_event

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
# Subscribers (attach clients) get raw bytes per stream name, then b"" at its end.
Listener = Callable[[str, bytes], None]


def make_fifo(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISFIFO(os.lstat(path).st_mode):
            path.unlink()
    if not path.exists():
        os.mkfifo(path, 0o600)


class FifoReader:
    """Reads one FIFO with asyncio, without ever blocking the loop."""

    def __init__(self, path: Path, *, hold_open: bool) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._placeholder: int | None = None
        if hold_open:
            self._placeholder = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        self._reader = asyncio.StreamReader(limit=READ_CHUNK * 4)
        self._transport: asyncio.ReadTransport | None = None

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        pipe = os.fdopen(self._fd, "rb", buffering=0)
        self._transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(self._reader), pipe
        )

    def release_placeholder(self) -> None:
        if self._placeholder is not None:
            os.close(self._placeholder)
            self._placeholder = None

    async def read(self) -> bytes:
        return await self._reader.read(READ_CHUNK)

    def close(self) -> None:
        self.release_placeholder()
        if self._transport is not None:
            self._transport.close()
            self._transport = None


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class FifoWriter:
    """Non-blocking writes to a FIFO with asyncio (stdin of a container or exec).

    `close()` may come while a write waits for room (a process that does not
    read its stdin): the write then fails with BrokenPipeError instead of
    touching a closed, possibly reused, descriptor.
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self._waiter: asyncio.Future[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def closed(self) -> bool:
        return self._fd is None

    async def write(self, data: bytes) -> None:
        async with self._lock:
            view = memoryview(data)
            while view:
                fd = self._fd
                if fd is None:
                    raise BrokenPipeError("stdin is closed")
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    await self._writable(fd)

    async def _writable(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        loop.add_writer(fd, _wake, waiter)
        try:
            await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None
                loop.remove_writer(fd)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            asyncio.get_running_loop().remove_writer(fd)
            _wake(waiter)
        os.close(fd)


class LogFile:
    """The CRI log file; reopened after kubelet rotates it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: BinaryIO | None = None
        self._lock = asyncio.Lock()

    def _open(self) -> BinaryIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self.path.open("ab", buffering=0)

    async def create(self) -> None:
        """Open (creating) the file now: kubelet reads it as soon as the container starts."""
        async with self._lock:
            if self._handle is None:
                self._handle = await asyncio.to_thread(self._open)

    async def write(self, data: bytes) -> None:
        async with self._lock:
            if self._handle is None:
                self._handle = await asyncio.to_thread(self._open)
            await asyncio.to_thread(self._handle.write, data)

    async def reopen(self) -> None:
        async with self._lock:
            old, self._handle = self._handle, None
            if old is not None:
                await asyncio.to_thread(old.close)
            self._handle = await asyncio.to_thread(self._open)

    async def close(self) -> None:
        async with self._lock:
            if self._handle is not None:
                await asyncio.to_thread(self._handle.close)
                self._handle = None


class ContainerIO:
    """FIFOs in `directory`; copiers write what arrives to the CRI log."""

    def __init__(
        self, directory: Path, container_id: str, *, stdin: bool, tty: bool, log_path: str
    ) -> None:
        self.directory = directory
        self.container_id = container_id
        self.stdin_path = directory / "stdin" if stdin else None
        self.stdout_path = directory / "stdout"
        self.stderr_path = None if tty else directory / "stderr"
        self.log = LogFile(Path(log_path)) if log_path else None
        self.tty = tty
        self.listeners: list[Listener] = []
        # Output streams whose copier has not reached EOF yet (attach waits on these).
        self.open_streams: set[str] = set()
        self._readers: list[FifoReader] = []
        self._copiers: list[asyncio.Task[None]] = []
        self._stdin: FifoWriter | None = None

    def stdio(self) -> tuple[str, str, str]:
        return (
            str(self.stdin_path or ""),
            str(self.stdout_path),
            str(self.stderr_path or ""),
        )

    def _prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in (self.stdin_path, self.stdout_path, self.stderr_path):
            if path is not None:
                make_fifo(path)

    async def open(self, *, fresh: bool = True) -> None:
        """Create the FIFOs and start copying; `fresh=False` re-attaches to a running task."""
        await asyncio.to_thread(self._prepare)
        if self.stdin_path is not None and self._stdin is None:
            # Read+write keeps the pipe open for later attach clients; the shim reads.
            self._stdin = FifoWriter(os.open(self.stdin_path, os.O_RDWR | os.O_NONBLOCK))
        if self.log is not None:
            await self.log.create()
        streams = [("stdout", self.stdout_path)]
        if self.stderr_path is not None:
            streams.append(("stderr", self.stderr_path))
        for name, path in streams:
            reader = FifoReader(path, hold_open=fresh)
            await reader.connect()
            self._readers.append(reader)
            self.open_streams.add(name)
            self._copiers.append(
                asyncio.create_task(self._copy(name, reader), name=f"log-{self.container_id[:12]}")
            )

    def task_created(self) -> None:
        """The shim now holds the write ends: EOF from here on means the process is gone."""
        for reader in self._readers:
            reader.release_placeholder()

    async def _copy(self, stream: str, reader: FifoReader) -> None:
        splitter = LineSplitter(stream)
        try:
            while chunk := await reader.read():
                for listener in list(self.listeners):
                    listener(stream, chunk)
                if self.log is not None:
                    entries = splitter.feed(chunk)
                    if entries:
                        await self.log.write(b"".join(entries))
            if self.log is not None:
                tail = splitter.close()
                if tail:
                    await self.log.write(b"".join(tail))
        except asyncio.CancelledError:
            if self.log is not None and (tail := splitter.close()):
                await asyncio.shield(self.log.write(b"".join(tail)))
            raise
        except OSError as err:
            log_event(
                log,
                "log copy failed",
                level=logging.WARNING,
                container=self.container_id,
                stream=stream,
                error=err,
            )
        finally:
            reader.close()
            self.open_streams.discard(stream)
            for listener in list(self.listeners):
                listener(stream, b"")

    @property
    def has_stdin(self) -> bool:
        """True while the container's stdin can still be written (attach)."""
        return self._stdin is not None and not self._stdin.closed

    async def write_stdin(self, data: bytes) -> None:
        """Feed the container's stdin; BrokenPipeError once it has been closed."""
        if self._stdin is None:
            raise BrokenPipeError("container has no stdin")
        await self._stdin.write(data)

    def close_stdin(self) -> None:
        """Drop our end of stdin: with the shim's own end closed (CloseIO) the process sees EOF."""
        if self._stdin is not None:
            self._stdin.close()

    async def drained(self, timeout: float) -> bool:
        """Wait for every copier to reach EOF; False when the timeout hit first."""
        if not self._copiers:
            return True
        _, pending = await asyncio.wait(self._copiers, timeout=timeout)
        return not pending

    async def reopen_log(self) -> None:
        if self.log is not None:
            await self.log.reopen()

    async def close(self) -> None:
        for copier in self._copiers:
            copier.cancel()
        for copier in self._copiers:
            with contextlib.suppress(asyncio.CancelledError):
                await copier
        self._copiers.clear()
        for reader in self._readers:
            reader.close()
        self._readers.clear()
        if self._stdin is not None:
            self._stdin.close()
            self._stdin = None
        if self.log is not None:
            await self.log.close()

    async def remove(self) -> None:
        await self.close()
        await asyncio.to_thread(shutil.rmtree, self.directory, True)
