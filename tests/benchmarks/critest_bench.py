"""critest's own benchmark (`critest -benchmark`) against cri-shim and containerd's
built-in CRI, containerd 1.6 and 2.x, interleaved in one run.

    python -m tests.benchmarks.critest_bench [--critest PATH] [--rounds 3]
        [--pods 20] [--containers 20] [--images 5]
        [--containerd2 PATH | --no-containerd2] [--json out.json]

critest drives one call at a time from Go, as kubelet's sync loop and crictl
do; the project's own benchmark (cri_vs_containerd) drives many pods at once
from Python. The runtimes are the same four (tests/benchmarks/daemons.py):
containerd 1.6's CRI, cri-shim on 1.6, containerd 2.x's CRI, cri-shim on 2.x.

Offline image set-up as tests/conformance/run_critest.py does it: critest's
image catalog served by local registries under the upstream names, reached
through containerd-style hosts.toml mirrors (the same directory for all four
runtimes). Before timing, every runtime pulls the pause image and critest's
container image, so no timed CreateContainer includes a pull on either side.

Interleaving: each round runs each of critest's benchmark specs (pod
lifecycle, container lifecycle, image lifecycle, image listing) on every
runtime back to back, the order rotating per round. critest writes each
spec's samples as JSON (operation durations per lifecycle); the runner pools
them over the rounds and prints p50 per operation and each shim's ratio to its
own containerd's CRI. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from cri_shim.gen.runtime import v1 as cri
from tests.benchmarks.daemons import Pair, default_builds, peer, start_runtimes
from tests.conftest import CriClient, short_tempdir
from tests.support.catalog import ServedCatalog, catalog

# critest's benchmark specs, each with the file it writes its samples to.
SPECS = {
    "benchmark about lifecycle of PodSandbox": "pod_benchmark_data.json",
    "benchmark about basic operations on Container": "container_benchmark_data.json",
    "benchmark about basic operations on Image": "image_lifecycle_benchmark_data.json",
    "benchmark about listing Image": "image_listing_benchmark_data.json",
}
# What critest's container benchmark creates its containers from, and the pause image.
PREPULLED = ("registry.k8s.io/e2e-test-images/busybox:1.29-2", "registry.k8s.io/pause:3.9")


def params_yaml(pods: int, containers: int, images: int) -> str:
    """critest's -benchmarking-params-file: sample counts, one at a time (kubelet's way)."""
    return "\n".join(
        [
            f"podsNumber: {pods}",
            "podsNumberParallel: 1",
            f"containersNumber: {containers}",
            "containersNumberParallel: 1",
            f"imagesNumber: {images}",
            "imagesNumberParallel: 1",
            "podBenchmarkTimeoutSeconds: 600",
            "containerBenchmarkTimeoutSeconds: 600",
            "imageBenchmarkTimeoutSeconds: 600",
            "",
        ]
    )


async def prepull(endpoint: str) -> None:
    client = CriClient.connect(endpoint)
    try:
        for image in PREPULLED:
            await client.image.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
    finally:
        client.close()


async def run_spec(
    critest: str, endpoint: str, spec: str, params: Path, out_dir: Path, log: Path
) -> dict[str, list[float]]:
    """One critest benchmark spec against one runtime: {operation: [seconds, ...]}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        critest,
        "-benchmark",
        f"-runtime-endpoint=unix://{endpoint}",
        f"-image-endpoint=unix://{endpoint}",
        f"-benchmarking-params-file={params}",
        f"-benchmarking-output-dir={out_dir}",
        f"-ginkgo.focus={spec}",
        "-ginkgo.no-color",
    ]
    with log.open("ab") as sink:
        process = await asyncio.create_subprocess_exec(
            *cmd, stdout=sink, stderr=sink, stdin=asyncio.subprocess.DEVNULL
        )
        code = await process.wait()
    data_file = out_dir / SPECS[spec]
    if code != 0 or not data_file.exists():
        raise SystemExit(f"critest -benchmark ({spec}) exited {code} against {endpoint}; see {log}")
    data = json.loads(data_file.read_text())
    samples: dict[str, list[float]] = {name: [] for name in data["operationsNames"]}
    for point in data["datapoints"]:
        for name, nanos in zip(
            data["operationsNames"], point["operationsDurationsNs"], strict=True
        ):
            samples[name].append(nanos / 1e9)
    return samples


