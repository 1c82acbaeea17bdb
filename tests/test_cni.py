"""Pod networking with Debian's real CNI plugins in real network namespaces.

Each run of this module gets its own bridges (`crishim<hex>`, tagged with the
run's pid in their ifalias), its own network names (`crishimtest-p<pid>-...`)
and a private 10.234.x.0/24 subnet no route on the host uses, so concurrent
runs on one machine do not disturb each other; namespaces are pinned in a
private directory. At module end the bridges, portmap's rules for our networks
(and its top-level chains, if this run created them and they are empty) and
the ip_forward sysctl (the bridge plugin turns it on) are put back; leftovers
of runs whose pid is dead are removed at start. Fake plugins (a small Python script driven by its
own config) cover what the real ones cannot show: the exact stdin and env a
plugin gets, failures after earlier plugins succeeded, hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cri_shim.network.cni import (
    CniError,
    CniNotReady,
    CniResult,
    NetworkChain,
    PodNetwork,
    PodNetworkRequest,
    PodNetworkStatus,
    PortMapping,
    capability_args,
    plugin_stdin,
)
from cri_shim.network.netns import (
    create_pod_netns,
    netns_exists,
    open_connection_in_netns,
    remove_pod_netns,
    run_in_netns,
)
from cri_shim.network.pod_cidr import PodCidrStore
from cri_shim.network.readiness import NetworkReadiness
from cri_shim.settings import load

from .conftest import short_tempdir, wait_for
from .support.ports import free_port

PLUGIN_DIR = Path("/usr/lib/cni")
REAL_PLUGINS = ("bridge", "host-local", "loopback", "portmap")
BRIDGE_PREFIX = "crishim"
BRIDGE_TAG = "crishim-test pid="
RUN_DIR_PREFIX = "crishim-cni-p"
NETWORK_PREFIX = "crishimtest-p"
HOSTPORT_CHAINS = ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ")
GREETING = b"hello from pod"

FAKE_PLUGIN = r"""
import json, os, sys, time

conf = json.load(sys.stdin)
command = os.environ.get("CNI_COMMAND", "")
fake = conf.get("fake", {})

