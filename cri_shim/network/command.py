"""Running short helper programs (nsenter, CNI plugins) off the event loop.

Each program gets its own process group so that a timeout kills it together
with anything it started (CNI plugins run iptables and IPAM plugins), and a
killed program never lingers as a zombie.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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


# Plugins of many pods at once each hold a thread while they run (5-50 ms).
MAX_RUNNING = 32
_executor: ThreadPoolExecutor | None = None


def _commands() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(MAX_RUNNING, thread_name_prefix="cri-shim-cmd")
    return _executor


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


class _Run:
    """One program run on a worker thread. Popen there uses vfork (~0.2 ms) where
    the event loop's subprocess support forks the whole shim (~3 ms of a 60 MiB
    process, with the loop blocked): CNI runs several plugins per pod."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.cancelled = False

    def __call__(
        self,
        argv: Sequence[str],
        input: bytes | None,
        env: Mapping[str, str] | None,
        timeout: float,
    ) -> CommandResult | None:
        """The result, or None when `timeout` passed and the group was killed."""
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
        self.process = process
        if self.cancelled:  # the caller gave up while we were spawning
            _kill_group(process)
        try:
            stdout, stderr = process.communicate(input, timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.wait()
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None:
                    pipe.close()
            return None
        return CommandResult(tuple(argv), process.returncode, stdout, stderr)


async def run_command(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> CommandResult:
    """Run `argv` to completion; on timeout (or cancellation) kill its whole group."""
    run = _Run()
    loop = asyncio.get_running_loop()
    done = loop.run_in_executor(_commands(), run, argv, input, env, timeout)
    try:
        result = await asyncio.shield(done)
    except asyncio.CancelledError:
        run.cancelled = True
        if run.process is not None:
            _kill_group(run.process)
        with contextlib.suppress(Exception):
            await done  # reaped before we go on
        raise
    if result is None:
        raise CommandTimeout(argv, timeout)
    return result
