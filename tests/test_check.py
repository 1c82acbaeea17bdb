"""`cri-shim check` against a real containerd, and each host check on fake trees."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from cri_shim import check
from cri_shim.check import Node, Outcome, run_checks
from cri_shim.containerd.client import ContainerdClient, ContainerdVersion
from cri_shim.containerd.embedded import EmbeddedContainerd
from cri_shim.settings import Settings, load

from .conftest import short_tempdir

PLUGINS = ("bridge", "host-local", "loopback", "portmap")


def cni_dirs(base: Path, plugin: str = "bridge") -> tuple[Path, Path]:
    """A conf dir naming `plugin`, and a bin dir holding the usual plugins."""
    conf, bins = base / "net.d", base / "bin"
    conf.mkdir(parents=True)
    bins.mkdir()
    for name in PLUGINS:
        (bins / name).write_text("#!/bin/sh\n")
    (conf / "10-pods.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": "pods",
                "plugins": [{"type": plugin}, {"type": "portmap"}],
            }
        )
    )
    return conf, bins


async def run_check(base: Path, *args: str, bins: Path) -> tuple[int, list[str]]:
    """`python -m cri_shim check` as an operator runs it, off the event loop."""
    env = dict(os.environ, CRI_SHIM_CNI_BIN_DIRS=str(bins))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cri_shim",
        "check",
        "--socket",
        str(base / "run" / "cri.sock"),
        "--state-dir",
        str(base / "state"),
        "--timeout",
        "3",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, output.decode().splitlines()


def line(lines: list[str], name: str) -> str:
    found = [text for text in lines if text.split(":")[0].split(" ", 1)[-1] == name]
    assert len(found) == 1, lines
    return found[0]


async def test_healthy_node_passes(containerd: EmbeddedContainerd) -> None:
    base = short_tempdir("crishim-chk-")
    conf, bins = cni_dirs(base)
    code, lines = await run_check(
        base,
        "--containerd-address",
        containerd.address,
        "--no-embedded-containerd",
        "--cni-conf-dir",
        str(conf),
        bins=bins,
    )
    assert code == 0, "\n".join(lines)
    assert all(text.split(" ", 1)[0] in ("PASS", "WARN") for text in lines), lines
    assert line(lines, "containerd").startswith(
        f"PASS containerd: containerd {containerd.version} "
    )
    assert containerd.address in line(lines, "containerd")
    assert line(lines, "snapshotter").startswith("PASS snapshotter: containerd's overlayfs")
    assert line(lines, "runc").startswith("PASS runc: runc ")
    # Debian's runc 1.1.5 and no other handler configured: no id-mapped mounts.
    assert line(lines, "user namespaces").startswith(
        "WARN user namespaces: no runtime handler can run user-namespaced pods "
        "(runc: runc cannot make id-mapped mounts"
    )
    assert line(lines, "cni") == (
        f"PASS cni: network 'pods' from {conf / '10-pods.conflist'} "
        "(cniVersion 1.0.0; plugins bridge, portmap found)"
    )
    for name in ("overlayfs", "socket", "state dir", "netns"):
        assert line(lines, name).startswith("PASS "), lines
    assert line(lines, "cgroups").split(" ")[0] in ("PASS", "WARN")


async def test_broken_cni_config_fails(containerd: EmbeddedContainerd) -> None:
    base = short_tempdir("crishim-chk-")
    conf, bins = cni_dirs(base, plugin="flannel")
    code, lines = await run_check(
        base,
        "--containerd-address",
        containerd.address,
        "--no-embedded-containerd",
        "--cni-conf-dir",
        str(conf),
        bins=bins,
    )
    assert code == 1
    assert line(lines, "cni") == (
        f"FAIL cni: {conf / '10-pods.conflist'}: plugin binary 'flannel' not found in {bins}"
    )
    assert line(lines, "containerd").startswith("PASS ")


async def test_missing_containerd_fails(tmp_path: Path) -> None:
    base = short_tempdir("crishim-chk-")
    conf, bins = cni_dirs(base)
    address = base / "no-containerd.sock"
    code, lines = await run_check(
        base,
        "--containerd-address",
        str(address),
        "--no-embedded-containerd",
        "--cni-conf-dir",
        str(conf),
        bins=bins,
    )
    assert code == 1
    assert line(lines, "containerd") == (
        f"FAIL containerd: not reachable at {address}: [Errno 2] No such file or directory"
    )
    assert not any(text.startswith(("PASS snapshotter", "FAIL snapshotter")) for text in lines)


def settings_for(base: Path, **overrides: object) -> Settings:
    dotted: dict[str, object] = {
        "state_dir": str(base / "state"),
        "server.socket": str(base / "run" / "cri.sock"),
        "containerd.address": str(base / "none.sock"),
    }
    dotted.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load(None, environ={}, overrides=dotted)


def only(*names: str) -> list[check.Check]:
    return [c for c in check.CHECKS if c.name in names]


def fake_containerd(base: Path, version_line: str) -> Path:
    """An executable answering `--version` as a containerd of that version does."""
    binary = base / "containerd"
    binary.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    binary.chmod(0o755)
    return binary


async def test_embedded_containerd_turns_a_missing_one_into_a_warning(tmp_path: Path) -> None:
    binary = fake_containerd(tmp_path, "containerd github.com/containerd/containerd/v2 v2.4.2 ")
    config = settings_for(tmp_path, containerd__embedded=True, containerd__binary=str(binary))
    (result,) = await run_checks(config, checks=only("containerd"))
    assert result.outcome is Outcome.WARN
    assert f"`serve` would start a private containerd v2.4.2 from {binary}" in result.line


@pytest.mark.parametrize(
    "version_line",
    [
        "containerd github.com/containerd/containerd v1.5.18 abcdef",
        "containerd github.com/containerd/containerd/v3 v3.0.0 abcdef",
    ],
)
async def test_an_unsupported_private_containerd_fails(tmp_path: Path, version_line: str) -> None:
    binary = fake_containerd(tmp_path, version_line)
    config = settings_for(tmp_path, containerd__embedded=True, containerd__binary=str(binary))
    (result,) = await run_checks(config, checks=only("containerd"))
    version = version_line.split()[2]
    assert result.line == (
        f"FAIL containerd: not reachable at {tmp_path / 'none.sock'}, and {binary} "
        f"(containerd.binary) is {version}: cri-shim needs containerd 1.6, 1.7 or 2.x"
    )


@pytest.mark.parametrize(
    ("reported", "outcome"),
    [("v1.5.18", Outcome.FAIL), ("v3.1.0", Outcome.FAIL), ("1.7.24-0ubuntu1", Outcome.PASS)],
)
async def test_the_containerd_version_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reported: str, outcome: Outcome
) -> None:
    """The version containerd's API reports decides (the daemon itself is faked)."""

    async def server_version(self: object, timeout: float) -> ContainerdVersion:
        return ContainerdVersion(version=reported, revision="abc")

    monkeypatch.setattr(ContainerdClient, "server_version", server_version)
    config = settings_for(tmp_path, containerd__embedded=False)
    results = await run_checks(config, checks=only("containerd"))
    first = results[0]
    assert first.outcome is outcome, first.line
    if outcome is Outcome.FAIL:
        assert len(results) == 1
        assert first.line == (
            f"FAIL containerd: containerd {reported} (revision abc) at "
            f"{tmp_path / 'none.sock'} is not supported: cri-shim needs containerd 1.6, 1.7 or 2.x"
        )


