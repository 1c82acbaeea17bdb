"""Running short helper programs (unshare, nsenter, CNI plugins) off the event loop.

Each program gets its own process group so that a timeout kills it together
with anything it started (CNI plugins run iptables and IPAM plugins), and a
killed program never lingers as a zombie.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        """`argv` and its exit status with the end of stderr, for error messages."""
        tail = self.stderr.decode(errors="replace").strip()[-2000:]
        text = f"{' '.join(self.argv)} exited {self.returncode}"
        return f"{text}: {tail}" if tail else text


class CommandTimeout(TimeoutError):
    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        super().__init__(f"{' '.join(argv)} did not finish within {timeout:g}s and was killed")
        self.argv = tuple(argv)
        self.timeout = timeout


def _kill_group(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


async def run_command(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> CommandResult:
    """Run `argv` to completion; on timeout (or cancellation) kill its whole group."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env) if env is not None else None,
        start_new_session=True,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(input), timeout)
    except TimeoutError:
        _kill_group(process)
        await process.wait()
        raise CommandTimeout(argv, timeout) from None
    except BaseException:
        _kill_group(process)
        await asyncio.shield(process.wait())
        raise
    assert process.returncode is not None
    return CommandResult(tuple(argv), process.returncode, stdout, stderr)
