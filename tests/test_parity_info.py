"""Side by side with containerd 2.4's built-in CRI: what `crictl inspect`,
`inspectp`, `inspecti` and `info` show (the verbose `info` maps).

Both runtimes run on the same containerd build (tests/benchmarks/daemons.py
`start_runtimes`: one with its CRI, one without it under `cri-shim serve`) and
get the same requests. The checks: container and sandbox info have containerd's
keys in containerd's order; their values agree apart from ids, paths and pids;
`runtimeSpec` is equal once those are normalised (for containers, the pause
container and a host-network pause container); image info is byte-identical;
Status(verbose) carries containerd's keys.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from cri_shim.gen.runtime import v1 as cri
from tests.benchmarks.daemons import ContainerdBuild, start_runtimes
from tests.conftest import CriClient, short_tempdir
from tests.pods import pod_config
from tests.support.catalog import ServedCatalog
from tests.support.peers import peer_path

pytestmark = pytest.mark.containerd

BUSYBOX = "library/busybox:latest"
SANDBOX_IMAGE = "registry.k8s.io/pause:3.9"
CONTAINER_KEYS = [
    "sandboxID",
    "pid",
    "removing",
    "snapshotKey",
    "snapshotter",
    "runtimeType",
    "runtimeOptions",
    "config",
    "runtimeSpec",
]
SANDBOX_KEYS = [
    "pid",
    "processStatus",
    "netNamespaceClosed",
    "image",
    "snapshotKey",
    "snapshotter",
    "runtimeType",
    "runtimeOptions",
    "config",
    "runtimeSpec",
    "cniResult",
    "sandboxMetadata",
]
# Status info keys containerd has and cri-shim does not: the Go version it was built with.
STATUS_KEYS_NOT_SHARED = {"golang"}

Spec = dict[str, Any]


def normalise(value: Any, replacements: dict[str, str]) -> Any:
    """Ids, pids and runtime-private paths replaced by placeholders."""
    text = json.dumps(value)
    for old, new in replacements.items():
        text = text.replace(old, new)
    text = re.sub(r"/proc/\d+/ns/", "/proc/<pid>/ns/", text)
    return json.loads(text)


def normalise_mount_sources(spec: Spec) -> None:
    """Bind sources under each runtime's private dirs: only the file name is shared."""
    for mount in spec.get("mounts", []):
        if mount.get("type") == "bind" and mount["source"].startswith("/"):
            mount["source"] = "<dir>/" + Path(mount["source"]).name


@dataclass
class Side:
    """One runtime's answers for the same scenario."""

    client: CriClient
    base: Path
    log_dir: Path
    image: str
    infos: dict[str, dict[str, Any]]
    ids: dict[str, str]
    status_info: dict[str, str]
    image_info: str


async def verbose_container(client: CriClient, container_id: str) -> dict[str, Any]:
    reply = await client.runtime.container_status(
        cri.ContainerStatusRequest(container_id, verbose=True)
    )
    parsed: dict[str, Any] = json.loads(reply.info["info"])
    return parsed


async def verbose_pod(client: CriClient, pod_id: str) -> dict[str, Any]:
    reply = await client.runtime.pod_sandbox_status(
        cri.PodSandboxStatusRequest(pod_id, verbose=True)
    )
    parsed: dict[str, Any] = json.loads(reply.info["info"])
    return parsed