def record(phase):
    if fake.get("record"):
        env = {k: v for k, v in os.environ.items() if k.startswith("CNI_")}
        entry = {"phase": phase, "command": command, "pid": os.getpid(), "time": time.time(),
                 "stdin": conf, "env": env}
        fd = os.open(fake["record"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, (json.dumps(entry) + "\n").encode())
        os.close(fd)

record("start")
if fake.get("pidFile"):
    with open(fake["pidFile"], "w") as f:
        f.write(str(os.getpid()))
if command in fake.get("sleepOn", []):
    time.sleep(fake.get("sleep", 0))
record("end")
if command in fake.get("crashOn", []):
    sys.stderr.write("panic: runtime error: index out of range\n")
    sys.exit(2)
fail = fake.get("fail")
if fail and command in fail.get("on", ["ADD"]):
    print(json.dumps({"cniVersion": conf["cniVersion"], "code": fail["code"], "msg": fail["msg"],
                      "details": fail.get("details", "")}))
    sys.exit(1)
if command == "ADD":
    result = fake.get("result") or conf.get("prevResult") or {"cniVersion": conf["cniVersion"]}
    print(json.dumps(result))
"""

LISTENER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"hello from pod")
    c.close()
"""


def sh(*argv: str, check: bool = True) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {result.stderr}")
    return result.stdout


def nat_rules() -> list[str]:
    return sh("iptables-save", "-t", "nat").splitlines()


def free_subnets(count: int) -> list[str]:
    """/24s in 10.234.0.0/16 that nothing on the host routes or addresses."""
    taken = sh("ip", "-o", "route", "show", "table", "all") + sh("ip", "-o", "addr")
    used = [
        ipaddress.ip_network(word, strict=False)
        for word in taken.split()
        if word.count(".") == 3 and word[0].isdigit()
    ]
    candidates = list(range(1, 255))
    random.shuffle(candidates)
    chosen = []
    for octet in candidates:
        net = ipaddress.ip_network(f"10.234.{octet}.0/24")
        if not any(net.overlaps(other) for other in used):
            chosen.append(str(net))
        if len(chosen) == count:
            return chosen
    raise AssertionError("no free 10.234.x.0/24 subnet on this host")


def pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def owner_pid(text: str, marker: str) -> int | None:
    """The pid in "<marker><pid>...", or None when `text` is not ours."""
    if marker not in text:
        return None
    digits = text.split(marker, 1)[1]
    digits = digits[: len(digits) - len(digits.lstrip("0123456789"))]
    return int(digits) if digits else None


IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def tagged_bridge_aliases() -> list[str]:
    aliases = []
    for entry in Path("/sys/class/net").iterdir():
        if entry.name.startswith(BRIDGE_PREFIX):
            with contextlib.suppress(OSError):
                aliases.append((entry / "ifalias").read_text().strip())
    return aliases


def original_ip_forward() -> str:
    """The sysctl as it was before any run of this module (live, or killed before it
    could restore it) changed it."""
    for alias in tagged_bridge_aliases():
        pid = owner_pid(alias, BRIDGE_TAG)
        if pid is not None and pid != os.getpid() and "ip_forward=" in alias:
            return alias.split("ip_forward=", 1)[1].split()[0]
    return IP_FORWARD.read_text().strip()


def other_live_runs() -> bool:
    pids = {owner_pid(alias, BRIDGE_TAG) for alias in tagged_bridge_aliases()}
    return any(pid is not None and pid != os.getpid() and pid_alive(pid) for pid in pids)


def create_test_bridge(address: str | None, ip_forward: str) -> str:
    """A bridge only this run uses, tagged with our pid so a later run can reap it."""
    name = f"{BRIDGE_PREFIX}{secrets.token_hex(3)}"
    sh("ip", "link", "add", "name", name, "type", "bridge")
    alias = f"{BRIDGE_TAG}{os.getpid()} ip_forward={ip_forward}"
    sh("ip", "link", "set", "dev", name, "alias", alias)
    if address:  # claims the subnet at once: a concurrent run sees the route
        sh("ip", "addr", "add", address, "dev", name)
    sh("ip", "link", "set", "dev", name, "up")
    return name


def reap_bridges(mine: bool) -> int:
    """Delete test bridges of dead runs (or, with `mine`, of this run); returns how many."""
    reaped = 0
    for entry in Path("/sys/class/net").iterdir():
        if not entry.name.startswith(BRIDGE_PREFIX):
            continue
        try:
            alias = (entry / "ifalias").read_text()
        except OSError:
            continue
        pid = owner_pid(alias, BRIDGE_TAG)
        if pid is not None and (pid == os.getpid() if mine else not pid_alive(pid)):
            sh("ip", "link", "del", entry.name, check=False)
            reaped += 1
    return reaped


def reap_nat_rules(mine: bool) -> None:
    """Drop portmap's rules for test networks of dead runs (or, with `mine`, this run)."""
    for line in nat_rules():
        if not line.startswith("-A CNI-HOSTPORT-DNAT"):
            continue
        pid = owner_pid(line, f'name: \\"{NETWORK_PREFIX}')
        if pid is None or (pid != os.getpid() if mine else pid_alive(pid)):
            continue
        args = shlex.split(line)
        sh("iptables", "-t", "nat", "-D", *args[1:], check=False)
        target = args[args.index("-j") + 1]
        sh("iptables", "-t", "nat", "-F", target, check=False)
        sh("iptables", "-t", "nat", "-X", target, check=False)


def release_run_dir(base: Path) -> None:
    for pin in (base / "netns").glob("cni-*"):
        asyncio.run(remove_pod_netns(pin))
    if (base / "netns").is_dir():
        sh("umount", str(base / "netns"), check=False)
    shutil.rmtree(base, ignore_errors=True)


def reap_run_dirs() -> None:
    """Namespaces and temp dirs of runs that were killed before their cleanup."""
    for base in Path("/tmp").glob(f"{RUN_DIR_PREFIX}*"):
        pid = owner_pid(base.name, RUN_DIR_PREFIX)
        if pid is not None and not pid_alive(pid):
            release_run_dir(base)


def remove_hostport_chains(created: set[str]) -> None:
    """portmap's shared top-level chains, only if test runs created them and nobody uses them
    (portmap recreates them on its next ADD anyway)."""
    in_use = any(line.startswith("-A CNI-HOSTPORT-DNAT") for line in nat_rules())
    if not created or in_use or other_live_runs():
        return
    for line in nat_rules():
        args = shlex.split(line) if line.startswith("-A ") else []
        jumps_to_ours = "-j" in args and args[args.index("-j") + 1] in created
        if jumps_to_ours and args[1] not in created:
            sh("iptables", "-t", "nat", "-D", *args[1:], check=False)
    for chain in created:
        sh("iptables", "-t", "nat", "-F", chain, check=False)
    for chain in created:
        sh("iptables", "-t", "nat", "-X", chain, check=False)


@dataclass
class CniHost:
    base: Path
    netns_dir: Path
    fake_bin: Path
    subnet: str
    second_subnet: str
    bridge: str = ""
    second_bridge: str = ""

    @property
    def gateway(self) -> str:
        return str(next(ipaddress.ip_network(self.subnet).hosts()))


@pytest.fixture(scope="module")
def cni_host() -> Iterator[CniHost]:
    if os.geteuid() != 0:
        pytest.fail("CNI tests need root", pytrace=False)
    missing = [p for p in REAL_PLUGINS if not (PLUGIN_DIR / p).is_file()]
    missing += [
        b for b in ("iptables", "iptables-save", "ip", "unshare", "nsenter") if not shutil.which(b)
    ]
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: install containernetworking-plugins, iptables, "
            "iproute2, util-linux (deploy/setup-dev.sh)",
            pytrace=False,
        )
    reap_run_dirs()
    base = short_tempdir(f"{RUN_DIR_PREFIX}{os.getpid()}-")
    fake_bin = base / "bin"
    fake_bin.mkdir()
    for name in ("crishim-fake", "crishim-fake2"):
        script = fake_bin / name
        script.write_text(f"#!{sys.executable}\n{FAKE_PLUGIN}")
        script.chmod(0o755)
    ip_forward = original_ip_forward()
    killed_run_found = reap_bridges(mine=False) > 0
    reap_nat_rules(mine=False)
    existing_chains = {line[1:].split()[0] for line in nat_rules() if line.startswith(":")}
    if killed_run_found and not other_live_runs():
        existing_chains -= set(HOSTPORT_CHAINS)  # most likely the killed run's
    subnet, second = free_subnets(2)
    host = CniHost(base, base / "netns", fake_bin, subnet, second)
    try:
        host.bridge = create_test_bridge(f"{host.gateway}/24", ip_forward)
        host.second_bridge = create_test_bridge(None, ip_forward)
        yield host
    finally:
        release_run_dir(base)
        reap_bridges(mine=True)
        reap_nat_rules(mine=True)
        remove_hostport_chains({c for c in HOSTPORT_CHAINS if c not in existing_chains})
        if not other_live_runs():  # the last run out puts the sysctl back
            IP_FORWARD.write_text(ip_forward)


