"""kubelet's steady state: the server CPU and memory of each runtime while a
load generator replays kubelet's polling of a full node.

    python -m tests.benchmarks.steady_state [--pods 110,250] [--window 60]
        [--idle 20] [--no-containerd2] [--lines 2.4] [--json out.json]

The runtimes are the four of tests/benchmarks/daemons.py (containerd 1.6's and
2.x's built-in CRI, cri-shim on each). Every runtime gets the same pods, one
running container each (`sleep`), then all are polled at once, for the same
window, the way kubelet polls a node that does not change: ListPodSandbox and
ListContainers every second (PLEG's relist), ListContainerStats,
ListPodSandboxStats and ImageFsInfo every 10 s (the stats provider). Replies
are kept as bytes (kubelet decodes in Go; this client's Python decoding is not
the runtimes' cost).

Measured from /proc: CPU (utime + stime over the window, % of one core) and
RSS at the window's end of each runtime's server processes: the anchor's
containerd; cri-shim plus the containerd it drives. The containerd-shim-runc-v2
processes (one per pod, the same on both sides) are reported apart. An idle
window (no polling) comes first. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from grpclib.const import Cardinality

from cri_shim.containerd.runtime import WireReply as RawReply
from cri_shim.gen.runtime import v1 as cri
from tests.benchmarks.critest_bench import PREPULLED, prepull
from tests.benchmarks.daemons import Pair, Runtimes, default_builds, start_runtimes
from tests.conftest import CriClient, short_tempdir
from tests.support.catalog import ServedCatalog, catalog

IMAGE = PREPULLED[0]
TICKS = os.sysconf("SC_CLK_TCK")
SETUP_CONCURRENCY = 4
RELIST_PERIOD = 1.0
STATS_PERIOD = 10.0


async def raw_call(client: CriClient, service: str, method: str, request: Any) -> int:
    """One call with the reply left undecoded; returns its size."""
    async with client.channel.request(
        f"/runtime.v1.{service}/{method}", Cardinality.UNARY_UNARY, type(request), RawReply
    ) as stream:
        await stream.send_message(request, end=True)
        reply = await stream.recv_message()
    assert reply is not None
    return len(reply.data)


RELIST = (
    ("RuntimeService", "ListPodSandbox", cri.ListPodSandboxRequest()),
    ("RuntimeService", "ListContainers", cri.ListContainersRequest()),
)
STATS = (
    ("RuntimeService", "ListContainerStats", cri.ListContainerStatsRequest()),
    ("RuntimeService", "ListPodSandboxStats", cri.ListPodSandboxStatsRequest()),
    ("ImageService", "ImageFsInfo", cri.ImageFsInfoRequest()),
)


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def runc_shims(address: str) -> list[int]:
    """The containerd-shim-runc-v2 processes of the containerd at `address`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"containerd-shim-runc-v2") and address.encode() in argv:
            pids.append(int(entry.name))
    return pids