async def crictl_json(endpoint: str, *args: str) -> dict[str, Any]:
    """`crictl <command> -o json <id>` against `endpoint`, parsed."""
    process = await asyncio.create_subprocess_exec(
        peer_path("CRICTL"),
        "--runtime-endpoint",
        f"unix://{endpoint}",
        *args[:-1],
        "-o",
        "json",
        args[-1],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    parsed: dict[str, Any] = json.loads(out)
    return parsed


async def run_scenario(
    client: CriClient, endpoint: str, image: str, log_dir: Path, uid: str
) -> Side:
    """Pull; a pod with a container through created/running/exited; the pod stopped;
    a host-network pod; Status and ImageStatus, all verbose."""
    await client.image.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
    config = pod_config("parity", log_directory=str(log_dir), hostname="parity-host")
    assert config.metadata is not None
    config.metadata.uid = uid
    config.labels = {"app": "parity"}
    config.annotations = {"note": "<&>"}
    pod_id = (
        await client.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    ).pod_sandbox_id
    container = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="app", attempt=1),
        image=cri.ImageSpec(image=image),
        command=["sleep", "3600"],
        envs=[cri.KeyValue(key="GREETING", value=b"hello world")],
        labels={"tier": "web"},
        annotations={"owner": "parity"},
        log_path="app.log",
    )
    container_id = (
        await client.runtime.create_container(
            cri.CreateContainerRequest(pod_id, container, sandbox_config=config)
        )
    ).container_id
    infos = {"container created": await verbose_container(client, container_id)}
    await client.runtime.start_container(cri.StartContainerRequest(container_id))
    infos["container running"] = await verbose_container(client, container_id)
    infos["pod ready"] = await verbose_pod(client, pod_id)
    infos["crictl inspect"] = await crictl_json(endpoint, "inspect", container_id)
    infos["crictl inspectp"] = await crictl_json(endpoint, "inspectp", pod_id)
    await client.runtime.stop_container(cri.StopContainerRequest(container_id, 1))
    infos["container exited"] = await verbose_container(client, container_id)
    await client.runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_id))
    infos["pod stopped"] = await verbose_pod(client, pod_id)

    host = pod_config(
        "parity-host",
        log_directory=str(log_dir / "host"),
        linux=cri.LinuxPodSandboxConfig(
            security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=cri.NamespaceOption(network=cri.NamespaceMode.NODE)
            )
        ),
    )
    assert host.metadata is not None
    host.metadata.uid = uid + "-host"
    host_id = (
        await client.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=host))
    ).pod_sandbox_id
    infos["host-network pod ready"] = await verbose_pod(client, host_id)

    status = await client.runtime.status(cri.StatusRequest(verbose=True))
    image_status = await client.image.image_status(
        cri.ImageStatusRequest(image=cri.ImageSpec(image=image), verbose=True)
    )
    for pod in (pod_id, host_id):
        await client.runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(pod))
        await client.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod))
    return Side(
        client,
        Path(),
        log_dir,
        image,
        infos,
        {"<pod>": pod_id, "<container>": container_id, "<host-pod>": host_id, "<uid>": uid},
        dict(status.info),
        image_status.info["info"],
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def sides(pod_images: ServedCatalog) -> AsyncIterator[tuple[Side, Side]]:
    """(containerd 2.4's CRI, cri-shim on containerd 2.4) after the same scenario."""
    base = short_tempdir("crishim-parity-")
    hosts_dir = pod_images.write_hosts_dir(base / "certs.d")
    local = pod_images.endpoint("local")
    (hosts_dir / local).mkdir(parents=True, exist_ok=True)
    (hosts_dir / local / "hosts.toml").write_text(
        f'server = "http://{local}"\n\n[host."http://{local}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    build = ContainerdBuild.find(peer_path("CONTAINERD2"))
    image = pod_images.local(BUSYBOX)
    async with start_runtimes(base, [build], hosts_dir, "10.241") as runtimes:
        pair = runtimes.pairs[0]
        answers = []
        for index, name in enumerate((pair.anchor, pair.shim)):
            client = CriClient.connect(runtimes.endpoints[name])
            try:
                side = await run_scenario(
                    client,
                    runtimes.endpoints[name],
                    image,
                    base / f"logs{index}",
                    f"uid-parity-{index}",
                )
            finally:
                client.close()
            side.base = base / ("cd0" if index == 0 else "shim0")
            answers.append(side)
        yield answers[0], answers[1]


def replacements(side: Side) -> dict[str, str]:
    """Longest first, so an id inside a path is replaced after the path's prefix."""
    pairs = {value: key for key, value in side.ids.items()}
    pairs[str(side.log_dir)] = "<logs>"
    return dict(sorted(pairs.items(), key=lambda kv: -len(kv[0])))


STAGES = [
    "container created",
    "container running",
    "container exited",
    "pod ready",
    "pod stopped",
    "host-network pod ready",
]


@pytest.mark.parametrize("stage", STAGES)
async def test_info_keys_match_containerd(sides: tuple[Side, Side], stage: str) -> None:
    containerd, shim = sides
    expected = CONTAINER_KEYS if stage.startswith("container") else SANDBOX_KEYS
    assert list(containerd.infos[stage]) == expected  # what containerd 2.4.2 sends
    assert list(shim.infos[stage]) == expected


@pytest.mark.parametrize("stage", STAGES)
async def test_info_values_match_containerd(sides: tuple[Side, Side], stage: str) -> None:
    """Every value but the spec, the CNI result and pids, with ids and paths normalised."""
    containerd, shim = sides
    theirs = normalise(containerd.infos[stage], replacements(containerd))
    ours = normalise(shim.infos[stage], replacements(shim))
    for info in (theirs, ours):
        info.pop("runtimeSpec")
        assert (info["pid"] > 0) == stage.endswith(("running", "ready"))
        info.pop("pid")
        for holder in (info, info.get("sandboxMetadata", {}).get("Metadata", {})):
            for key in ("cniResult", "CNIResult", "NetNSPath", "IP"):
                holder.pop(key, None)
    assert ours == theirs


@pytest.mark.parametrize("stage", ["container running", "pod ready", "host-network pod ready"])
async def test_runtime_spec_matches_containerd(sides: tuple[Side, Side], stage: str) -> None:
    containerd, shim = sides
    theirs = normalise(containerd.infos[stage]["runtimeSpec"], replacements(containerd))
    ours = normalise(shim.infos[stage]["runtimeSpec"], replacements(shim))
    for spec in (theirs, ours):
        normalise_mount_sources(spec)
        for namespace in spec["linux"]["namespaces"]:
            if namespace["type"] == "network" and "/proc/" not in namespace.get("path", "/proc/"):
                namespace["path"] = "<netns>"
        spec["annotations"].pop("io.kubernetes.cri.sandbox-log-directory", None)
    assert ours == theirs


async def test_cni_result_matches_containerd(sides: tuple[Side, Side]) -> None:
    """The pod's interface and IP as go-cni reports them; containerd also runs its
    own loopback network (`lo`, a second DNS entry), cri-shim only the configured one."""
    containerd, shim = sides
    for side in (containerd, shim):
        info = side.infos["pod ready"]
        result = info["cniResult"]
        assert result == info["sandboxMetadata"]["Metadata"]["CNIResult"]
        eth0 = result["Interfaces"]["eth0"]
        assert eth0["IPConfigs"][0]["IP"] == info["sandboxMetadata"]["Metadata"]["IP"]
        assert eth0["Sandbox"] == info["sandboxMetadata"]["Metadata"]["NetNSPath"]
        assert set(eth0) == {"IPConfigs", "Mac", "Sandbox", "PciID", "SocketPath"}
        assert side.infos["host-network pod ready"]["cniResult"] is None
    in_pod = {
        side: sorted(
            name
            for name, entry in s.infos["pod ready"]["cniResult"]["Interfaces"].items()
            if entry["Sandbox"]
        )
        for side, s in (("containerd", containerd), ("shim", shim))
    }
    assert in_pod == {"containerd": ["eth0", "lo"], "shim": ["eth0"]}
    theirs = containerd.infos["pod ready"]["cniResult"]
    ours = shim.infos["pod ready"]["cniResult"]
    assert ours["Routes"] == theirs["Routes"]
    assert len(theirs["DNS"]) == len(ours["DNS"]) + 1


async def test_image_info_is_byte_identical(sides: tuple[Side, Side]) -> None:
    containerd, shim = sides
    assert shim.image_info == containerd.image_info


async def test_status_info_has_containerd_keys(sides: tuple[Side, Side]) -> None:
    containerd, shim = sides
    assert set(containerd.status_info) - STATUS_KEYS_NOT_SHARED <= set(shim.status_info)
    theirs = json.loads(containerd.status_info["config"])
    ours = json.loads(shim.status_info["config"])
    assert set(theirs) <= set(ours)
    for section in ("containerd", "cni"):
        assert set(theirs[section]) <= set(ours[section])
    assert set(theirs["containerd"]["runtimes"]["runc"]) <= set(
        ours["containerd"]["runtimes"]["runc"]
    )
    # Same meaning, same value (both configured alike by start_runtimes).
    for key in ("maxContainerLogLineSize", "restrictOOMScoreAdj", "disableApparmor"):
        assert ours[key] == theirs[key], key
    assert ours["cni"]["binDirs"] == theirs["cni"]["binDirs"]
    assert ours["containerd"]["defaultRuntimeName"] == theirs["containerd"]["defaultRuntimeName"]
    # containerd 1.x's keys, which scripts read, and cri-shim's own settings beside them.
    assert ours["sandboxImage"] == SANDBOX_IMAGE
    assert ours["containerd"]["snapshotter"] == "overlayfs"
    assert ours["runtime"]["sandbox_image"] == SANDBOX_IMAGE
    assert ours["containerd"]["address"] == ours["containerdEndpoint"]
    cni_theirs = json.loads(containerd.status_info["cniconfig"])
    cni_ours = json.loads(shim.status_info["cniconfig"])
    assert set(cni_theirs) <= set(cni_ours)
    # containerd lists its own loopback network first; the configured one matches.
    configured = cni_theirs["Networks"][-1]
    assert [n["Config"]["Name"] for n in cni_ours["Networks"]] == [configured["Config"]["Name"]]
    assert cni_ours["Networks"][0]["IFName"] == configured["IFName"] == "eth0"
    ours_plugins = [p["Network"] for p in cni_ours["Networks"][0]["Config"]["Plugins"]]
    assert ours_plugins == [p["Network"] for p in configured["Config"]["Plugins"]]
    assert shim.status_info["lastCNILoadStatus.default"] == "OK"


async def test_crictl_inspect_shows_the_same_document(sides: tuple[Side, Side]) -> None:
    """What operators run: `crictl inspect | jq .info.runtimeSpec`, env values as text."""
    containerd, shim = sides
    for command, keys in (("crictl inspect", CONTAINER_KEYS), ("crictl inspectp", SANDBOX_KEYS)):
        theirs, ours = containerd.infos[command], shim.infos[command]
        assert list(ours) == list(theirs), command
        # crictl prints the info's keys sorted.
        assert list(ours["info"]) == list(theirs["info"]) == sorted(keys), command
        assert set(ours["status"]) == set(theirs["status"]), command
    for side in (containerd, shim):
        info = side.infos["crictl inspect"]["info"]
        assert info["runtimeSpec"]["process"]["args"] == ["sleep", "3600"]
        assert info["config"]["envs"] == [{"key": "GREETING", "value": "hello world"}]
        assert "GREETING=hello world" in info["runtimeSpec"]["process"]["env"]
