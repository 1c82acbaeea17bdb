"""Exactly-once logging when the copier is SIGKILLed: a writer holds a FIFO
open (as containerd's runc shim does) and writes numbered lines as fast as it
can while the process copying the FIFO into a CRI log is killed and restarted
again and again. Every line must be in the log once, in order."""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import sys
from pathlib import Path

from cri_shim.container.io import READ_CHUNK, SPOOL_RESET_BYTES

from .conftest import short_tempdir

ROUNDS = 12
ENTRY = re.compile(rb"^\S+ stdout F line (\d+)$")

WRITER = r"""
import os, signal, sys, time
stop = False
def halt(*_):
    global stop
    stop = True
signal.signal(signal.SIGUSR1, halt)
fd = os.open(sys.argv[1], os.O_RDWR)  # a read end too: no EPIPE while no copier runs
print("open", flush=True)
i = 0
while not stop:
    os.write(fd, b"".join(b"line %d\n" % n for n in range(i, i + 20)))
    i += 20
    time.sleep(0.0005)
print(i, flush=True)
sys.stdin.read()
"""

COPIER = r"""
import asyncio, sys
from pathlib import Path
from cri_shim.container.io import ContainerIO

async def main():
    io = ContainerIO(Path(sys.argv[1]), "spooltest", stdin=False, tty=True, log_path=sys.argv[2])
    await io.open(fresh=False)
    print("ready", flush=True)
    await io.drained(3600)
    await io.close()

asyncio.run(main())
"""


async def python(script: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )


async def test_copier_killed_again_and_again_loses_and_repeats_nothing() -> None:
    base = short_tempdir("crishim-spool-")
    io_dir, log_path = base / "io", base / "logs" / "c.log"
    io_dir.mkdir()
    os.mkfifo(io_dir / "stdout", 0o600)
    started: list[asyncio.subprocess.Process] = []

    async def copier_ready() -> asyncio.subprocess.Process:
        copier = await python(COPIER, str(io_dir), str(log_path))
        started.append(copier)
        assert copier.stdout is not None
        assert await asyncio.wait_for(copier.stdout.readline(), 60) == b"ready\n"
        return copier

    try:
        writer = await python(WRITER, str(io_dir / "stdout"))
        started.append(writer)
        assert writer.stdout is not None and writer.stdin is not None
        assert await writer.stdout.readline() == b"open\n"
        kills = 0
        for _ in range(ROUNDS):
            copier = await copier_ready()
            await asyncio.sleep(random.uniform(0.05, 0.4))
            copier.send_signal(signal.SIGKILL)
            await copier.wait()
            kills += 1
        copier = await copier_ready()
        writer.send_signal(signal.SIGUSR1)
        written = int(await writer.stdout.readline())
        writer.stdin.close()  # the writer exits: EOF once the copier has it all
        await writer.wait()
        await asyncio.wait_for(copier.wait(), 120)
        numbers = []
        for line in log_path.read_bytes().split(b"\n")[:-1]:
            match = ENTRY.match(line)
            assert match, line
            numbers.append(int(match.group(1)))
        print(f"spool: {kills} kills, {written} lines written, {len(numbers)} logged")
        assert numbers == list(range(written))
        assert written > 1000
        # Megabytes went through the spool; it was emptied as it filled.
        assert (io_dir / "stdout.spool").stat().st_size < SPOOL_RESET_BYTES + READ_CHUNK
    finally:
        for process in started:
            if process.returncode is None:
                process.kill()
                await process.wait()
    shutil.rmtree(base)
