"""ExecSync: run a command in a running container and collect its output.

The timeout is a hard deadline: when it passes the process is killed and the
call returns at once, even if a background child still holds the output
pipes open. Output beyond the cap is dropped, as kubelet would otherwise be
handed an unbounded message.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import secrets
import shutil
import signal as signals
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cri_shim.container.io import FifoReader, make_fifo
from cri_shim.containerd.runtime import RuntimeOps, pack_json
from cri_shim.gen.containerd.services.tasks import v1 as tasks_v1

PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
# kubelet's own cap for ExecSync output (and grpc's default message size).
MAX_OUTPUT_BYTES = 16 * 1024 * 1024
# How long a timed-out exec may take to die after SIGKILL before we return anyway.
KILL_WAIT_SECONDS = 2.0


class ExecTimeout(Exception):
    pass


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


def process_spec(
    container_spec: dict[str, Any], cmd: list[str], *, tty: bool = False
) -> dict[str, Any]:
    """The container's process settings (user, env, caps...) with another command."""
    process: dict[str, Any] = copy.deepcopy(container_spec.get("process", {}))
    process["args"] = list(cmd)
    process["terminal"] = tty
    process.pop("consoleSize", None)
    return process


def _make_fifos(directory: Path, *paths: Path) -> None:
    """The exec's dir and FIFOs in one thread hop (each hop is a loop round-trip)."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in paths:
        make_fifo(path)


async def exec_sync(
    ops: RuntimeOps,
    container_id: str,
    container_spec: dict[str, Any],
    cmd: list[str],
    timeout: float | None,
    work_dir: Path,
) -> ExecResult:
    exec_id = "exec-" + secrets.token_hex(8)
    directory = work_dir / exec_id
    stdout_path, stderr_path = directory / "stdout", directory / "stderr"
    await asyncio.to_thread(_make_fifos, directory, stdout_path, stderr_path)
    readers = [FifoReader(stdout_path, hold_open=True), FifoReader(stderr_path, hold_open=True)]
    out, err = bytearray(), bytearray()
    collectors: list[asyncio.Task[None]] = []
    started = False
    try:
        collectors = [
            asyncio.create_task(_collect(readers[0], out)),
            asyncio.create_task(_collect(readers[1], err)),
        ]
        client = ops.client
        await client.call(
            "Tasks.Exec",
            client.tasks.exec(
                tasks_v1.ExecProcessRequest(
                    container_id=container_id,
                    exec_id=exec_id,
                    stdout=str(stdout_path),
                    stderr=str(stderr_path),
                    spec=pack_json(PROCESS_TYPE_URL, process_spec(container_spec, cmd)),
                )
            ),
        )
        waiter = asyncio.create_task(ops.wait(container_id, exec_id))
        await ops.start_task(container_id, exec_id)
        started = True
        # The shim opens an exec's FIFOs when it starts the process, not at Exec.
        for reader in readers:
            reader.release_placeholder()
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
        if not done:
            await ops.kill(container_id, signals.SIGKILL, exec_id=exec_id)
            # Like containerd, return only once the killed process is gone, so a
            # caller checking for it right after the timeout does not find it.
            await asyncio.wait({waiter}, timeout=KILL_WAIT_SECONDS)
            waiter.cancel()
            raise ExecTimeout(f"command {cmd!r} timed out after {timeout:g}s")
        exit_info = waiter.result()
        # Output still in flight after exit; a child holding the pipes must not stall us.
        await asyncio.wait(collectors, timeout=1.0)
        code = exit_info.exit_code if exit_info is not None else -1
        return ExecResult(bytes(out), bytes(err), code)
    finally:
        for collector in collectors:
            collector.cancel()
        for reader in readers:
            reader.close()
        # containerd's delete waits for the exec's output to close, which a
        # background child can hold open: clean up without holding the caller.
        cleanup = asyncio.create_task(
            _cleanup(ops, container_id, exec_id if started else "", directory)
        )
        _CLEANUPS.add(cleanup)
        cleanup.add_done_callback(_CLEANUPS.discard)


_CLEANUPS: set[asyncio.Task[None]] = set()


async def _cleanup(ops: RuntimeOps, container_id: str, exec_id: str, directory: Path) -> None:
    if exec_id:
        with contextlib.suppress(Exception):
            await ops.client.call(
                "Tasks.DeleteProcess",
                ops.client.tasks.delete_process(
                    tasks_v1.DeleteProcessRequest(container_id=container_id, exec_id=exec_id)
                ),
            )
    await asyncio.to_thread(shutil.rmtree, directory, True)
