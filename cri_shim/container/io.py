"""A container's stdio: FIFOs containerd's shim writes to, and the copier
that turns them into the CRI log file.

The read end of each FIFO is opened non-blocking before the task exists,
together with a placeholder write end so that no EOF is seen until the shim
has opened its own; once the task is created the placeholder is dropped and
EOF then means the process (and every child holding its stdout) is gone.

Output reaches the log exactly once even when the shim is SIGKILLed: see
`SpooledStream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

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
    """Reads one FIFO with asyncio, without ever blocking the loop.

    The descriptor is ours alone, watched with `add_reader` and closed once.
    Not `connect_read_pipe`: uvloop closes such a pipe twice (libuv, then the
    file object; MagicStack/uvloop#763), and a worker thread opening a file in
    between loses its descriptor to the second close.
    """

    def __init__(self, path: Path, *, hold_open: bool) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._placeholder: int | None = None
        if hold_open:
            self._placeholder = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._watch = _FdWatch(write=False)

    def release_placeholder(self) -> None:
        if self._placeholder is not None:
            os.close(self._placeholder)
            self._placeholder = None

    async def read(self) -> bytes:
        """The next chunk; b"" once every writer is gone (or after close())."""
        while (fd := self._fd) is not None:
            try:
                return os.read(fd, READ_CHUNK)
            except BlockingIOError:
                await self._watch.wait(fd)
        return b""

    def close(self) -> None:
        self.release_placeholder()
        fd, self._fd = self._fd, None
        if fd is None:
            return
        self._watch.cancel()
        os.close(fd)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _FdWatch:
    """The one pending wait for a descriptor to turn readable (or writable)."""

    def __init__(self, *, write: bool) -> None:
        self._write = write
        self._waiter: asyncio.Future[None] | None = None
        self._fd = -1

    def _unwatch(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        if self._write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)

    async def wait(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter, self._fd = waiter, fd
        if self._write:
            loop.add_writer(fd, _wake, waiter)
        else:
            loop.add_reader(fd, _wake, waiter)
        try:
            await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None
                self._unwatch(loop, fd)

    def cancel(self) -> None:
        """Before its descriptor is closed: stop watching it and wake the waiter."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._unwatch(asyncio.get_running_loop(), self._fd)
            _wake(waiter)


class FifoWriter:
    """Non-blocking writes to a FIFO with asyncio (stdin of a container or exec).

    `close()` may come while a write waits for room (a process that does not
    read its stdin): the write then fails with BrokenPipeError instead of
    touching a closed, possibly reused, descriptor.
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self._watch = _FdWatch(write=True)
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
                    await self._watch.wait(fd)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        self._watch.cancel()
        os.close(fd)


T = TypeVar("T")


async def _to_thread_to_the_end(fn: Callable[..., T], *args: object) -> T:
    """to_thread whose cancellation waits for the thread: the caller may close
    the descriptors it uses as soon as this returns."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        raise


class LogFile:
    """The CRI log file; reopened after kubelet rotates it.

    Only the copiers of one container write it, one append at a time under
    `lock`, so an append cut short by a SIGKILL can be found and cut back."""

    def __init__(self, path: Path, relative: str = "") -> None:
        self.path = path
        # The pod's log directory: `path` less the container's relative log_path.
        depth = len(Path(os.path.normpath(relative)).parts) if relative else 0
        self.root = path.parents[depth - 1] if depth else None
        self._fd: int | None = None
        self._lock = asyncio.Lock()

    def _check_inside_root(self) -> None:
        """Symlinks are resolved: the file must still be inside the pod's log directory
        (a container that can write there must not make the shim write elsewhere)."""
        if self.root is None:
            return
        root = os.path.realpath(self.root)
        parent = os.path.realpath(self.path.parent)
        if os.path.commonpath([root, parent]) != root:
            raise OSError(
                errno.ELOOP,
                f"log path {self.path} resolves to {parent}, outside the pod's log "
                f"directory {root}",
            )

    def _open(self) -> int:
        self._check_inside_root()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # 0640 as containerd creates it; never through a symlink at the last component.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        return os.open(self.path, flags, 0o640)

    async def create(self) -> None:
        """Open (creating) the file now: kubelet reads it as soon as the container starts."""
        async with self._lock:
            if self._fd is None:
                self._fd = await asyncio.to_thread(self._open)

    async def run(self, work: Callable[[int], T]) -> T:
        """`work(fd)` in a thread, alone on the file; it always runs to its end."""
        async with self._lock:
            if self._fd is None:
                self._fd = await asyncio.to_thread(self._open)
            return await _to_thread_to_the_end(work, self._fd)

    async def reopen(self) -> None:
        async with self._lock:
            old, self._fd = self._fd, None
            if old is not None:
                await asyncio.to_thread(os.close, old)
            self._fd = await asyncio.to_thread(self._open)

    async def close(self) -> None:
        async with self._lock:
            if self._fd is not None:
                await asyncio.to_thread(os.close, self._fd)
                self._fd = None


# Cursor: magic, log inode, log size before the append, append length,
# spool offset logged before the append, spool offset logged after it.
_CURSOR = struct.Struct("<8sQQQQQ")
_MAGIC = b"crishim1"
# The spool is emptied once everything in it is logged and it has grown this big.
SPOOL_RESET_BYTES = 256 * 1024


class SpooledStream:
    """One output FIFO copied to the CRI log exactly once, across a SIGKILL.

    Bytes read from a pipe are gone from the kernel; a shim killed holding
    them would lose them. So bytes leave the FIFO only by splice(2) into a
    spool file beside it: the kernel removes from the pipe exactly what it
    appended to the file, whatever instant the shim dies at. Before each log
    append a one-page cursor record (a single pwrite, so never torn) names the
    spool range the append covers and the log's inode and size before it; a
    restarted copier reads the log's size to learn whether that append
    happened (a torn one is cut back and redone) and carries on from the
    cursor, re-reading any unlogged spool bytes. The spool is emptied once it
    is fully logged and big enough; a kill between emptying it and writing the
    cursor shows as a spool shorter than the cursor's offset.
    """

    def __init__(self, name: str, fifo: Path, *, hold_open: bool) -> None:
        self.name = name
        self.fifo = fifo
        self.splitter = LineSplitter(name)
        self._fifo_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._placeholder: int | None = None
        if hold_open:
            self._placeholder = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        spool = fifo.with_name(f"{fifo.name}.spool")
        self._spool_fd = os.open(spool, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        cursor = fifo.with_name(f"{fifo.name}.cursor")
        self._cursor_fd = os.open(cursor, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._end = 0  # spool size
        self._logged = 0  # spool bytes already in the log (or fed to the splitter)
        self._splice = True

    def release_placeholder(self) -> None:
        if self._placeholder is not None:
            os.close(self._placeholder)
            self._placeholder = None

    def close(self) -> None:
        self.release_placeholder()
        for fd in (self._fifo_fd, self._spool_fd, self._cursor_fd):
            if fd >= 0:
                os.close(fd)
        self._fifo_fd = self._spool_fd = self._cursor_fd = -1

    async def readable(self) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        loop.add_reader(self._fifo_fd, _wake, waiter)
        try:
            await waiter
        finally:
            loop.remove_reader(self._fifo_fd)

    # The methods below run in a thread, under the log's lock (fd -1: no log).

    def recover(self, log_fd: int) -> bytes:
        """Pick up where a previous copier stopped; returns unlogged spool bytes."""
        self._end = os.fstat(self._spool_fd).st_size
        record = os.pread(self._cursor_fd, _CURSOR.size, 0)
        logged = 0
        if len(record) == _CURSOR.size:
            magic, inode, size, length, before, after = _CURSOR.unpack(record)
            if magic == _MAGIC:
                logged = after
                if length and log_fd >= 0:
                    st = os.fstat(log_fd)
                    if st.st_ino == inode and st.st_size < size + length:
                        if st.st_size > size:
                            os.ftruncate(log_fd, size)  # a torn append: redo it whole
                        logged = before
        if logged > self._end:
            logged = 0  # killed after emptying the spool, before the cursor said so
        self._logged = logged
        return os.pread(self._spool_fd, self._end - logged, logged) if self._end > logged else b""

    def pull(self) -> bytes | None:
        """Move what the FIFO holds into the spool; b"" at EOF, None when empty."""
        try:
            if self._splice:
                moved = os.splice(
                    self._fifo_fd,
                    self._spool_fd,
                    READ_CHUNK,
                    offset_dst=self._end,
                    flags=os.SPLICE_F_NONBLOCK,
                )
                data = os.pread(self._spool_fd, moved, self._end) if moved else b""
            else:
                data = os.read(self._fifo_fd, READ_CHUNK)
                if data:
                    os.pwrite(self._spool_fd, data, self._end)
        except BlockingIOError:
            return None
        except OSError as err:
            if not self._splice or err.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            # A state dir on a file system without splice: the spool is still
            # kept, but a read chunk can be lost in the instant before its write.
            self._splice = False
            log_event(log, "splice unsupported; copying with read", level=logging.WARNING)
            return self.pull()
        self._end += len(data)
        return data

    def commit(self, log_fd: int, entries: list[bytes]) -> None:
        """Append `entries` (the spool up to what the splitter still holds) to the log."""
        after = self._end - self.splitter.pending
        payload = b"".join(entries)
        if payload and log_fd >= 0:
            st = os.fstat(log_fd)
            record = _CURSOR.pack(_MAGIC, st.st_ino, st.st_size, len(payload), self._logged, after)
            os.pwrite(self._cursor_fd, record, 0)
            view = memoryview(payload)
            while view:
                view = view[os.write(log_fd, view) :]
        self._logged = after
        if self._logged == self._end and self._end >= SPOOL_RESET_BYTES:
            os.ftruncate(self._spool_fd, 0)
            os.pwrite(self._cursor_fd, _CURSOR.pack(_MAGIC, 0, 0, 0, 0, 0), 0)
            self._end = self._logged = 0

    def step(self, log_fd: int) -> bytes | None:
        """One chunk FIFO → spool → log; the chunk, b"" at EOF, None if none yet."""
        data = self.pull()
        if data is None:
            return None
        entries = self.splitter.feed(data) if data else self.splitter.close()
        self.commit(log_fd, entries)
        return data

    def resume(self, log_fd: int) -> None:
        """Log what a killed copier had spooled but not logged."""
        pending = self.recover(log_fd)
        self.commit(log_fd, self.splitter.feed(pending))

    def finish(self, log_fd: int) -> None:
        """The partial line still held, as a P entry (the copy is being stopped)."""
        self.commit(log_fd, self.splitter.close())


class ContainerIO:
    """FIFOs in `directory`; copiers write what arrives to the CRI log."""

    def __init__(
        self,
        directory: Path,
        container_id: str,
        *,
        stdin: bool,
        tty: bool,
        log_path: str,
        log_relative: str = "",
    ) -> None:
        self.directory = directory
        self.container_id = container_id
        self.stdin_path = directory / "stdin" if stdin else None
        self.stdout_path = directory / "stdout"
        self.stderr_path = None if tty else directory / "stderr"
        self.log = LogFile(Path(log_path), log_relative) if log_path else None
        self.tty = tty
        self.listeners: list[Listener] = []
        # Output streams whose copier has not reached EOF yet (attach waits on these).
        self.open_streams: set[str] = set()
        self._streams: list[SpooledStream] = []
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

    async def _logged(self, work: Callable[[int], T]) -> T:
        if self.log is None:
            return await _to_thread_to_the_end(work, -1)
        return await self.log.run(work)

    async def open(self, *, fresh: bool = True) -> None:
        """Create the FIFOs and start copying; `fresh=False` re-attaches to a running task.

        Either way a spool left by a killed shim is logged first."""
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
            stream = await asyncio.to_thread(SpooledStream, name, path, hold_open=fresh)
            self._streams.append(stream)
            await self._logged(stream.resume)
            self.open_streams.add(name)
            self._copiers.append(
                asyncio.create_task(self._copy(stream), name=f"log-{self.container_id[:12]}")
            )

    def task_created(self) -> None:
        """The shim now holds the write ends: EOF from here on means the process is gone."""
        for stream in self._streams:
            stream.release_placeholder()

    async def _copy(self, stream: SpooledStream) -> None:
        try:
            while True:
                chunk = await self._logged(stream.step)
                if chunk is None:
                    await stream.readable()
                    continue
                for listener in list(self.listeners):
                    listener(stream.name, chunk)
                if not chunk:
                    break
        except asyncio.CancelledError:
            await asyncio.shield(self._logged(stream.finish))
            raise
        except OSError as err:
            log_event(
                log,
                "log copy failed",
                level=logging.WARNING,
                container=self.container_id,
                stream=stream.name,
                error=err,
            )
        finally:
            self.open_streams.discard(stream.name)
            for listener in list(self.listeners):
                listener(stream.name, b"")

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
        for stream in self._streams:
            stream.close()
        self._streams.clear()
        if self._stdin is not None:
            self._stdin.close()
            self._stdin = None
        if self.log is not None:
            await self.log.close()

    async def remove(self) -> None:
        await self.close()
        await asyncio.to_thread(shutil.rmtree, self.directory, True)
