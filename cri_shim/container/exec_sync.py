"""ExecSync: run a command in a running container and collect its output.

The timeout is a hard deadline: when it passes the process is killed and the
call returns at once, even if a background child still holds the output
pipes open. Once the command exits in time, its output is drained as
containerd drains it: until the pipes close, for at most
`runtime.drain_exec_sync_io_timeout` (0: no bound, containerd's default),
past which the call fails in containerd's words. Output beyond the cap is
dropped, as kubelet would otherwise be handed an unbounded message.
"""

from __future__ import annotations

import asyncio
import signal as signals
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cri_shim.container.exec_process import KILL_WAIT_SECONDS, ExecProcess, process_spec
from cri_shim.container.io import FifoReader
from cri_shim.containerd.runtime import PROCESS_TYPE_URL, Runtime
from cri_shim.settings import format_duration

__all__ = [
    "PROCESS_TYPE_URL",
    "ExecDrainTimeout",
    "ExecResult",
    "ExecTimeout",
    "exec_sync",
    "process_spec",
]

# kubelet's own cap for ExecSync output (and grpc's default message size).
MAX_OUTPUT_BYTES = 16 * 1024 * 1024


class ExecTimeout(Exception):
    pass


class ExecDrainTimeout(Exception):
    """The command exited but something it started still holds its output pipes."""


@dataclass
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit_code: int


async def _collect(reader: FifoReader, sink: bytearray) -> None:
    while chunk := await reader.read():
        room = MAX_OUTPUT_BYTES - len(sink)
        if room > 0:
            sink += chunk[:room]


async def exec_sync(
    ops: Runtime,
    container_id: str,
    container_spec: dict[str, Any],
    cmd: list[str],
    timeout: float | None,
    work_dir: Path,
    drain_timeout: float = 0.0,
) -> ExecResult:
    process = ExecProcess(ops, container_id, work_dir)
    out, err = bytearray(), bytearray()
    collectors: list[asyncio.Task[None]] = []
    try:
        await process.open()
        assert process.stdout is not None and process.stderr is not None
        collectors = [
            asyncio.create_task(_collect(process.stdout, out)),
            asyncio.create_task(_collect(process.stderr, err)),
        ]
        waiter = await process.start(process_spec(container_spec, cmd))
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
        if not done:
            await ops.kill(container_id, signals.SIGKILL, exec_id=process.exec_id)
            # Like containerd, return only once the killed process is gone, so a
            # caller checking for it right after the timeout does not find it.
            await asyncio.wait({waiter}, timeout=KILL_WAIT_SECONDS)
            waiter.cancel()
            raise ExecTimeout(f"command {cmd!r} timed out after {timeout:g}s")
        exit_info = waiter.result()
        process.exited = True
        # Output still in flight after exit: a background child may hold the pipes.
        _, pending = await asyncio.wait(collectors, timeout=drain_timeout or None)
        if pending:
            exec_id = process.exec_id
            raise ExecDrainTimeout(
                f'failed to drain exec process "{exec_id}" io: failed to drain exec process '
                f'"{exec_id}" io in {format_duration(drain_timeout)} because io is still held '
                "by other processes"
            )
        code = exit_info.exit_code if exit_info is not None else -1
        return ExecResult(bytes(out), bytes(err), code)
    finally:
        for collector in collectors:
            collector.cancel()
        cleanup = process.finish(kill=False)
        _CLEANUPS.add(cleanup)
        cleanup.add_done_callback(_CLEANUPS.discard)


_CLEANUPS: set[asyncio.Task[None]] = set()