@dataclass
class Case:
    """One test's own conf dir, IPAM data dir and shim state dir."""

    host: CniHost
    root: Path
    network: str

    @property
    def conf_dir(self) -> Path:
        return self.root / "net.d"

    @property
    def data_dir(self) -> Path:
        return self.root / "ipam"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def bridge(self, **overrides: Any) -> dict[str, Any]:
        plugin: dict[str, Any] = {
            "type": "bridge",
            "bridge": self.host.bridge,
            "isGateway": True,
            "ipMasq": False,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.host.subnet}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": str(self.data_dir),
            },
        }
        plugin.update(overrides)
        return plugin

    def write_conflist(self, plugins: list[dict[str, Any]], version: str = "1.0.0") -> None:
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        config = {"cniVersion": version, "name": self.network, "plugins": plugins}
        (self.conf_dir / "10-test.conflist").write_text(json.dumps(config))

    def standard(self, version: str = "1.0.0") -> None:
        self.write_conflist(
            [
                self.bridge(),
                {"type": "portmap", "capabilities": {"portMappings": True}},
                {"type": "loopback"},
            ],
            version,
        )

    async def pod_network(
        self, pod_cidrs: PodCidrStore | None = None, **overrides: Any
    ) -> PodNetwork:
        dotted: dict[str, Any] = {
            "state_dir": str(self.state_dir),
            "cni.conf_dir": str(self.conf_dir),
            "cni.bin_dirs": [str(self.host.fake_bin), str(PLUGIN_DIR)],
            "cni.netns_dir": str(self.host.netns_dir),
        }
        dotted.update({k.replace("__", "."): v for k, v in overrides.items()})
        settings = load(None, environ={}, overrides=dotted)
        readiness = NetworkReadiness(Path(settings.cni.conf_dir), settings.cni.bin_dirs)
        await readiness.refresh()
        return PodNetwork(settings.cni, settings.state_path, readiness, pod_cidrs)

    def allocations(self) -> list[str]:
        store = self.data_dir / self.network
        if not store.is_dir():
            return []
        names = []
        for entry in store.iterdir():
            with contextlib.suppress(ValueError):
                ipaddress.ip_address(entry.name)
                names.append(entry.name)
        return sorted(names)

    def cache_files(self) -> list[str]:
        cache = self.state_dir / "cni-cache"
        return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []

    def snapshot(self, sandbox_id: str) -> dict[str, Any]:
        """Everything a pod's network could leak, for before/after comparisons."""
        veths = sh("ip", "-o", "link", "show", "master", self.host.bridge, check=False).strip()
        return {
            "netns pins": sorted(p.name for p in self.host.netns_dir.glob("cni-*")),
            "allocations": self.allocations(),
            "veths on bridge": len(veths.splitlines()) if veths else 0,
            "nat rules for pod": [line for line in nat_rules() if sandbox_id in line],
            "cache files": self.cache_files(),
        }