async def main(args: argparse.Namespace) -> dict[str, Any]:
    critest = args.critest or peer("CRITEST")
    builds = default_builds(args.containerd2, with_containerd2=not args.no_containerd2)
    base = short_tempdir("crishim-critest-bench-")
    params = base / "params.yaml"
    params.write_text(params_yaml(args.pods, args.containers, args.images))
    load_before = os.getloadavg()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    samples: dict[str, dict[str, list[float]]] = {}
    served = ServedCatalog(entries=catalog(own=False), storage_dir=base / "registry")
    await served.start()
    try:
        hosts_dir = served.write_hosts_dir(base / "certs.d")
        async with start_runtimes(base, builds, hosts_dir, "10.239") as runtimes:
            names = runtimes.names
            for name in names:
                await prepull(runtimes.endpoints[name])
                samples[name] = {}
            for round_ in range(args.rounds):
                for spec in [s for s in SPECS if any(w in s for w in args.only)]:
                    first = round_ % len(names)
                    for name in names[first:] + names[:first]:
                        slug = name.replace(" ", "-")
                        got = await run_spec(
                            critest,
                            runtimes.endpoints[name],
                            spec,
                            params,
                            base / "out" / slug / str(round_),
                            base / f"critest-{slug}.log",
                        )
                        for op, values in got.items():
                            samples[name].setdefault(op, []).extend(values)
                print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    finally:
        await served.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    pairs = [Pair(build) for build in builds]
    table = []
    for op in samples[pairs[0].anchor]:
        row: dict[str, Any] = {"op": op, "n": len(samples[pairs[0].shim].get(op, []))}
        for pair in pairs:
            anchor = statistics.median(samples[pair.anchor][op]) * 1e3
            shim = statistics.median(samples[pair.shim][op]) * 1e3
            row[pair.anchor] = anchor
            row[pair.shim] = shim
            row[f"ratio {pair.build.label}"] = shim / anchor
        table.append(row)
    report = {
        "started_at": started_at,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "rounds": args.rounds,
        "params": {"pods": args.pods, "containers": args.containers, "images": args.images},
        "critest": critest,
        "containerd_versions": {pair.build.label: pair.build.version for pair in pairs},
        "pairs": [[pair.anchor, pair.shim, f"ratio {pair.build.label}"] for pair in pairs],
        "table": table,
        "samples_s": samples,
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_report(report: dict[str, Any]) -> None:
    head = ["critest operation (p50 ms)", "n"]
    for anchor, shim, ratio in report["pairs"]:
        head += [anchor, shim, ratio.replace("ratio", "ratio on")]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for row in report["table"]:
        cells = [row["op"], str(row["n"])]
        for anchor, shim, ratio in report["pairs"]:
            cells += [f"{row[anchor]:.3g}", f"{row[shim]:.3g}", f"{row[ratio]:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    print(
        f"\nstarted {report['started_at']}; {report['rounds']} interleaved rounds; "
        f"load average before {'/'.join(f'{x:.2f}' for x in report['load_before'])}, after "
        f"{'/'.join(f'{x:.2f}' for x in report['load_after'])}; containerd "
        + ", ".join(report["containerd_versions"].values())
    )


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--critest", help="critest binary (default: $CRITEST or the peer build)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--pods", type=int, default=20, help="pod lifecycles per spec run")
    parser.add_argument("--containers", type=int, default=20, help="container lifecycles per run")
    parser.add_argument("--images", type=int, default=5, help="image pull/status/remove cycles")
    parser.add_argument("--containerd2", help="containerd 2.x binary (default: the peer build)")
    parser.add_argument("--no-containerd2", action="store_true", help="containerd 1.6 only")
    parser.add_argument("--json", type=Path, default=Path("critest_bench.json"))
    parser.add_argument("--keep", action="store_true", help="keep logs and critest output")
    parser.add_argument(
        "--only",
        nargs="+",
        default=[""],
        help="run only the specs whose name contains one of these words (e.g. Image Container)",
    )
    args = parser.parse_args()
    report = asyncio.run(main(args))
    print()
    print_report(report)
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    cli()
