"""Helpers for tests that run real pods: a CNI bridge config, pod configs, and
creating/awaiting containers through the CRI."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cri_shim.gen.runtime import v1 as cri

if TYPE_CHECKING:
    from tests.conftest import CriClient

CNI_BIN = "/usr/lib/cni"
# The runtime handler test shims run with the peer runc (tests/peers/build.sh), the
# one that can id-map mounts: user-namespaced pods need it.
USERNS_HANDLER = "runc-current"
# Images the pod tests need from the catalog: the pause image, busybox, a layered
# image, and one with a STOPSIGNAL.
POD_IMAGES = (
    "registry.k8s.io/pause:3.9",
    "library/busybox:latest",
    "test/multilayer:1",
    "test/stopsignal:1",
)


def pod_config(name: str, **kwargs: object) -> cri.PodSandboxConfig:
    uid = f"uid-{name}-{random.randrange(1 << 30)}"
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, namespace="sandbox-test", uid=uid),
        **kwargs,  # type: ignore[arg-type]
    )


def write_conflist(conf_dir: Path, subnet: str, bridge: str, data_dir: Path) -> None:
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "10-test.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": "crishim-sandbox-test",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": bridge,
                        "isGateway": True,
                        "ipMasq": False,
                        "hairpinMode": True,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": subnet}]],
                            "dataDir": str(data_dir),
                            "routes": [{"dst": "0.0.0.0/0"}],
                        },
                    },
                    {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
                    {"type": "loopback"},
                ],
            }
        )
    )


async def make_container(
    pods: CriClient,
    pod: tuple[str, cri.PodSandboxConfig],
    image: str,
    command: list[str],
    *,
    name: str = "app",
    start: bool = True,
    log_path: str = "",
    **config: object,
) -> str:
    sandbox_id, sandbox_config = pod
    reply = await pods.runtime.create_container(
        cri.CreateContainerRequest(
            pod_sandbox_id=sandbox_id,
            config=cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name=name),
                image=cri.ImageSpec(image=image),
                command=command,
                log_path=log_path or f"{name}.log",
                **config,  # type: ignore[arg-type]
            ),
            sandbox_config=sandbox_config,
        )
    )
    if start:
        await pods.runtime.start_container(cri.StartContainerRequest(reply.container_id))
    return reply.container_id


async def wait_exited(
    pods: CriClient, container_id: str, timeout: float = 15
) -> cri.ContainerStatus:
    """The container's status once it has exited; fails the test if it has not
    within `timeout` (a still-running container must never pass as exited)."""
    deadline = time.monotonic() + timeout
    while True:
        status = (
            await pods.runtime.container_status(cri.ContainerStatusRequest(container_id))
        ).status
        assert status is not None
        if status.state == cri.ContainerState.CONTAINER_EXITED:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(
                f"container {container_id} not exited after {timeout}s: {status.state!r}"
            )
        await asyncio.sleep(0.1)


def write_shim_config(
    base: Path,
    hosts_dir: Path,
    address: str,
    *,
    embedded: bool = False,
    containerd_extra: str = "",
    handlers: dict[str, str] | None = None,
) -> Path:
    """A `cri-shim serve --config` file keeping everything under `base` (for
    shims run as processes: recovery tests, critest, the benchmark)."""
    config = base / "cri-shim.toml"
    config.write_text(
        f'state_dir = "{base / "state"}"\n'
        "[server]\n"
        f'socket = "{base / "cri.sock"}"\n'
        "[containerd]\n"
        f'address = "{address}"\n'
        f"embedded = {'true' if embedded else 'false'}\n"
        f"{containerd_extra}"
        "[cni]\n"
        f'conf_dir = "{base / "cni"}"\n'
        f'bin_dirs = ["{CNI_BIN}"]\n'
        f'netns_dir = "{base / "netns"}"\n'
        "[registry]\n"
        f'config_path = "{hosts_dir}"\n'
        "[metrics]\n"
        "port = 0\n"
        + "".join(
            f'[runtime.handlers."{name}"]\nrunc_binary = {json.dumps(binary)}\n'
            for name, binary in (handlers or {}).items()
        )
    )
    return config