class Column:
    """One runtime: its endpoint, the processes that are its server, its pods."""

    def __init__(self, name: str, runtimes: Runtimes) -> None:
        self.name = name
        self.endpoint = runtimes.endpoints[name]
        containerd = runtimes.containerds[name]
        assert containerd.pid is not None
        self.address = containerd.address
        self.server_pids = {"containerd": containerd.pid}
        if name in runtimes.shims:
            self.server_pids["cri-shim"] = runtimes.shims[name].process.pid
        self.client = CriClient.connect(self.endpoint)
        self.pods: list[str] = []
        self.calls = 0
        self.reply_bytes: dict[str, int] = {}

    async def add_pods(self, want: int, base: Path) -> None:
        """Pods with one running container each, SETUP_CONCURRENCY at a time."""
        semaphore = asyncio.Semaphore(SETUP_CONCURRENCY)
        rt = self.client.runtime

        async def one(index: int) -> None:
            uid = f"steady-{index}-{random.randrange(1 << 30)}"
            config = cri.PodSandboxConfig(
                metadata=cri.PodSandboxMetadata(name=f"steady-{index}", namespace="bench", uid=uid),
                log_directory=str(base / "logs" / uid),
                labels={"app": "steady"},
                # As kubelet's cgroupfs driver names it: containerd's pod stats need one.
                linux=cri.LinuxPodSandboxConfig(cgroup_parent=f"/kubepods/besteffort/pod{uid}"),
            )
            async with semaphore:
                pod = await rt.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
                created = await rt.create_container(
                    cri.CreateContainerRequest(
                        pod.pod_sandbox_id,
                        cri.ContainerConfig(
                            metadata=cri.ContainerMetadata(name="sleep"),
                            image=cri.ImageSpec(image=IMAGE),
                            command=["sleep", "100000"],
                            log_path="sleep.log",
                            linux=cri.LinuxContainerConfig(),
                        ),
                        config,
                    )
                )
                await rt.start_container(cri.StartContainerRequest(created.container_id))
            self.pods.append(pod.pod_sandbox_id)

        await asyncio.gather(*(one(i) for i in range(len(self.pods), want)))

    async def remove_pods(self) -> None:
        semaphore = asyncio.Semaphore(SETUP_CONCURRENCY)
        rt = self.client.runtime

        async def one(pod_id: str) -> None:
            async with semaphore:
                await rt.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_id))
                await rt.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_id))

        await asyncio.gather(*(one(p) for p in self.pods))
        self.pods = []

    async def poll(self, until: float) -> None:
        """kubelet's polling until the loop clock reaches `until`."""
        loop = asyncio.get_running_loop()
        tick = 0
        start = loop.time()
        while loop.time() < until:
            calls = list(RELIST)
            if tick % round(STATS_PERIOD / RELIST_PERIOD) == 0:
                calls += STATS
            for service, method, request in calls:
                self.reply_bytes[method] = await raw_call(self.client, service, method, request)
                self.calls += 1
            tick += 1
            await asyncio.sleep(max(0.0, start + tick * RELIST_PERIOD - loop.time()))

    def cpu(self) -> dict[str, float]:
        found = {name: proc_cpu_s(pid) for name, pid in self.server_pids.items()}
        found["runc shims"] = sum(proc_cpu_s(pid) for pid in runc_shims(self.address))
        return found

    def rss_mib(self) -> dict[str, float]:
        found = {name: proc_rss_kib(pid) / 1024 for name, pid in self.server_pids.items()}
        found["runc shims"] = sum(proc_rss_kib(pid) for pid in runc_shims(self.address)) / 1024
        return found


async def window(columns: list[Column], seconds: float, *, polled: bool) -> dict[str, Any]:
    """CPU% (of one core) per process group over `seconds`, all columns at once."""
    before = {c.name: c.cpu() for c in columns}
    started = time.monotonic()
    if polled:
        until = asyncio.get_running_loop().time() + seconds
        await asyncio.gather(*(c.poll(until) for c in columns))
    else:
        await asyncio.sleep(seconds)
    elapsed = time.monotonic() - started
    result: dict[str, Any] = {}
    for column in columns:
        after = column.cpu()
        cpu = {k: 100 * (after[k] - before[column.name][k]) / elapsed for k in after}
        server = sum(v for k, v in cpu.items() if k != "runc shims")
        rss = column.rss_mib()
        result[column.name] = {
            "cpu_pct": cpu,
            "server_cpu_pct": server,
            "rss_mib": rss,
            "server_rss_mib": sum(v for k, v in rss.items() if k != "runc shims"),
        }
    return result


