"""Exec and attach sessions against containerd, behind the streaming server.

Exec runs a new process in the container's task (Tasks.Exec/Start/Wait) with
FIFOs for its stdio, as ExecSync does, but streams them: client stdin into the
process (its EOF closes the process's stdin with Tasks.CloseIO), stdout and
stderr out to the client, terminal sizes to Tasks.ResizePty. A client that
goes away gets its process killed; FIFOs, descriptors and the containerd
process record are always cleaned up.

Attach joins the stdio of the container's own process: its output is already
copied from the FIFOs into the CRI log by `ContainerIO`, and every attached
client is one more listener on that copy; stdin is shared. A client too slow
to keep up is dropped rather than allowed to stall the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from cri_shim.concurrency import cancel_and_wait
from cri_shim.container.exec_process import ExecProcess, process_spec
from cri_shim.container.io import FifoReader, FifoWriter
from cri_shim.container.lifecycle import ContainerManager
from cri_shim.containerd.runtime import Runtime
from cri_shim.errors import ContainerdError, ContainerdUnavailable
from cri_shim.logs import log_event
from cri_shim.store.containers import Container, ContainerState, ContainerStore
from cri_shim.streaming.remotecommand import (
    InputSource,
    OutputSink,
    RemoteStreams,
    StreamStatus,
    TerminalSize,
)

log = logging.getLogger(__name__)

# After the process exited, its output is relayed for as long as it keeps coming;
# silence this long means a child holds the pipe open and the session ends.
DRAIN_SECONDS = 2.0
# Output an attach client may fall behind by before it is disconnected.
ATTACH_BACKLOG = 8 * 1024 * 1024


class SessionError(Exception):
    """Why a session cannot run; the message reaches the client on its error stream."""


def _with_env(env: list[str], name: str, value: str) -> list[str]:
    prefix = name + "="
    return [item for item in env if not item.startswith(prefix)] + [prefix + value]


class _Activity:
    """When output last moved, so the drain after exit can tell slow from silent."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.writing = 0  # pumps blocked on a slow client are not silent

    def silent_for(self) -> float:
        return 0.0 if self.writing else time.monotonic() - self.last


async def _pump_output(reader: FifoReader, sink: OutputSink | None, activity: _Activity) -> None:
    """Copy a FIFO to the client; once the client is gone keep draining, so the
    process never blocks on a full pipe."""
    failed = sink is None
    while chunk := await reader.read():
        activity.last = time.monotonic()
        if not failed:
            assert sink is not None
            activity.writing += 1
            try:
                await sink.write(chunk)
            except (ConnectionError, OSError):
                failed = True
            finally:
                activity.writing -= 1
                activity.last = time.monotonic()


async def _drain(outputs: list[asyncio.Task[None]], activity: _Activity) -> None:
    """Let the output pumps finish after the process exited, as long as output moves
    (a slow client must not lose the end of it); give up after DRAIN_SECONDS of silence."""
    pending = {task for task in outputs if not task.done()}
    while pending:
        silent = activity.silent_for()
        if silent >= DRAIN_SECONDS:
            return
        _, pending = await asyncio.wait(pending, timeout=DRAIN_SECONDS - silent)


