"""`cri-shim serve` as a real process: socket handling, signals, embedded containerd."""

from __future__ import annotations

import asyncio
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cri_shim.containerd.embedded import EmbeddedContainerd
from cri_shim.gen.runtime import v1 as cri
from cri_shim.server import Shim
from cri_shim.settings import SettingsError

from .conftest import CriClient, make_settings, short_tempdir, start_shim_process


def write_config(base: Path, containerd_address: str, embedded: bool = False) -> Path:
    config = base / "cri-shim.toml"
    config.write_text(
        f'state_dir = "{base / "state"}"\n'
        "[server]\n"
        f'socket = "{base / "run" / "cri.sock"}"\n'
        "[containerd]\n"
        f'address = "{containerd_address}"\n'
        f"embedded = {'true' if embedded else 'false'}\n"
        "health_interval = 0.2\n"
        "[cni]\n"
        f'conf_dir = "{base / "cni"}"\n'
        "[metrics]\n"
        "port = 0\n"
    )
    return config


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cri_shim", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_serves_on_socket_and_exits_cleanly_on_sigterm(
    containerd: EmbeddedContainerd,
) -> None:
    base = short_tempdir("crishim-serve-")
    config = write_config(base, containerd.address)
    sock = base / "run" / "cri.sock"
    shim = await start_shim_process(["--config", str(config)], sock, base / "shim.log")
    try:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        client = CriClient.connect(sock)
        reply = await client.runtime.status(cri.StatusRequest())
        client.close()
        assert reply.status is not None
        assert {c.type: c.status for c in reply.status.conditions}["RuntimeReady"] is True

        # A second server on the same socket must refuse, not steal it.
        second = await asyncio.to_thread(run_cli, "serve", "--config", str(config))
        assert second.returncode != 0
        assert second.stderr.strip().splitlines()[-1] == (
            f"cri-shim: another server is already listening on {sock}"
        )
    finally:
        shim.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(shim.process.wait(), 30)
    assert code == 0, shim.log_text()
    assert not sock.exists()
    assert "cri-shim stopped" in shim.log_text()


async def test_stale_socket_is_replaced(containerd: EmbeddedContainerd) -> None:
    base = short_tempdir("crishim-stale-")
    config = write_config(base, containerd.address)
    sock = base / "run" / "cri.sock"
    sock.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # bound but nobody listens: what a crashed server leaves behind
    shim = await start_shim_process(["--config", str(config)], sock, base / "shim.log")
    shim.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(shim.process.wait(), 30) == 0
    assert "removed stale socket" in shim.log_text()


def test_refuses_a_path_that_is_not_a_socket(tmp_path: Path) -> None:
    target = tmp_path / "cri.sock"
    target.write_text("precious")
    result = run_cli(
        "serve",
        "--socket",
        str(target),
        "--state-dir",
        str(tmp_path / "state"),
        "--containerd-address",
        str(tmp_path / "none.sock"),
        "--no-embedded-containerd",
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"cri-shim: {target} exists and is not a socket; refusing to replace it"
    )
    assert target.read_text() == "precious"


def test_socket_dir_not_writable_is_one_clear_line(tmp_path: Path) -> None:
    readonly = tmp_path / "ro"
    readonly.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)], check=False
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        result = run_cli(
            "serve",
            "--socket",
            str(readonly / "sub" / "cri.sock"),
            "--state-dir",
            str(tmp_path / "state"),
            "--containerd-address",
            str(tmp_path / "none.sock"),
            "--no-embedded-containerd",
        )
    finally:
        subprocess.run(["umount", str(readonly)], check=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"cri-shim: cannot create socket dir {readonly / 'sub'}")
    assert "Read-only file system" in lines[0]


def test_unreadable_toml_exits_nonzero(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[server\n")
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "is not valid TOML" in result.stderr


@pytest.mark.containerd  # starts a containerd of its own
async def test_starts_a_private_containerd_when_none_is_reachable() -> None:
    base = short_tempdir("crishim-emb-")
    config = write_config(base, str(base / "no-containerd.sock"), embedded=True)
    sock = base / "run" / "cri.sock"
    shim = await start_shim_process(["--config", str(config)], sock, base / "shim.log", timeout=60)
    private_sock = base / "state" / "containerd" / "containerd.sock"
    try:
        client = CriClient.connect(sock)
        reply = await client.runtime.status(cri.StatusRequest(verbose=True))
        client.close()
        assert reply.status is not None
        assert {c.type: c.status for c in reply.status.conditions}["RuntimeReady"] is True
        assert str(private_sock) in reply.info["containerd"]
        config_text = (base / "state" / "containerd" / "config.toml").read_text()
        assert 'disabled_plugins = ["io.containerd.grpc.v1.cri"]' in config_text
    finally:
        shim.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(shim.process.wait(), 30) == 0
    assert "private containerd stopped" in shim.log_text()
    pids = [
        line.split("pid=")[1].split()[0]
        for line in shim.log_text().splitlines()
        if "private containerd started" in line
    ]
    assert pids
    assert not Path(f"/proc/{pids[-1]}").exists() or _is_zombie(pids[-1])


def _is_zombie(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


async def test_a_start_that_fails_half_way_stops_what_it_started(
    containerd: EmbeddedContainerd,
) -> None:
    """The metrics port is taken, so start() fails at its last step, after the
    containerd client, health watcher, images, CNI watch, event stream,
    streaming server and CRI socket are up: each of those is stopped again."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    base = short_tempdir("crishim-halfway-")
    try:
        settings = make_settings(base, containerd.address, metrics__port=taken.getsockname()[1])
        shim = Shim(settings)
        before = {task for task in asyncio.all_tasks() if not task.done()}
        with pytest.raises(SettingsError, match="cannot serve metrics"):
            await shim.start()
        assert shim.streaming is not None and shim.events is not None  # they had started
        assert not Path(settings.server.socket).exists()  # the CRI socket is closed again
        leftover = {t for t in asyncio.all_tasks() if not t.done()} - before
        leftover.discard(asyncio.current_task())
        assert not leftover, leftover
        await shim.stop()  # nothing left to stop: a no-op
    finally:
        taken.close()
