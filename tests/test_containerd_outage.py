"""containerd going away and coming back while the shim serves."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from grpclib import GRPCError

from cri_shim.containerd.client import ContainerdClient
from cri_shim.containerd.embedded import EmbeddedContainerd
from cri_shim.gen.containerd.services.containers import v1 as containers_v1
from cri_shim.gen.google.protobuf import Empty
from cri_shim.gen.runtime import v1 as cri
from cri_shim.server import Shim

from .conftest import CriClient, make_settings, short_tempdir, wait_for
from .support.containerd_matrix import ContainerdPeer

# Starts a containerd of its own.
pytestmark = pytest.mark.containerd


@pytest_asyncio.fixture(loop_scope="session")
async def fragile(
    containerd_peer: ContainerdPeer,
) -> AsyncIterator[tuple[EmbeddedContainerd, Shim, CriClient]]:
    """A containerd of this test's own, so killing it disturbs no other test."""
    base = short_tempdir("crishim-out-")
    daemon = EmbeddedContainerd(base / "containerd", binary=containerd_peer.binary(), restart=False)
    await daemon.start()
    shim = Shim(make_settings(base, daemon.address))
    await shim.start()
    client = CriClient.connect(shim.socket_path)
    yield daemon, shim, client
    client.close()
    await shim.stop()
    await daemon.stop()


async def runtime_ready(client: CriClient) -> bool:
    reply = await client.runtime.status(cri.StatusRequest())
    assert reply.status is not None
    return {c.type: c.status for c in reply.status.conditions}["RuntimeReady"]


async def test_runtime_ready_follows_containerd(
    fragile: tuple[EmbeddedContainerd, Shim, CriClient],
) -> None:
    daemon, _, client = fragile
    assert await runtime_ready(client)

    daemon.kill()
    assert await wait_for(lambda: _negate(runtime_ready(client)), timeout=5)
    reply = await client.runtime.status(cri.StatusRequest())
    assert reply.status is not None
    runtime = {c.type: c for c in reply.status.conditions}["RuntimeReady"]
    assert runtime.reason == "ContainerdNotServing"
    assert daemon.address in runtime.message

    await daemon.start()
    assert await wait_for(lambda: runtime_ready(client), timeout=10)


async def _negate(pending: object) -> bool:
    return not await pending  # type: ignore[misc]


async def test_embedded_containerd_is_restarted_after_a_crash(
    containerd_peer: ContainerdPeer,
) -> None:
    base = short_tempdir("crishim-sup-")
    daemon = EmbeddedContainerd(base / "containerd", binary=containerd_peer.binary(), restart=True)
    await daemon.start()
    try:
        first_pid = daemon.pid
        daemon.kill()

        async def restarted() -> bool:
            return daemon.restarts == 1 and daemon.pid != first_pid

        assert await wait_for(restarted, timeout=15)
        # A new pid is not enough: the restarted containerd answers on its socket.
        client = ContainerdClient(daemon.address, "crishim-sup")
        try:

            async def serving() -> bool:
                try:
                    reply = await client.version_service.version(Empty(), timeout=2)
                except (OSError, TimeoutError, GRPCError):
                    return False
                return bool(reply.version)

            assert await wait_for(serving, timeout=30)
            listed = await client.containers.list(containers_v1.ListContainersRequest())
            assert listed.containers == []
        finally:
            client.close()
    finally:
        await daemon.stop()
