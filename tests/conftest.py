"""Fixtures that run the shim against a real, private containerd.

One containerd per test session lives under a short temp dir (unix socket
paths are limited to 108 bytes), with its CRI plugin disabled. Tests reach
the shim the way kubelet does: the generated CRI client over the unix socket.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import pytest_asyncio
import uvloop
from grpclib.client import Channel

from cri_shim.containerd.embedded import EmbeddedContainerd
from cri_shim.gen.runtime import v1 as cri
from cri_shim.server import Shim
from cri_shim.settings import ContainerdSettings, ServerSettings, Settings, load
from tests.pods import CNI_BIN, POD_IMAGES, USERNS_HANDLER, pod_config, write_conflist
from tests.support.catalog import ServedCatalog, catalog
from tests.support.containerd_matrix import CONTAINERD_MATRIX, ContainerdPeer
from tests.support.peers import require_peer
from tests.support.reaper import reap

REQUIRED_BINARIES = ("containerd", "runc")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    # Production runs on uvloop; so do the tests.
    return {"uvloop": uvloop.new_event_loop}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses the `containerd` fixture (directly or through
    another fixture) as needing a real containerd, so `-m "not containerd"`
    runs the rest; tests that start a containerd of their own carry the mark."""
    for item in items:
        if "containerd" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.containerd)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item (`item.rep_call`), so a fixture's
    teardown can print a daemon's log under a failed test."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def short_tempdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@pytest.fixture(scope="session")
def session_dir() -> Iterator[Path]:
    path = short_tempdir("crishim-")
    # Searchable by all, as containerd's own root and state dirs (0711): the mapped root
    # of a user-namespaced pod must reach its rootfs under the state dir.
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def require_binaries() -> None:
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: install the Debian packages (see .ci/run)",
            pytrace=False,
        )
    if os.geteuid() != 0:
        pytest.fail("containerd tests need root", pytrace=False)


@pytest.fixture(scope="session", params=CONTAINERD_MATRIX)
def containerd_peer(request: pytest.FixtureRequest) -> ContainerdPeer:
    """One containerd version of the matrix: every test using it (directly or
    through `containerd`) runs once per version, named in its id."""
    peer: ContainerdPeer = request.param
    return peer


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def containerd(
    containerd_peer: ContainerdPeer, session_dir: Path
) -> AsyncIterator[EmbeddedContainerd]:
    """The session's private containerd of that version (not restarted automatically)."""
    require_binaries()
    daemon = EmbeddedContainerd(
        session_dir / f"containerd-{containerd_peer.version}",
        binary=containerd_peer.binary(),
        restart=False,
    )
    await daemon.start()
    yield daemon
    await daemon.stop()
    # Only a failed test leaves containers behind; they must not outlive the run.
    await asyncio.to_thread(reap, session_dir)


def make_settings(base: Path, containerd_address: str, **overrides: object) -> Settings:
    (base / "cni").mkdir(parents=True, exist_ok=True)
    dotted = {
        "state_dir": str(base / "state"),
        "server.socket": str(base / "cri.sock"),
        "containerd.address": containerd_address,
        "containerd.embedded": False,
        "containerd.health_interval": 0.2,
        "cni.conf_dir": str(base / "cni"),
        "server.shutdown_grace": 5.0,
        "metrics.port": 0,
    }
    dotted.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load(None, environ={}, overrides=dotted)


@dataclass
class CriClient:
    channel: Channel
    runtime: cri.RuntimeServiceStub
    image: cri.ImageServiceStub

    @classmethod
    def connect(cls, socket: str | Path) -> CriClient:
        channel = Channel(path=str(socket))
        return cls(channel, cri.RuntimeServiceStub(channel), cri.ImageServiceStub(channel))

    def close(self) -> None:
        self.channel.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def shim(session_dir: Path, containerd: EmbeddedContainerd) -> AsyncIterator[Shim]:
    """One in-process shim for the session, talking to the private containerd."""
    settings = make_settings(session_dir / f"shim-{containerd.base.name}", containerd.address)
    server = Shim(settings)
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def client(shim: Shim) -> AsyncIterator[CriClient]:
    crictl = CriClient.connect(shim.socket_path)
    yield crictl
    crictl.close()