async def main(args: argparse.Namespace) -> dict[str, Any]:
    builds = default_builds(args.containerd2, with_containerd2=not args.no_containerd2)
    if args.lines:
        builds = [b for b in builds if b.label in args.lines.split(",")]
    levels = [int(x) for x in args.pods.split(",")]
    base = short_tempdir("crishim-steady-")
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results: list[dict[str, Any]] = []
    served = ServedCatalog(entries=catalog(own=False), storage_dir=base / "registry")
    await served.start()
    try:
        hosts_dir = served.write_hosts_dir(base / "certs.d")
        async with start_runtimes(base, builds, hosts_dir, "10.236") as runtimes:
            columns = [Column(name, runtimes) for name in runtimes.names]
            try:
                for column in columns:
                    await prepull(column.endpoint)
                for level in levels:
                    for column in columns:
                        set_up = time.monotonic()
                        await column.add_pods(level, base)
                        print(
                            f"{column.name}: {level} pods in {time.monotonic() - set_up:.0f} s",
                            flush=True,
                        )
                    load_before = os.getloadavg()
                    idle = await window(columns, args.idle, polled=False) if args.idle else {}
                    polled = await window(columns, args.window, polled=True)
                    results.append(
                        {
                            "pods": level,
                            "load_before": load_before,
                            "load_after": os.getloadavg(),
                            "idle": idle,
                            "polled": polled,
                            "reply_bytes": {c.name: c.reply_bytes for c in columns},
                        }
                    )
                    print_level(results[-1], [Pair(b) for b in builds])
            finally:
                for column in columns:
                    await column.remove_pods()
                    column.client.close()
    finally:
        await served.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    report = {
        "started_at": started_at,
        "window_s": args.window,
        "idle_s": args.idle,
        "containerd_versions": {Pair(b).build.label: b.version for b in builds},
        "pairs": [[Pair(b).anchor, Pair(b).shim] for b in builds],
        "levels": results,
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_level(level: dict[str, Any], pairs: list[Pair]) -> None:
    print(
        f"\n{level['pods']} pods, one running container each; load average before "
        f"{'/'.join(f'{x:.2f}' for x in level['load_before'])}, after "
        f"{'/'.join(f'{x:.2f}' for x in level['load_after'])}"
    )
    print(
        "| runtime | server CPU % polled (idle) | of which cri-shim | server RSS MiB "
        "| of which cri-shim | runc shims CPU % / RSS MiB | ratio CPU / RSS |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    polled, idle = level["polled"], level["idle"]
    for pair in pairs:
        anchor = polled[pair.anchor]
        for name in (pair.anchor, pair.shim):
            row = polled[name]
            idle_cpu = f" ({idle[name]['server_cpu_pct']:.1f})" if idle else ""
            shim_cpu = row["cpu_pct"].get("cri-shim")
            shim_rss = row["rss_mib"].get("cri-shim")
            ratio = (
                f"{row['server_cpu_pct'] / anchor['server_cpu_pct']:.2f}x / "
                f"{row['server_rss_mib'] / anchor['server_rss_mib']:.2f}x"
                if name == pair.shim
                else ""
            )
            print(
                f"| {name} | {row['server_cpu_pct']:.1f}{idle_cpu} "
                f"| {'' if shim_cpu is None else f'{shim_cpu:.1f}'} "
                f"| {row['server_rss_mib']:.0f} "
                f"| {'' if shim_rss is None else f'{shim_rss:.0f}'} "
                f"| {row['cpu_pct']['runc shims']:.1f} / {row['rss_mib']['runc shims']:.0f} "
                f"| {ratio} |",
                flush=True,
            )


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pods", default="110", help="pod counts, ascending (e.g. 110,250)")
    parser.add_argument("--window", type=float, default=60.0, help="polled window, seconds")
    parser.add_argument("--idle", type=float, default=20.0, help="idle window first (0: none)")
    parser.add_argument("--containerd2", help="containerd 2.x binary (default: the peer build)")
    parser.add_argument("--no-containerd2", action="store_true", help="containerd 1.6 only")
    parser.add_argument("--lines", help="only these containerd lines, e.g. 2.4 or 1.6,2.4")
    parser.add_argument("--json", type=Path, default=Path("steady_state.json"))
    parser.add_argument("--keep", action="store_true", help="keep the run's directory")
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