async def test_a_hung_containerd_fails_within_the_timeout(tmp_path: Path) -> None:
    """A socket that accepts but never answers must not hang the command."""
    path = short_tempdir("crishim-hang-") / "c.sock"
    accepted: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_unix_server(accept, path=str(path))
    try:
        config = settings_for(tmp_path, containerd__address=str(path), containerd__embedded=False)
        started = time.monotonic()
        (result,) = await run_checks(config, timeout=0.5, checks=only("containerd"))
        assert time.monotonic() - started < 3
    finally:
        server.close()
        for writer in accepted:
            writer.close()
    assert result.outcome is Outcome.FAIL
    assert result.line.startswith(f"FAIL containerd: not reachable at {path}")


def fake_node(tmp_path: Path) -> Node:
    proc = tmp_path / "proc"
    for sub in ("self/ns", "sys/net/ipv4", "sys/net/bridge"):
        (proc / sub).mkdir(parents=True)
    (proc / "self/ns/net").write_text("")
    (proc / "filesystems").write_text("nodev\tsysfs\nnodev\toverlay\n\text4\n")
    (proc / "sys/net/ipv4/ip_forward").write_text("1\n")
    (proc / "sys/net/bridge/bridge-nf-call-iptables").write_text("1\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma\n")
    return Node(proc=proc, cgroup_root=cgroup, modules=tmp_path / "modules", bin_dirs=())


