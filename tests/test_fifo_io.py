"""FIFO readers own their descriptor: closing one never closes another's.

uvloop's `connect_read_pipe` closes the pipe's descriptor twice (libuv's close,
then the attached file object's: MagicStack/uvloop#763). A worker thread that
opens a file between the two closes gets the same number and loses it to the
second close. Under load this took stdin, stdout or stderr FIFOs away from
concurrent execs (empty output, or the shim timing out opening a FIFO).
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from cri_shim.container.io import FifoReader, make_fifo


async def test_closing_fifo_readers_never_closes_a_neighbours_descriptor(tmp_path: Path) -> None:
    """A thread opens files while FIFO readers come and go on the loop; each of
    its descriptors must still be its own file when it looks (as the worker
    threads that make exec FIFOs do)."""
    stop = threading.Event()
    stolen: list[str] = []
    witness = tmp_path / "witness"
    witness.write_bytes(b"")
    expected = os.stat(witness).st_ino

    def neighbour() -> None:
        while not stop.is_set():
            fds = [os.open(witness, os.O_RDONLY) for _ in range(4)]
            for fd in fds:
                try:
                    if os.fstat(fd).st_ino != expected:
                        stolen.append(f"fd {fd} now names another file")
                        continue  # the number belongs to someone else now
                except OSError as err:
                    stolen.append(f"fd {fd}: {err}")
                    continue
                os.close(fd)

    thread = threading.Thread(target=neighbour, daemon=True)
    thread.start()
    try:
        for index in range(2000):
            path = tmp_path / f"fifo{index % 8}"
            make_fifo(path)
            reader = FifoReader(path, hold_open=True)
            reader.close()
            if index % 50 == 0:
                await asyncio.sleep(0)
            if stolen:
                break
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
    assert stolen == []


async def test_fifo_reader_reads_until_every_writer_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    make_fifo(path)
    reader = FifoReader(path, hold_open=True)
    writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    reader.release_placeholder()  # the writer (the shim) keeps it open now
    os.write(writer, b"hello ")
    first = await reader.read()
    os.write(writer, b"world")
    os.close(writer)
    rest = b""
    while chunk := await reader.read():
        rest += chunk
    assert first + rest == b"hello world"
    assert await reader.read() == b""
    reader.close()
    reader.close()  # idempotent
