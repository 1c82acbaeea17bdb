"""One exec process in a running container: its FIFOs, its start and its cleanup.

ExecSync (`container/exec_sync.py`) and streaming exec (`streaming/exec.py`)
both run their command through an `ExecProcess`; they differ only in what
they do with the output. The read ends of the output FIFOs are opened with a
placeholder writer before Tasks.Exec, because the runc shim opens its own
ends only when it starts the process; the placeholders go once it has.
Cleanup (kill if asked, Tasks.DeleteProcess, remove the FIFOs) runs in the
background: containerd's delete waits for the exec's output to close, which a
background child can hold open, and the caller must not wait for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import secrets
import shutil
import signal as signals
from pathlib import Path
from typing import Any

from cri_shim.container.io import FifoReader, FifoWriter, make_fifo
from cri_shim.containerd.runtime import ExitInfo, Runtime

# How long a killed exec may take to die before cleanup goes on anyway.
KILL_WAIT_SECONDS = 2.0


def process_spec(
    container_spec: dict[str, Any], cmd: list[str], *, tty: bool = False
) -> dict[str, Any]:
    """The container's process settings (user, env, caps...) with another command."""
    process: dict[str, Any] = copy.deepcopy(container_spec.get("process", {}))
    process["args"] = list(cmd)
    process["terminal"] = tty
    process.pop("consoleSize", None)
    return process


def _make_fifos(directory: Path, paths: list[Path]) -> None:
    """The exec's dir and FIFOs in one thread hop (each hop is a loop round-trip)."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in paths:
        make_fifo(path)


def _open_rw(path: Path) -> int:
    """Read+write: never blocks for a missing reader and never sees EPIPE."""
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


class ExecProcess:
    """The FIFOs and containerd process of one exec; `open`, `start`, then `finish`."""

    def __init__(
        self,
        ops: Runtime,
        container_id: str,
        work_dir: Path,
        *,
        stdin: bool = False,
        stderr: bool = True,
        tty: bool = False,
    ) -> None:
        self.ops = ops
        self.container_id = container_id
        self.exec_id = "exec-" + secrets.token_hex(8)
        self.directory = work_dir / self.exec_id
        self.tty = tty
        self._stdin_path = self.directory / "stdin" if stdin else None
        self._stdout_path = self.directory / "stdout"
        # With a terminal, stdout and stderr are one stream.
        self._stderr_path = self.directory / "stderr" if stderr and not tty else None
        self.stdout: FifoReader | None = None
        self.stderr: FifoReader | None = None
        self.stdin: FifoWriter | None = None
        self.started = False
        self.exited = False

    @property
    def readers(self) -> list[FifoReader]:
        return [reader for reader in (self.stdout, self.stderr) if reader is not None]

    async def open(self) -> None:
        """Make the FIFOs and open our ends of them."""
        paths = [p for p in (self._stdin_path, self._stdout_path, self._stderr_path) if p]
        await asyncio.to_thread(_make_fifos, self.directory, paths)
        self.stdout = FifoReader(self._stdout_path, hold_open=True)
        if self._stderr_path is not None:
            self.stderr = FifoReader(self._stderr_path, hold_open=True)
        if self._stdin_path is not None:
            self.stdin = FifoWriter(await asyncio.to_thread(_open_rw, self._stdin_path))

    async def start(self, process: dict[str, Any]) -> asyncio.Task[ExitInfo | None]:
        """Exec and start the process; the returned task ends with its exit.

        Wait is asked before Start, so even an instant exit is seen."""
        await self.ops.exec_process(
            self.container_id,
            self.exec_id,
            process,
            stdin=str(self._stdin_path or ""),
            stdout=str(self._stdout_path),
            stderr=str(self._stderr_path or ""),
            terminal=self.tty,
        )
        waiter = asyncio.create_task(self.ops.wait(self.container_id, self.exec_id))
        try:
            await self.ops.start_task(self.container_id, self.exec_id)
        except BaseException:
            waiter.cancel()
            raise
        self.started = True
        # The shim opens an exec's FIFOs when it starts the process, not at Exec.
        for reader in self.readers:
            reader.release_placeholder()
        return waiter

    def finish(self, *, kill: bool) -> asyncio.Task[None]:
        """Close our descriptors now; kill (if asked), delete and remove in the background."""
        for reader in self.readers:
            reader.close()
        if self.stdin is not None:
            self.stdin.close()
        return asyncio.create_task(self._cleanup(kill=kill and self.started and not self.exited))

    async def _cleanup(self, *, kill: bool) -> None:
        """Never raises."""
        if self.started:
            with contextlib.suppress(Exception):
                if kill:
                    await self.ops.kill(self.container_id, signals.SIGKILL, exec_id=self.exec_id)
                    await asyncio.wait_for(
                        self.ops.wait(self.container_id, self.exec_id), KILL_WAIT_SECONDS
                    )
            with contextlib.suppress(Exception):
                await self.ops.delete_process(self.container_id, self.exec_id)
        await asyncio.to_thread(shutil.rmtree, self.directory, True)