@pytest.fixture()
def case(cni_host: CniHost) -> Iterator[Case]:
    root = Path(short_tempdir("crishim-case-"))
    yield Case(cni_host, root, f"{NETWORK_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
    shutil.rmtree(root, ignore_errors=True)


def new_id() -> str:
    return secrets.token_hex(32)


def request(netns: str, sandbox_id: str | None = None, **kwargs: Any) -> PodNetworkRequest:
    return PodNetworkRequest(
        sandbox_id=sandbox_id or new_id(),
        name="web",
        namespace="default",
        uid="7d3c7e6e-0000-4000-8000-000000000001",
        netns_path=netns,
        **kwargs,
    )


@contextlib.asynccontextmanager
async def listener_in(netns: str, port: int, address: str = "0.0.0.0") -> AsyncIterator[None]:
    """A tiny TCP server inside the pod's namespace that greets every connection."""
    process = await asyncio.create_subprocess_exec(
        "nsenter",
        f"--net={netns}",
        sys.executable,
        "-c",
        LISTENER,
        address,
        str(port),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 10)
        assert line == b"ready\n", line
        yield
    finally:
        process.kill()
        await process.wait()


async def fetch_greeting(host: str, port: int) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def pod_netns(host: CniHost) -> AsyncIterator[str]:
    path = await create_pod_netns(host.netns_dir)
    try:
        yield path
    finally:
        await remove_pod_netns(path)


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ----------------------------------------------------------------------------
# Namespaces


async def test_netns_lifecycle(cni_host: CniHost) -> None:
    path = await create_pod_netns(cni_host.netns_dir)
    assert Path(path).parent == cni_host.netns_dir and Path(path).name.startswith("cni-")
    assert await netns_exists(path)
    mounts = Path("/proc/self/mountinfo").read_text()
    assert f" {cni_host.netns_dir} " in mounts and "shared:" in mounts
    links = await run_in_netns(path, ["ip", "-o", "link"])
    assert links.ok and [
        line.split(":")[1].strip() for line in links.stdout.decode().splitlines()
    ] == ["lo"]
    # A fresh namespace is its own: no host interface is visible.
    assert b"eth0" not in links.stdout
    # `lo` is up before any plugin runs, as containerd's loopback network makes it.
    assert "UP" in links.stdout.decode().split("<", 1)[1].split(">", 1)[0].split(",")

    await remove_pod_netns(path)
    assert not await netns_exists(path)
    assert not Path(path).exists()
    await remove_pod_netns(path)  # idempotent
    await remove_pod_netns("")

    plain = cni_host.netns_dir / "cni-not-mounted"
    plain.write_text("")
    assert not await netns_exists(plain)
    await remove_pod_netns(plain)  # an unpinned leftover is just deleted
    assert not plain.exists()


async def test_open_connection_in_netns_reaches_pod_localhost(cni_host: CniHost) -> None:
    async with pod_netns(cni_host) as path:
        assert (await run_in_netns(path, ["ip", "link", "set", "lo", "up"])).ok
        async with listener_in(path, 18080, "127.0.0.1"):
            reader, writer = await open_connection_in_netns(path, "localhost", 18080)
            assert await reader.read() == GREETING
            writer.close()
            # The same port on the host's own loopback is not the pod's.
            with pytest.raises(OSError):
                await fetch_greeting("127.0.0.1", 18080)
        with pytest.raises(OSError):
            await open_connection_in_netns(path, "127.0.0.1", 18080)


# ----------------------------------------------------------------------------
# Real plugins


async def test_add_gives_reachable_ip_and_del_releases_it(case: Case) -> None:
    case.standard()
    network = await case.pod_network()
    async with pod_netns(case.host) as netns:
        pod = request(netns)
        before = case.snapshot(pod.sandbox_id)
        status = await network.setup(pod)

        assert ipaddress.ip_address(status.ip) in ipaddress.ip_network(case.host.subnet)
        assert status.additional_ips == ()
        eth0 = [i for i in status.interfaces if i.name == "eth0"]
        assert len(eth0) == 1 and eth0[0].sandbox == netns and eth0[0].mac
        assert status.result.ips[0].gateway == ipaddress.ip_address(case.host.gateway)
        assert case.allocations() == [status.ip]
        assert len(case.cache_files()) == 1
        assert await network.status(pod) == status

        async with listener_in(netns, 8080):
            assert await fetch_greeting(status.ip, 8080) == GREETING

        await network.teardown(pod)
        assert case.snapshot(pod.sandbox_id) == before
        assert await network.status(pod) is None


async def test_host_port_mapping(case: Case) -> None:
    case.standard()
    network = await case.pod_network()
    host_port = free_port()
    async with pod_netns(case.host) as netns:
        pod = request(netns, port_mappings=[PortMapping("TCP", 8080, host_port)])
        status = await network.setup(pod)
        rules = [line for line in nat_rules() if pod.sandbox_id in line]
        assert rules and f"--dports {host_port}" in rules[0]
        assert any(f"--to-destination {status.ip}:8080" in line for line in nat_rules())

        async with listener_in(netns, 8080):
            # Through portmap's DNAT on the host's own address on the bridge.
            assert await fetch_greeting(case.host.gateway, host_port) == GREETING

        await network.teardown(pod)
        assert not [line for line in nat_rules() if pod.sandbox_id in line]
        assert not any(f"{status.ip}:8080" in line for line in nat_rules())
        assert case.allocations() == []


async def test_del_twice_and_after_netns_is_gone(case: Case) -> None:
    case.standard()
    network = await case.pod_network()
    sandbox_id = new_id()
    before = case.snapshot(sandbox_id)
    netns = await create_pod_netns(case.host.netns_dir)
    pod = request(
        netns, sandbox_id, port_mappings=[PortMapping("udp", 53, free_port(socket.SOCK_DGRAM))]
    )
    await network.setup(pod)
    await remove_pod_netns(netns)  # the pod's namespace went first

    await network.teardown(pod)
    await network.teardown(pod)
    assert case.snapshot(pod.sandbox_id) == before


async def test_del_after_restart_uses_cached_result(case: Case) -> None:
    case.standard()
    first = await case.pod_network()
    async with pod_netns(case.host) as netns:
        pod = request(netns, port_mappings=[PortMapping("tcp", 80, free_port())])
        before = case.snapshot(pod.sandbox_id)
        status = await first.setup(pod)

        # A new shim process, and the operator has removed the CNI config meanwhile.
        (case.conf_dir / "10-test.conflist").unlink()
        restarted = await case.pod_network()
        assert not restarted.readiness.ready
        assert (await restarted.status(pod)) == status
        await restarted.teardown(pod)
        assert case.snapshot(pod.sandbox_id) == before
        assert not (await run_in_netns(netns, ["ip", "link", "show", "eth0"])).ok


async def test_teardown_without_cache_uses_current_config(case: Case) -> None:
    case.standard()
    network = await case.pod_network()
    async with pod_netns(case.host) as netns:
        pod = request(netns)
        await network.setup(pod)
        for name in case.cache_files():  # as if the shim died before writing it
            (case.state_dir / "cni-cache" / name).unlink()
        await network.teardown(pod)
        assert case.allocations() == []
        await network.teardown(pod)


async def test_failed_add_leaves_nothing_behind(case: Case) -> None:
    records = case.root / "calls.jsonl"
    case.write_conflist(
        [
            case.bridge(),
            {"type": "portmap", "capabilities": {"portMappings": True}},
            {
                "type": "crishim-fake",
                "fake": {
                    "record": str(records),
                    "fail": {
                        "code": 100,
                        "msg": "failed to frobnicate eth0",
                        "details": "disk on fire",
                    },
                },
            },
        ]
    )
    network = await case.pod_network()
    async with pod_netns(case.host) as netns:
        pod = request(netns, port_mappings=[PortMapping("tcp", 80, free_port())])
        before = case.snapshot(pod.sandbox_id)
        with pytest.raises(CniError) as caught:
            await network.setup(pod)
        assert (
            "plugin crishim-fake failed (code 100): failed to frobnicate eth0 (disk on fire)"
            in str(caught.value)
        )
        assert caught.value.plugin == "crishim-fake" and caught.value.code == 100
        assert case.snapshot(pod.sandbox_id) == before
        assert not (await run_in_netns(netns, ["ip", "link", "show", "eth0"])).ok
        # The rollback ran DEL for the whole chain, handing over the last good result.
        calls = [r for r in read_records(records) if r["phase"] == "start"]
        assert [c["command"] for c in calls] == ["ADD", "DEL"]
        assert calls[1]["stdin"]["prevResult"]["ips"][0]["address"].startswith(
            case.host.subnet.rsplit(".", 1)[0]
        )


async def test_cancelled_add_rolls_back(case: Case) -> None:
    # kubelet gave up on RunPodSandbox while a later plugin was still running.
    case.write_conflist(
        [case.bridge(), {"type": "crishim-fake", "fake": {"sleepOn": ["ADD"], "sleep": 30}}]
    )
    network = await case.pod_network()
    async with pod_netns(case.host) as netns:
        pod = request(netns)
        before = case.snapshot(pod.sandbox_id)
        task = asyncio.create_task(network.setup(pod))

        async def bridge_done() -> bool:
            return bool(case.allocations())

        async def clean() -> bool:
            return case.snapshot(pod.sandbox_id) == before

        assert await wait_for(bridge_done, 10)
        task.cancel()  # mid-setup: the bridge plugin has taken an address
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await wait_for(clean, 10)  # the shielded rollback finishes on its own


async def test_repeated_setup_replaces_the_stale_attachment(case: Case) -> None:
    case.standard()
    network = await case.pod_network()
    async with pod_netns(case.host) as netns:
        pod = request(netns)
        await network.setup(pod)
        status = await network.setup(pod)
        assert case.allocations() == [status.ip]
        assert len(case.cache_files()) == 1
        await network.teardown(pod)
        assert case.allocations() == []


async def test_plugin_crash_without_error_json(case: Case) -> None:
    case.write_conflist([{"type": "crishim-fake", "fake": {"crashOn": ["ADD"]}}])
    network = await case.pod_network()
    async with pod_netns(case.host) as netns:
        with pytest.raises(CniError) as caught:
            await network.setup(request(netns))
    assert str(caught.value).endswith(
        "plugin crishim-fake failed (exit status 2): panic: runtime error: index out of range"
    )


async def test_invalid_ipam_subnet_reports_plugin_message(case: Case) -> None:
    broken = case.bridge()
    broken["ipam"]["ranges"] = [[{"subnet": "10.234.0.0/33"}]]
    case.write_conflist([broken, {"type": "loopback"}])
    network = await case.pod_network()
    async with pod_netns(case.host) as netns:
        pod = request(netns)
        before = case.snapshot(pod.sandbox_id)
        with pytest.raises(CniError) as caught:
            await network.setup(pod)
        message = str(caught.value)
        assert "plugin bridge failed (code" in message
        assert "invalid CIDR address: 10.234.0.0/33" in message
        assert case.snapshot(pod.sandbox_id) == before


async def test_plugin_timeout_kills_the_plugin(case: Case) -> None:
    pid_file = case.root / "pid"
    case.write_conflist(
        [
            {
                "type": "crishim-fake",
                "fake": {"pidFile": str(pid_file), "sleepOn": ["ADD"], "sleep": 60},
            }
        ]
    )
    network = await case.pod_network(cni__plugin_timeout=1.0)
    async with pod_netns(case.host) as netns:
        started = time.monotonic()
        with pytest.raises(CniError, match=r"plugin crishim-fake did not finish ADD within 1s"):
            await network.setup(request(netns))
        assert time.monotonic() - started < 15
        pid = int(pid_file.read_text())
        assert not Path(f"/proc/{pid}").exists()


async def test_ip_ranges_from_pod_cidr(case: Case) -> None:
    plugin = {
        "type": "bridge",
        "bridge": case.host.second_bridge,
        "isGateway": False,
        "ipMasq": False,
        "capabilities": {"ipRanges": True},
        "ipam": {"type": "host-local", "dataDir": str(case.data_dir)},
    }
    case.write_conflist([plugin, {"type": "loopback"}])
    cidrs = PodCidrStore(case.state_dir)
    assert await cidrs.update(case.host.second_subnet)
    network = await case.pod_network(pod_cidrs=cidrs)
    async with pod_netns(case.host) as netns:
        pod = request(netns)
        status = await network.setup(pod)
        assert ipaddress.ip_address(status.ip) in ipaddress.ip_network(case.host.second_subnet)
        await network.teardown(pod)
        assert case.allocations() == []


async def test_check_notices_a_missing_interface(case: Case) -> None:
    # No portmap here: Debian's portmap 1.1.1 fails CHECK for IPv4-only pods
    # ("could not check ipv6 dnat"), whatever the runtime does.
    case.write_conflist([case.bridge(), {"type": "loopback"}])
    network = await case.pod_network()
    async with pod_netns(case.host) as netns:
        pod = request(netns)
        await network.setup(pod)
        await network.check(pod)
        assert (await run_in_netns(netns, ["ip", "link", "del", "eth0"])).ok
        with pytest.raises(CniError, match="plugin bridge failed"):
            await network.check(pod)
        await network.teardown(pod)
        with pytest.raises(CniError, match="no network attachment"):
            await network.check(pod)


async def test_parallel_pods_get_distinct_ips(case: Case) -> None:
    case.standard()
    network = await case.pod_network()
    async with contextlib.AsyncExitStack() as stack:
        namespaces = [await stack.enter_async_context(pod_netns(case.host)) for _ in range(4)]
        pods = [request(ns) for ns in namespaces]
        statuses = await asyncio.gather(*(network.setup(p) for p in pods))
        assert len({s.ip for s in statuses}) == 4
        assert sorted(case.allocations()) == sorted(s.ip for s in statuses)
        await asyncio.gather(*(network.teardown(p) for p in pods))
        assert case.allocations() == []


async def test_not_ready_without_config(case: Case) -> None:
    network = await case.pod_network()
    async with pod_netns(case.host) as netns:
        with pytest.raises(CniNotReady, match="network plugin is not ready"):
            await network.setup(request(netns))


async def test_unsupported_cni_version_is_refused(case: Case) -> None:
    case.write_conflist([{"type": "crishim-fake"}], version="0.2.0")
    network = await case.pod_network()
    async with pod_netns(case.host) as netns:
        with pytest.raises(CniError, match=r"cniVersion '0\.2\.0' is not supported"):
            await network.setup(request(netns))


# ----------------------------------------------------------------------------
# The protocol, seen from a plugin


async def test_plugins_get_spec_stdin_and_env(case: Case) -> None:
    records = case.root / "calls.jsonl"
    result_040 = {
        "cniVersion": "0.4.0",
        "interfaces": [{"name": "cni0"}, {"name": "eth0", "mac": "aa:bb", "sandbox": "SANDBOX"}],
        "ips": [
            {"version": "4", "address": "10.9.0.5/24", "gateway": "10.9.0.1", "interface": 1},
            {"version": "6", "address": "fd00:9::5/64", "interface": 1},
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.9.0.1"}],
        "dns": {"nameservers": ["10.9.0.10"], "search": ["svc.local"]},
    }
    cidrs = PodCidrStore(case.state_dir)
    await cidrs.update("10.9.0.0/24,fd00:9::/64")
    async with pod_netns(case.host) as netns:
        result_040["interfaces"][1]["sandbox"] = netns  # type: ignore[index]
        case.write_conflist(
            [
                {
                    "type": "crishim-fake",
                    "capabilities": {"portMappings": True, "ipRanges": True, "dns": True},
                    "runtimeConfig": {"keep": "me"},
                    "fake": {"record": str(records), "result": result_040},
                },
                {"type": "crishim-fake2", "fake": {"record": str(records)}},
            ],
            version="0.4.0",
        )
        network = await case.pod_network(pod_cidrs=cidrs)
        pod = request(netns, port_mappings=[PortMapping("SCTP", 80, 8080, "192.0.2.9")])
        status = await network.setup(pod)
        assert (status.ip, status.additional_ips) == ("10.9.0.5", ("fd00:9::5",))
        assert status.dns is not None and status.dns.nameservers == ("10.9.0.10",)
        await network.teardown(pod)

    calls = [r for r in read_records(records) if r["phase"] == "start"]
    assert [(c["command"], c["stdin"]["type"]) for c in calls] == [
        ("ADD", "crishim-fake"),
        ("ADD", "crishim-fake2"),
        ("DEL", "crishim-fake2"),
        ("DEL", "crishim-fake"),
    ]
    first, second = calls[0], calls[1]
    assert first["env"] == {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": pod.sandbox_id,
        "CNI_NETNS": pod.netns_path,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": (
            f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;"
            f"K8S_POD_INFRA_CONTAINER_ID={pod.sandbox_id};K8S_POD_UID={pod.uid}"
        ),
        "CNI_PATH": f"{case.host.fake_bin}:{PLUGIN_DIR}",
    }
    assert first["stdin"]["name"] == case.network and first["stdin"]["cniVersion"] == "0.4.0"
    assert "prevResult" not in first["stdin"]
    assert first["stdin"]["runtimeConfig"] == {
        "keep": "me",
        "portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "sctp", "hostIP": "192.0.2.9"}
        ],
        "ipRanges": [[{"subnet": "10.9.0.0/24"}], [{"subnet": "fd00:9::/64"}]],
    }
    assert "runtimeConfig" not in second["stdin"]  # declares no capabilities
    assert second["stdin"]["prevResult"] == result_040
    # DEL: reverse order, same args, every plugin gets the cached final result.
    for call in calls[2:]:
        assert call["stdin"]["prevResult"] == result_040
        assert call["env"]["CNI_ARGS"] == first["env"]["CNI_ARGS"]
        assert call["env"]["CNI_NETNS"] == pod.netns_path
    assert calls[3]["stdin"]["runtimeConfig"]["portMappings"][0]["hostPort"] == 8080


