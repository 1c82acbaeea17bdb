"""CRI latency: cri-shim against containerd's built-in CRI plugin, 1.6 and 2.x, one run.

    python -m tests.benchmarks.cri_vs_containerd [--containers 100,500,1000] [--rounds 40]
        [--lifecycle-rounds 3] [--containerd2 PATH | --no-containerd2]
        [--json out.json] [--png out.png]

Four runtimes, each on a private containerd of its own (tests/benchmarks/daemons.py):

* `containerd 1.6 CRI`: Debian's containerd 1.6 with its built-in CRI plugin
  (its grpc socket is the CRI endpoint);
* `cri-shim on 1.6`: `cri-shim serve` in a subprocess (so its RSS is its own)
  over a containerd 1.6 without that plugin;
* `containerd 2.x CRI` and `cri-shim on 2.x`: the same with the containerd 2.x
  peer build (tests/peers/build.sh; `--no-containerd2` leaves them out).

Each shim is compared with the CRI of the containerd it runs on. Each runtime
gets its own CNI bridge and subnet; all pull from the same local registries
(pause under its real name through a mirror). The same CRI client code drives
all four with the same workload:

* PullImage of busybox from the local registry (pull, remove, again);
* 20 RunPodSandbox at once, then per pod Create/Start/Status/ExecSync/Stop/
  Remove of a `sleep 3600` container, PodSandboxStatus, Stop/RemovePodSandbox;
  the whole phase repeated `--lifecycle-rounds` times;
* an empty Version call per List/Status round: each server's per-call floor;
* List/Status at 100, 500, 1000 containers (20 per pod; their pods started
  one at a time, a row of its own). These containers are
  created but not started: starting 1000 runc tasks on 2 cores takes minutes
  and List/Status cost does not depend on the task running.

All are up for the whole run but called one at a time: every phase runs on
each back to back, the order rotating per round, so load from elsewhere on
the machine falls on all alike. Prints p50/p99 per operation and each shim's
ratio to its containerd's CRI, the shims' RSS idle and at the largest container
count, writes JSON and a PNG chart. This is a benchmark, not a test, and
asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import struct
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from grpclib.const import Cardinality

from cri_shim.containerd.runtime import WireReply as RawReply
from cri_shim.gen.runtime import v1 as cri
from tests.benchmarks.daemons import ContainerdBuild, Pair, default_builds, start_runtimes
from tests.conftest import CriClient, short_tempdir
from tests.pods import POD_IMAGES
from tests.support.catalog import ServedCatalog, catalog

BUSYBOX = "library/busybox:latest"
PODS_AT_ONCE = 20
PER_POD = 20
Timings = dict[str, list[float]]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pod_config(tag: str, index: int, logs: Path) -> cri.PodSandboxConfig:
    uid = f"uid-{tag}-{index}-{random.randrange(1 << 30)}"
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=f"bench-{index}", namespace="bench", uid=uid),
        log_directory=str(logs / uid),
        labels={"app": "bench", "pod": str(index)},
        linux=cri.LinuxPodSandboxConfig(),
    )


def container_config(image: str, index: int) -> cri.ContainerConfig:
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=f"c{index}"),
        image=cri.ImageSpec(image=image),
        command=["sleep", "3600"],
        log_path=f"c{index}.log",
        labels={"app": "bench", "index": str(index)},
        linux=cri.LinuxContainerConfig(),
    )


async def raw_call(client: CriClient, method: str, request: Any) -> bytes:
    async with client.channel.request(
        f"/runtime.v1.RuntimeService/{method}",
        Cardinality.UNARY_UNARY,
        type(request),
        RawReply,
    ) as stream:
        await stream.send_message(request, end=True)
        reply = await stream.recv_message()
    assert reply is not None
    return reply.data


class Workload:
    """The same calls against either runtime, every latency recorded under its op name."""

    def __init__(self, client: CriClient, image: str, tag: str, logs: Path) -> None:
        self.client = client
        self.rt = client.runtime
        self.image = image
        self.tag = tag
        self.logs = logs
        self.times: Timings = {}
        # Size of each raw reply: the decoding rows also depend on what is in it.
        self.reply_bytes: dict[str, int] = {}
        self.pod_count = 0

    async def timed(self, op: str, call: Awaitable[Any]) -> Any:
        started = time.perf_counter()
        result = await call
        self.times.setdefault(op, []).append(time.perf_counter() - started)
        return result

    async def pull_once(self, *, last: bool) -> None:
        spec = cri.ImageSpec(image=self.image)
        await self.timed("PullImage", self.client.image.pull_image(cri.PullImageRequest(spec)))
        if not last:
            await self.client.image.remove_image(cri.RemoveImageRequest(spec))

    async def run_pod(self, op: str = "RunPodSandbox") -> tuple[str, cri.PodSandboxConfig]:
        self.pod_count += 1
        config = pod_config(self.tag, self.pod_count, self.logs)
        reply = await self.timed(
            op, self.rt.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
        )
        return reply.pod_sandbox_id, config

    async def lifecycle(self, pod: tuple[str, cri.PodSandboxConfig], status_calls: int) -> None:
        pod_id, config = pod
        created = await self.timed(
            "CreateContainer",
            self.rt.create_container(
                cri.CreateContainerRequest(pod_id, container_config(self.image, 0), config)
            ),
        )
        cid = created.container_id
        await self.timed("StartContainer", self.rt.start_container(cri.StartContainerRequest(cid)))
        for _ in range(status_calls):
            await self.timed(
                "ContainerStatus", self.rt.container_status(cri.ContainerStatusRequest(cid))
            )
            await self.timed(
                "PodSandboxStatus", self.rt.pod_sandbox_status(cri.PodSandboxStatusRequest(pod_id))
            )
        for _ in range(3):
            await self.timed(
                "ExecSync",
                self.rt.exec_sync(cri.ExecSyncRequest(cid, cmd=["true"], timeout=10)),
            )
        await self.timed("StopContainer", self.rt.stop_container(cri.StopContainerRequest(cid, 0)))
        await self.timed(
            "RemoveContainer", self.rt.remove_container(cri.RemoveContainerRequest(cid))
        )
        await self.timed(
            "StopPodSandbox", self.rt.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_id))
        )
        await self.timed(
            "RemovePodSandbox", self.rt.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_id))
        )

    async def concurrent_pods(self, status_calls: int) -> float:
        """20 pods at once (RunPodSandbox), then each pod's container lifecycle in turn."""
        started = time.perf_counter()
        pods = await asyncio.gather(*(self.run_pod() for _ in range(PODS_AT_ONCE)))
        wall = time.perf_counter() - started
        for pod in pods:
            await self.lifecycle(pod, status_calls)
        return wall

    async def fill(self, pods: list[tuple[str, cri.PodSandboxConfig]], have: int, want: int) -> int:
        """Create (not start) containers, PER_POD per pod, until `want` exist."""
        sem = asyncio.Semaphore(4)

        async def one(index: int) -> None:
            while len(pods) <= index // PER_POD:
                pods.append(await self.run_pod("RunPodSandbox one at a time"))
            pod_id, config = pods[index // PER_POD]
            async with sem:
                await self.rt.create_container(
                    cri.CreateContainerRequest(pod_id, container_config(self.image, index), config)
                )

        for index in range(have, want):  # pods first, in order, then containers in parallel
            while len(pods) <= index // PER_POD:
                pods.append(await self.run_pod("RunPodSandbox one at a time"))
        await asyncio.gather(*(one(i) for i in range(have, want)))
        return want

    async def level_ids(self, level: int) -> list[str]:
        listed = await self.rt.list_containers(cri.ListContainersRequest())
        ids = [c.id for c in listed.containers]
        assert len(ids) == level, (len(ids), level)
        return ids

    async def scale_round(
        self, level: int, ids: list[str], pods: list[tuple[str, cri.PodSandboxConfig]]
    ) -> None:
        """One List/Status round, undecoded ("raw") and through the decoding client, and
        an empty Version call: the per-call floor of each server."""
        await self.timed("Version", self.rt.version(cri.VersionRequest()))
        for method, request in (
            ("ListContainers", cri.ListContainersRequest()),
            ("ListPodSandbox", cri.ListPodSandboxRequest()),
            ("ContainerStatus", cri.ContainerStatusRequest(random.choice(ids))),
            ("PodSandboxStatus", cri.PodSandboxStatusRequest(random.choice(pods)[0])),
        ):
            data = await self.timed(f"{method}@{level} raw", raw_call(self.client, method, request))
            self.reply_bytes[f"{method}@{level}"] = len(data)
        await self.timed(
            f"ListContainers@{level}", self.rt.list_containers(cri.ListContainersRequest())
        )
        await self.timed(
            f"ListPodSandbox@{level}", self.rt.list_pod_sandbox(cri.ListPodSandboxRequest())
        )
        await self.timed(
            f"ContainerStatus@{level}",
            self.rt.container_status(cri.ContainerStatusRequest(random.choice(ids))),
        )
        await self.timed(
            f"PodSandboxStatus@{level}",
            self.rt.pod_sandbox_status(cri.PodSandboxStatusRequest(random.choice(pods)[0])),
        )

    async def cleanup(self, pods: list[tuple[str, cri.PodSandboxConfig]]) -> None:
        sem = asyncio.Semaphore(4)

        async def one(pod_id: str) -> None:
            async with sem:
                await self.rt.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_id))
                await self.rt.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_id))

        await asyncio.gather(*(one(p[0]) for p in pods))


