"""The log formats operators parse: JSON (what the DaemonSet configures) one
object per line, and key=value text, both keeping every field of an event."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from cri_shim import logs
from cri_shim.containerd.embedded import EmbeddedContainerd
from cri_shim.gen.runtime import v1 as cri
from cri_shim.logs import log_event

from .conftest import CriClient, short_tempdir, start_shim_process
from .test_serve import write_config

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """What the root handler writes once `configure` ran; the root logger restored."""
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


def configure(stream: io.StringIO, level: str, fmt: str) -> None:
    logs.configure(level, fmt)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)


def test_json_lines_carry_every_field_and_survive_odd_values(captured: io.StringIO) -> None:
    configure(captured, "debug", "json")
    log = logging.getLogger("cri_shim.test")
    log_event(log, 'two\nlines "quoted"', container="c1", pod="p 1", path=Path("/x"), count=3)
    log_event(log, "skipped empties", container="c2", pod="", sandbox=None)
    try:
        raise ValueError("boom")
    except ValueError:
        log_event(log, "failed", level=logging.ERROR, exc_info=True, container="c3")
    lines = captured.getvalue().splitlines()
    assert len(lines) == 3  # one line per event, a newline in the message included
    first, second, third = (json.loads(line) for line in lines)
    assert TIME.match(first.pop("time"))
    assert first == {
        "level": "info",
        "logger": "cri_shim.test",
        "msg": 'two\nlines "quoted"',
        "container": "c1",
        "pod": "p 1",
        "path": "/x",  # not JSON-serialisable: written as text
        "count": 3,
    }
    assert "pod" not in second and "sandbox" not in second  # empty fields are left out
    assert third["level"] == "error" and third["container"] == "c3"
    assert "ValueError: boom" in third["error_trace"] and "Traceback" in third["error_trace"]


def test_text_lines_quote_what_needs_it(captured: io.StringIO) -> None:
    configure(captured, "info", "text")
    log = logging.getLogger("cri_shim.test")
    log_event(log, "container exited", container="c1", reason="Completed", detail="a b")
    log_event(log, "hidden", level=logging.DEBUG, container="c2")
    (line,) = captured.getvalue().splitlines()
    stamp, rest = line.split(" ", 1)
    assert TIME.match(stamp)
    assert rest == (
        'level=info logger=cri_shim.test msg="container exited" container=c1'
        ' reason=Completed detail="a b"'
    )


async def test_serve_with_json_logs_writes_only_json(containerd: EmbeddedContainerd) -> None:
    """`cri-shim serve --log-format json`, as the DaemonSet runs it: every line the
    process writes, from start to SIGTERM, is one JSON object with the base keys."""
    base = short_tempdir("crishim-json-")
    config = write_config(base, containerd.address)
    sock = base / "run" / "cri.sock"
    shim = await start_shim_process(
        ["--config", str(config), "--log-format", "json", "--log-level", "debug"],
        sock,
        base / "shim.log",
    )
    try:
        client = CriClient.connect(sock)
        await client.runtime.version(cri.VersionRequest())
        client.close()
    finally:
        shim.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(shim.process.wait(), 30) == 0
    lines = shim.log_text().splitlines()
    assert lines
    events = [json.loads(line) for line in lines]
    for event in events:
        assert {"time", "level", "logger", "msg"} <= set(event), event
        assert TIME.match(event["time"]), event
    assert "cri-shim stopped" in [event["msg"] for event in events]