async def wait_for(predicate: object, timeout: float, interval: float = 0.1) -> bool:
    """Poll an async predicate until true or timeout; returns its last answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await predicate()  # type: ignore[operator]
        if result or loop.time() >= deadline:
            return bool(result)
        await asyncio.sleep(interval)


@dataclass
class ShimProcess:
    process: asyncio.subprocess.Process
    socket: Path
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


async def start_shim_process(
    args: list[str],
    socket: Path,
    log_path: Path,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
) -> ShimProcess:
    """Run `python -m cri_shim serve ...` (with `env` added to this process's
    environment) and wait until its socket answers."""
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cri_shim",
            "serve",
            *args,
            stdout=log,
            stderr=log,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
    handle = ShimProcess(process, socket, log_path)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if process.returncode is not None:
            raise AssertionError(f"shim exited {process.returncode}:\n{handle.log_text()}")
        client = CriClient.connect(socket)
        try:
            await client.runtime.version(cri.VersionRequest(), timeout=2)
            return handle
        except (TimeoutError, OSError):
            pass
        finally:
            client.close()
        await asyncio.sleep(0.1)
    process.kill()
    raise AssertionError(f"shim did not serve within {timeout}s:\n{handle.log_text()}")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def pod_images() -> AsyncIterator[ServedCatalog]:
    """The pause image (under its real name, through a mirror) and busybox."""
    wanted = [e for e in catalog() if any(n in POD_IMAGES for n in e.names())]
    async with ServedCatalog(entries=wanted) as served:
        yield served


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def pod_shim(
    containerd: EmbeddedContainerd, pod_images: ServedCatalog
) -> AsyncIterator[Shim]:
    """A shim with a real CNI bridge on a private subnet, for tests that run pods."""
    base = short_tempdir("crishim-pods-")
    octet = random.randrange(10, 250)
    bridge = f"crishim{octet}"
    write_conflist(base / "cni", f"10.233.{octet}.0/24", bridge, base / "ipam")
    hosts_dir = pod_images.write_hosts_dir(base / "certs.d")
    settings = make_settings(
        base,
        containerd.address,
        registry__config_path=str(hosts_dir),
        cni__bin_dirs=(CNI_BIN,),
        cni__netns_dir=str(base / "netns"),
        # Its own containerd namespace: other test shims remove images in k8s.io.
        containerd__namespace="crishim-pods",
        # The peer runc (1.2+): user-namespaced pods run on this handler.
        runtime__handlers={USERNS_HANDLER: {"runc_binary": require_peer("RUNC")}},
    )
    shim = Shim(settings)
    await shim.start()
    shim.test_subnet_prefix = f"10.233.{octet}."  # type: ignore[attr-defined]
    yield shim
    await shim.stop()
    subprocess.run(["ip", "link", "delete", bridge], check=False, capture_output=True)


@pytest_asyncio.fixture(loop_scope="session")
async def pods(pod_shim: Shim) -> AsyncIterator[CriClient]:
    """A CRI client of the pod shim; removes every pod the test left behind."""
    client = CriClient.connect(pod_shim.socket_path)
    yield client
    listed = await client.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())
    for item in listed.items:
        await client.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(item.id))
    client.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def busybox(pod_shim: Shim, pod_images: ServedCatalog) -> str:
    """The busybox test image, pulled into the pod shim."""
    return await pull_into(pod_shim, pod_images.local("library/busybox:latest"))


async def pull_into(shim: Shim, ref: str) -> str:
    """Pull `ref` through `shim`'s ImageService; returns `ref`."""
    client = CriClient.connect(shim.socket_path)
    try:
        await client.image.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=ref)))
    finally:
        client.close()
    return ref


@pytest_asyncio.fixture(loop_scope="session")
async def pod(pods: CriClient, tmp_path: Path) -> AsyncIterator[tuple[str, cri.PodSandboxConfig]]:
    """A running pod (id, config) with a log directory; removed afterwards."""
    config = pod_config("ctr", log_directory=str(tmp_path / "logs"))
    reply = await pods.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    yield reply.pod_sandbox_id, config
    await pods.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(reply.pod_sandbox_id))


__all__ = [
    "ContainerdSettings",
    "CriClient",
    "ServerSettings",
    "ShimProcess",
    "make_settings",
    "replace",
    "short_tempdir",
    "start_shim_process",
    "wait_for",
]