async def drive(
    works: dict[str, Workload],
    levels: list[int],
    rounds: int,
    lifecycle_rounds: int,
    rss: Callable[[], dict[str, int]],
) -> dict[str, Any]:
    """Every phase on each runtime back to back, the order rotating per round, so
    load from elsewhere on the machine falls on all alike."""
    names = list(works)

    def order(round_: int) -> list[Workload]:
        first = round_ % len(names)
        return [works[n] for n in names[first:] + names[:first]]

    print("pull, 20 concurrent pods, lifecycle", flush=True)
    for round_ in range(3):
        for work in order(round_):
            await work.pull_once(last=round_ == 2)
    for work in works.values():  # warm-up (connections, first sandbox): not counted
        warm = await work.run_pod()
        await work.rt.remove_pod_sandbox(cri.RemovePodSandboxRequest(warm[0]))
        work.times.pop("RunPodSandbox", None)
    memory = {"idle": rss()}
    walls: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(lifecycle_rounds):
        for work in order(round_):
            walls[work.tag].append(await work.concurrent_pods(status_calls=rounds // 4 or 1))
    pods: dict[str, list[tuple[str, cri.PodSandboxConfig]]] = {n: [] for n in names}
    have = 0
    for level in levels:
        for name, work in works.items():
            t0 = time.perf_counter()
            await work.fill(pods[name], have, level)
            took = time.perf_counter() - t0
            print(
                f"[{name}] {level} containers ({len(pods[name])} pods) in {took:.1f}s", flush=True
            )
        have = level
        ids = {n: await w.level_ids(level) for n, w in works.items()}
        for round_ in range(rounds):
            for work in order(round_):
                await work.scale_round(level, ids[work.tag], pods[work.tag])
    memory[f"at_{levels[-1]}"] = rss()
    for name, work in works.items():
        await work.cleanup(pods[name])
    return {
        name: {
            "times": work.times,
            "pods20_wall_s": statistics.median(walls[name]),
            "reply_bytes": work.reply_bytes,
        }
        for name, work in works.items()
    } | {"rss_kib": memory}


def summarize(times: Timings) -> dict[str, dict[str, float]]:
    out = {}
    for op, values in times.items():
        ordered = sorted(values)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        out[op] = {"n": len(values), "p50_ms": statistics.median(values) * 1e3, "p99_ms": p99 * 1e3}
    return out


def _png(path: Path, bars: list[tuple[float, float]]) -> None:
    """A chart without matplotlib: per op, containerd (grey) and cri-shim (blue) p50 bars,
    log-scaled widths. Unlabelled; the JSON and the printed table carry the numbers."""
    import math

    height_per = 14
    width = 600
    height = height_per * len(bars) + 10
    pixels = [[(255, 255, 255)] * width for _ in range(height)]
    top = max(max(a, b) for a, b in bars) or 1.0
    for i, (base, shim) in enumerate(bars):
        for j, (value, colour) in enumerate(((base, (150, 150, 150)), (shim, (40, 90, 200)))):
            length = int((width - 10) * math.log1p(value) / math.log1p(top))
            y0 = 5 + i * height_per + j * 6
            for y in range(y0, y0 + 5):
                for x in range(5, 5 + length):
                    pixels[y][x] = colour
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def chart(path: Path, rows: list[tuple[str, float, float]]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _png(path, [(base, shim) for _, base, shim in rows])
        return "matplotlib not installed (pip install .[bench]): wrote an unlabelled bar PNG"
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r[1] for r in rows], height=0.4, label="containerd CRI")
    ax.barh([y - 0.2 for y in ys], [r[2] for r in rows], height=0.4, label="cri-shim")
    ax.set_yticks(list(ys), [r[0] for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("p50 latency (ms, log)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return "chart written with matplotlib"


async def main(
    levels: list[int],
    rounds: int,
    lifecycle_rounds: int,
    builds: list[ContainerdBuild],
    json_path: Path,
    png_path: Path,
) -> dict[str, Any]:
    base = short_tempdir("crishim-vs-")
    load_before = os.getloadavg()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    wanted = [e for e in catalog() if any(n in POD_IMAGES for n in e.names())]
    served = ServedCatalog(entries=wanted)
    await served.start()
    results: dict[str, Any] = {}
    try:
        image = served.local(BUSYBOX)
        hosts_dir = served.write_hosts_dir(base / "certs.d")
        local_host = image.split("/")[0]
        (hosts_dir / local_host).mkdir(parents=True, exist_ok=True)
        (hosts_dir / local_host / "hosts.toml").write_text(
            f'server = "http://{local_host}"\n\n'
            f'[host."http://{local_host}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        async with start_runtimes(base, builds, hosts_dir, "10.237") as runtimes:
            clients = {name: CriClient.connect(addr) for name, addr in runtimes.endpoints.items()}
            try:
                works = {
                    name: Workload(client, image, name, base / name.replace(" ", "-") / "logs")
                    for name, client in clients.items()
                }
                pids = runtimes.shim_pids()
                results = await drive(
                    works,
                    levels,
                    rounds,
                    lifecycle_rounds,
                    lambda: {name: rss_kib(pid) for name, pid in pids.items()},
                )
            finally:
                for client in clients.values():
                    client.close()
    finally:
        await served.stop()
        shutil.rmtree(base, ignore_errors=True)

    pairs = [Pair(build) for build in builds]
    names = [name for pair in pairs for name in (pair.anchor, pair.shim)]
    summaries = {name: summarize(results[name]["times"]) for name in names}
    table: list[dict[str, Any]] = []
    for op in summaries[names[0]]:
        if not all(op in summaries[name] for name in names):
            continue
        row: dict[str, Any] = {"op": op, "n": summaries[pairs[0].shim][op]["n"]}
        for pair in pairs:
            a, s = summaries[pair.anchor][op], summaries[pair.shim][op]
            row[pair.anchor] = {"p50_ms": a["p50_ms"], "p99_ms": a["p99_ms"]}
            row[pair.shim] = {
                "p50_ms": s["p50_ms"],
                "p99_ms": s["p99_ms"],
                "ratio_p50": s["p50_ms"] / a["p50_ms"],
                "ratio_p99": s["p99_ms"] / a["p99_ms"],
            }
        table.append(row)
    report = {
        "levels": levels,
        "rounds": rounds,
        "lifecycle_rounds": lifecycle_rounds,
        "started_at": started_at,
        # 1/5/15-minute load averages: the other work the machine was doing.
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "list_containers_started": False,
        "containerd_versions": {pair.build.label: pair.build.version for pair in pairs},
        "pairs": [[pair.anchor, pair.shim] for pair in pairs],
        "table": table,
        "pods20_wall_s": {k: results[k]["pods20_wall_s"] for k in names},
        "shim_rss_kib": results["rss_kib"],
        "raw_s": {k: results[k]["times"] for k in names},
        "reply_bytes": {k: results[k]["reply_bytes"] for k in names},
    }
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    report["chart"] = chart(
        png_path,
        [
            (f"{r['op']} ({pair.build.label})", r[pair.anchor]["p50_ms"], r[pair.shim]["p50_ms"])
            for r in table
            for pair in pairs
        ],
    )
    return report


def print_report(report: dict[str, Any]) -> None:
    """The markdown table (p50 / p99 ms; ratio = cri-shim / the CRI of its containerd)."""
    pairs = report["pairs"]
    head = ["op", "n"]
    for anchor, shim in pairs:
        head += [anchor, shim, "ratio p50 / p99"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for r in report["table"]:
        cells = [r["op"], str(r["n"])]
        for anchor, shim in pairs:
            a, s = r[anchor], r[shim]
            cells += [
                f"{a['p50_ms']:.3g} / {a['p99_ms']:.3g}",
                f"{s['p50_ms']:.3g} / {s['p99_ms']:.3g}",
                f"{s['ratio_p50']:.2f}x / {s['ratio_p99']:.2f}x",
            ]
        print("| " + " | ".join(cells) + " |")
    walls = report["pods20_wall_s"]
    print(
        "\n20 concurrent RunPodSandbox wall: "
        + ", ".join(f"{name} {wall:.2f}s" for name, wall in walls.items())
    )
    print(
        f"started {report['started_at']}; load average before "
        f"{'/'.join(f'{x:.2f}' for x in report['load_before'])}, after "
        f"{'/'.join(f'{x:.2f}' for x in report['load_after'])}; containerd "
        + ", ".join(report["containerd_versions"].values())
    )
    sizes = report["reply_bytes"]
    for op in sorted(sizes[pairs[0][0]]):
        if op.startswith("List"):
            print(
                f"{op} reply bytes: " + ", ".join(f"{k} {v.get(op, 0)}" for k, v in sizes.items())
            )
    for moment, by_shim in report["shim_rss_kib"].items():
        print(f"RSS {moment}: " + ", ".join(f"{k} {v / 1024:.1f} MiB" for k, v in by_shim.items()))
    print("List/Status-at-scale containers were created, not started.")


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--containers", default="100,500,1000", help="List/Status levels")
    parser.add_argument("--rounds", type=int, default=40, help="calls per op per level")
    parser.add_argument(
        "--lifecycle-rounds",
        type=int,
        default=3,
        help="times the 20-pod lifecycle phase runs (20 samples per op each)",
    )
    parser.add_argument(
        "--containerd2", help="containerd 2.x binary (default: $CONTAINERD2 or the peer build)"
    )
    parser.add_argument(
        "--no-containerd2", action="store_true", help="only containerd 1.6 and cri-shim on it"
    )
    parser.add_argument("--json", type=Path, default=Path("cri_vs_containerd.json"))
    parser.add_argument("--png", type=Path, default=Path("cri_vs_containerd.png"))
    args = parser.parse_args()
    levels = sorted(int(x) for x in args.containers.split(","))
    builds = default_builds(args.containerd2, with_containerd2=not args.no_containerd2)
    report = asyncio.run(
        main(levels, args.rounds, args.lifecycle_rounds, builds, args.json, args.png)
    )
    print()
    print_report(report)
    print(f"JSON: {args.json}; PNG: {args.png} ({report['chart']})")


if __name__ == "__main__":
    cli()