class StreamRuntime:
    """What the streaming server runs: exec and attach sessions on containerd."""

    def __init__(self, manager: ContainerManager, containers: ContainerStore) -> None:
        self.manager = manager
        self.containers = containers
        self.active = 0  # sessions running now
        self._cleanups: set[asyncio.Task[None]] = set()

    @property
    def ops(self) -> Runtime:
        return self.manager.ops

    def _running(self, container_id: str) -> Container:
        container = self.containers.by_id.find(container_id)
        if container is None:
            raise SessionError(f"container {container_id} not found")
        if container.state is not ContainerState.RUNNING:
            raise SessionError(f"container {container.id} is {container.state.value}, not running")
        return container

    async def _resize(
        self,
        container_id: str,
        exec_id: str,
        sizes: AsyncIterator[TerminalSize],
        fields: dict[str, Any],
    ) -> None:
        async for size in sizes:
            try:
                await self.ops.resize_pty(container_id, exec_id, size.width, size.height)
            except (ContainerdError, ContainerdUnavailable) as err:
                log_event(log, "resize failed", level=logging.DEBUG, error=err, **fields)
                continue
            log_event(
                log,
                "terminal resized",
                level=logging.DEBUG,
                width=size.width,
                height=size.height,
                **fields,
            )

    async def _close_io(self, container_id: str, exec_id: str) -> None:
        with contextlib.suppress(ContainerdError, ContainerdUnavailable):
            await self.ops.close_stdin(container_id, exec_id)

    async def wait_cleanups(self) -> None:
        """Wait for background cleanups of finished execs (tests, shutdown)."""
        while self._cleanups:
            await asyncio.gather(*list(self._cleanups), return_exceptions=True)

    # exec

    async def exec(self, container_id: str, cmd: list[str], streams: RemoteStreams) -> StreamStatus:
        container = self._running(container_id)
        spec = await self.manager.load_spec(container.id)
        process_settings = process_spec(spec, cmd, tty=streams.tty)
        if streams.tty:
            process_settings["env"] = _with_env(
                list(process_settings.get("env", [])), "TERM", "xterm"
            )
        process = ExecProcess(
            self.ops,
            container.id,
            self.manager.io_dir(container.id) / "exec",
            stdin=streams.stdin is not None,
            tty=streams.tty,
        )
        exec_id = process.exec_id
        fields: dict[str, Any] = {"container": container.id, "exec_id": exec_id}
        self.active += 1
        tasks: list[asyncio.Task[Any]] = []
        try:
            await process.open()
            waiter = await process.start(process_settings)
            tasks.append(waiter)
            log_event(log, "exec started", tty=streams.tty, cmd=" ".join(cmd)[:200], **fields)
            sinks = [streams.stdout, streams.stderr]
            activity = _Activity()
            outputs = [
                asyncio.create_task(_pump_output(reader, sink, activity))
                for reader, sink in zip(process.readers, sinks, strict=False)
            ]
            tasks += outputs
            if process.stdin is not None and streams.stdin is not None:
                tasks.append(
                    asyncio.create_task(
                        self._feed_stdin(
                            streams.stdin, process.stdin, container.id, exec_id, tty=streams.tty
                        )
                    )
                )
            if streams.resize is not None and streams.tty:
                tasks.append(
                    asyncio.create_task(self._resize(container.id, exec_id, streams.resize, fields))
                )
            exit_info = await waiter
            process.exited = True
            # The silence that ends the drain counts from the exit, not from a quiet run before it.
            activity.last = time.monotonic()
            # Output still in flight after exit; a child holding the pipes must not stall us.
            await _drain(outputs, activity)
            code = exit_info.exit_code if exit_info is not None else -1
            log_event(log, "exec finished", exit_code=code, **fields)
            return StreamStatus.exited(code, cmd)
        finally:
            self.active -= 1
            await cancel_and_wait(tasks)
            cleanup = process.finish(kill=True)  # kills only a process that has not exited
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)

    async def _feed_stdin(
        self,
        source: InputSource,
        writer: FifoWriter,
        container_id: str,
        exec_id: str,
        *,
        tty: bool,
    ) -> None:
        """Client stdin into the process; its end closes the process's stdin.

        Not with a terminal: closing a terminal's input hangs it up (SIGHUP),
        so there the process keeps its terminal, as with containerd.
        """
        while data := await source.read():
            try:
                await writer.write(data)
            except OSError:
                break
        writer.close()
        if not tty:
            await self._close_io(container_id, exec_id)

    # attach

    async def attach(self, container_id: str, streams: RemoteStreams) -> StreamStatus:
        container = self._running(container_id)
        io = self.manager.container_io(container.id)
        if io is None:
            raise SessionError(f"container {container.id} is not running")
        fields: dict[str, Any] = {"container": container.id}
        sinks: dict[str, OutputSink | None] = {"stdout": streams.stdout}
        if not io.tty:
            sinks["stderr"] = streams.stderr
        queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        backlog = 0
        overflow = asyncio.Event()

        def listener(stream: str, chunk: bytes) -> None:
            nonlocal backlog
            if chunk and sinks.get(stream) is None:
                return
            if backlog > ATTACH_BACKLOG:
                overflow.set()
                return
            backlog += len(chunk)
            queue.put_nowait((stream, chunk))

        async def forward() -> None:
            nonlocal backlog
            waiting = set(io.open_streams)
            while waiting:
                stream, chunk = await queue.get()
                backlog -= len(chunk)
                if not chunk:
                    waiting.discard(stream)
                    continue
                sink = sinks.get(stream)
                if sink is not None:
                    await sink.write(chunk)

        async def feed() -> bool:
            """Client stdin into the container; True when the client detached."""
            assert streams.stdin is not None
            while data := await streams.stdin.read():
                with contextlib.suppress(OSError):
                    if io.has_stdin:
                        await io.write_stdin(data)
            if container.config.stdin_once and not io.tty and io.has_stdin:
                io.close_stdin()
                await self._close_io(container.id, "")
                return False
            return True

        io.listeners.append(listener)
        self.active += 1
        tasks: list[asyncio.Task[Any]] = [asyncio.create_task(forward())]
        overflow_task = asyncio.create_task(overflow.wait())
        tasks.append(overflow_task)
        stdin_task = asyncio.create_task(feed()) if streams.stdin is not None else None
        if stdin_task is not None:
            tasks.append(stdin_task)
        if streams.resize is not None and io.tty:
            tasks.append(
                asyncio.create_task(self._resize(container.id, "", streams.resize, fields))
            )
        log_event(log, "attached", stdin=streams.stdin is not None, tty=io.tty, **fields)
        try:
            pending = {tasks[0], overflow_task} | ({stdin_task} if stdin_task else set())
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if tasks[0] in done:
                    tasks[0].result()  # the container's output ended, or the client broke
                    break
                if overflow_task in done:
                    raise SessionError("attach client too slow; disconnected")
                if stdin_task is not None and stdin_task in done and stdin_task.result():
                    break  # stdin closed without stdin_once: the client detached
        finally:
            self.active -= 1
            with contextlib.suppress(ValueError):
                io.listeners.remove(listener)
            await cancel_and_wait(tasks)
            log_event(log, "detached", **fields)
        return StreamStatus.ok()