async def test_same_sandbox_is_serialized_other_sandboxes_run_in_parallel(case: Case) -> None:
    records = case.root / "calls.jsonl"
    case.write_conflist(
        [
            {
                "type": "crishim-fake",
                "fake": {
                    "record": str(records),
                    "sleepOn": ["ADD", "DEL"],
                    "sleep": 0.4,
                    "result": {
                        "cniVersion": "1.0.0",
                        "ips": [{"address": "10.9.9.9/24"}],
                    },
                },
            }
        ]
    )
    network = await case.pod_network()
    async with pod_netns(case.host) as netns_a, pod_netns(case.host) as netns_b:
        a, b = request(netns_a), request(netns_b)
        await asyncio.gather(network.setup(a), network.teardown(a), network.setup(b))
    calls = read_records(records)
    by_pod: dict[str, list[str]] = {}
    for call in sorted(calls, key=lambda c: c["time"]):
        by_pod.setdefault(call["env"]["CNI_CONTAINERID"], []).append(
            f"{call['phase']}-{call['command']}"
        )
    assert by_pod[a.sandbox_id] == ["start-ADD", "end-ADD", "start-DEL", "end-DEL"]
    starts = {
        c["env"]["CNI_CONTAINERID"]: c["time"]
        for c in calls
        if c["phase"] == "start" and c["command"] == "ADD"
    }
    first_end_a = min(
        c["time"]
        for c in calls
        if c["env"]["CNI_CONTAINERID"] == a.sandbox_id and c["phase"] == "end"
    )
    assert starts[b.sandbox_id] < first_end_a  # b did not wait for a


