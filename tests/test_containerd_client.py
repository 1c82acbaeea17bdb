"""The containerd client layer against the real, private containerd."""

from pathlib import Path

import pytest
from grpclib.const import Status

from cri_shim.containerd.client import ContainerdClient
from cri_shim.containerd.embedded import EmbeddedContainerd
from cri_shim.errors import ContainerdError, ContainerdUnavailable
from cri_shim.gen.containerd.services.containers import v1 as containers_v1
from cri_shim.gen.containerd.services.namespaces import v1 as namespaces_v1


async def test_version_and_health(containerd: EmbeddedContainerd) -> None:
    client = ContainerdClient(containerd.address, "k8s.io")
    try:
        version = await client.server_version(timeout=5)
        assert version.version.lstrip("v").startswith(("1.", "2."))
        assert await client.is_serving(timeout=2)
    finally:
        client.close()


async def test_namespace_header_is_sent_on_every_call(containerd: EmbeddedContainerd) -> None:
    client = ContainerdClient(containerd.address, "crishim-test-ns")
    try:
        await client.call(
            "Namespaces.Create",
            client.namespaces.create(
                namespaces_v1.CreateNamespaceRequest(
                    namespace=namespaces_v1.Namespace(name="crishim-test-ns")
                )
            ),
        )
        listed = await client.call(
            "Containers.List", client.containers.list(containers_v1.ListContainersRequest())
        )
        assert listed.containers == []
        with pytest.raises(ContainerdError) as caught:
            await client.call(
                "Containers.Get",
                client.containers.get(containers_v1.GetContainerRequest(id="no-such-container")),
            )
        assert caught.value.status is Status.NOT_FOUND
        assert "Containers.Get" in str(caught.value)
    finally:
        await client.call(
            "Namespaces.Delete",
            client.namespaces.delete(namespaces_v1.DeleteNamespaceRequest(name="crishim-test-ns")),
        )
        client.close()


async def test_unreachable_socket_fails_fast_as_unavailable(tmp_path: Path) -> None:
    client = ContainerdClient(str(tmp_path / "absent.sock"), "k8s.io")
    try:
        with pytest.raises(ContainerdUnavailable, match="not reachable"):
            await client.server_version(timeout=5)
        assert not await client.is_serving(timeout=1)
    finally:
        client.close()