async def host_results(node: Node, tmp_path: Path, **overrides: object) -> dict[str, str]:
    names = ("cgroups", "overlayfs", "netns", "ip_forward", "br_netfilter")
    config = settings_for(tmp_path, runtime__cgroup_driver="cgroupfs", **overrides)
    results = await run_checks(config, node=node, checks=only(*names))
    return {r.name: r.line for r in results}


async def test_host_checks_on_a_good_node(tmp_path: Path) -> None:
    lines = await host_results(fake_node(tmp_path), tmp_path)
    assert all(text.startswith("PASS ") for text in lines.values()), lines
    assert "v2 (unified)" in lines["cgroups"] and "driver cgroupfs (configured" in lines["cgroups"]


async def test_host_checks_explain_what_is_missing(tmp_path: Path) -> None:
    node = fake_node(tmp_path)
    (node.proc / "filesystems").write_text("nodev\tsysfs\n")
    (node.proc / "sys/net/ipv4/ip_forward").write_text("0\n")
    (node.proc / "sys/net/bridge/bridge-nf-call-iptables").unlink()
    (node.proc / "self/ns/net").unlink()
    (node.cgroup_root / "cgroup.controllers").write_text("cpu io\n")
    lines = await host_results(node, tmp_path)
    assert lines["overlayfs"].startswith("FAIL overlayfs: the kernel has no overlay filesystem")
    assert lines["netns"].startswith("FAIL netns:")
    assert lines["cgroups"] == (
        f"FAIL cgroups: v2 at {node.cgroup_root} lacks the memory, pids controller(s)"
    )
    assert lines["ip_forward"].startswith("WARN ip_forward: net.ipv4.ip_forward = 0")
    assert lines["br_netfilter"].startswith("WARN br_netfilter: module not loaded")


async def test_overlay_module_on_disk_is_a_warning(tmp_path: Path) -> None:
    node = fake_node(tmp_path)
    (node.proc / "filesystems").write_text("nodev\tsysfs\n")
    module_dir = node.modules / os.uname().release / "kernel/fs/overlayfs"
    module_dir.mkdir(parents=True)
    (module_dir / "overlay.ko.xz").write_text("")
    lines = await host_results(node, tmp_path)
    assert (
        lines["overlayfs"]
        == "WARN overlayfs: overlay module is not loaded yet: run `modprobe overlay`"
    )


async def test_cgroup_v1_is_a_warning_and_nothing_is_a_failure(tmp_path: Path) -> None:
    node = fake_node(tmp_path)
    (node.cgroup_root / "cgroup.controllers").unlink()
    for name in ("cpu", "memory", "pids", "unified"):
        (node.cgroup_root / name).mkdir()
    assert (await host_results(node, tmp_path))["cgroups"].startswith(
        "WARN cgroups: v1 with a unified hierarchy (hybrid)"
    )
    for name in ("cpu", "memory", "pids", "unified"):
        (node.cgroup_root / name).rmdir()
    assert (await host_results(node, tmp_path))["cgroups"] == (
        f"FAIL cgroups: no cgroup hierarchy mounted at {node.cgroup_root}"
    )


async def test_socket_check_probes_what_is_already_there(tmp_path: Path) -> None:
    config = settings_for(tmp_path)
    sock = Path(config.server.socket)
    sock.parent.mkdir(parents=True)
    sock.parent.chmod(0o755)

    async def socket_line() -> str:
        (result,) = await run_checks(config, checks=only("socket"))
        return result.line

    assert await socket_line() == (
        f"PASS socket: {sock.parent} writable (mode 0755, owner uid {os.geteuid()})"
    )
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    assert (await socket_line()).startswith(f"WARN socket: stale socket at {sock}")
    stale.listen()
    try:
        assert (await socket_line()).startswith(f"PASS socket: a server is listening at {sock}")
    finally:
        stale.close()
    sock.unlink()
    sock.write_text("not a socket")
    assert (await socket_line()).startswith(f"FAIL socket: {sock} exists and is not a socket")
    sock.unlink()
    sock.parent.chmod(0o777)
    assert (await socket_line()).startswith("WARN socket:")


@pytest.mark.parametrize("outcomes", [("PASS", "WARN"), ("PASS", "FAIL")])
def test_exit_code_is_one_exactly_when_something_fails(outcomes: tuple[str, str]) -> None:
    results = [check.CheckResult(Outcome(o), "x", "y") for o in outcomes]
    assert check.exit_code(results) == (1 if "FAIL" in outcomes else 0)