# ----------------------------------------------------------------------------
# Units


def test_result_parsing_versions() -> None:
    result_100 = CniResult.parse(
        {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "lo", "sandbox": "/ns"}, {"name": "eth0", "sandbox": "/ns"}],
            "ips": [
                {"address": "127.0.0.1/8", "interface": 0},
                {"address": "fd00::7/64", "gateway": "fd00::1", "interface": 1},
                {"address": "10.1.0.7/16", "gateway": "10.1.0.1", "interface": 1},
            ],
            "routes": [{"dst": "10.0.0.0/8"}],
        }
    )
    status = PodNetworkStatus.from_result(result_100)
    assert (status.ip, status.additional_ips) == ("fd00::7", ("10.1.0.7",))
    assert result_100.ips[1].gateway == ipaddress.ip_address("fd00::1")
    assert result_100.routes[0].dst == ipaddress.ip_network("10.0.0.0/8")

    ipam_style = CniResult.parse(
        {"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.2.0.3/24"}]}
    )
    assert PodNetworkStatus.from_result(ipam_style).ip == "10.2.0.3"

    with pytest.raises(CniError, match="malformed CNI result"):
        CniResult.parse({"ips": [{"address": "not-an-ip"}]})
    with pytest.raises(CniError, match="no IP address for eth0"):
        PodNetworkStatus.from_result(CniResult.parse({"cniVersion": "1.0.0"}))


def test_capabilities_reach_only_declaring_plugins() -> None:
    pod = request("/ns", port_mappings=[PortMapping("UDP", 53, 5353), PortMapping("tcp", 80, 0)])
    args = capability_args(pod, ("10.0.0.0/24",))
    assert args == {
        "portMappings": [{"hostPort": 5353, "containerPort": 53, "protocol": "udp"}],
        "ipRanges": [[{"subnet": "10.0.0.0/24"}]],
    }
    chain = NetworkChain("net", "1.0.0", ({"type": "a"},))
    declared = {"type": "portmap", "capabilities": {"portMappings": True, "ipRanges": False}}
    conf = plugin_stdin(chain, declared, {"cniVersion": "1.0.0"}, args)
    assert conf["runtimeConfig"] == {"portMappings": args["portMappings"]}
    assert conf["prevResult"] == {"cniVersion": "1.0.0"} and conf["name"] == "net"
    assert "runtimeConfig" not in plugin_stdin(chain, {"type": "x"}, None, args)
