"""Pull time of a multi-layer image: cri-shim's PullImage against `ctr images pull`.

    python -m tests.benchmarks.pull_vs_ctr [--rounds 5] [--layers 4] [--layer-mib 8]

Both pull the same image from the same local registry into the same private
containerd (the shim in one namespace, ctr in another), unpacking onto
overlayfs. Between pulls the image is removed with a synchronous GC, so every
pull downloads every byte. Rounds alternate which side goes first. Prints the
median per side and the ratio shim/ctr from this one run; this is a benchmark,
not a test, and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

from cri_shim.containerd.embedded import EmbeddedContainerd
from cri_shim.gen.runtime import v1 as cri
from cri_shim.server import Shim
from tests.conftest import CriClient, make_settings, short_tempdir
from tests.support import images as im
from tests.support.registry import Registry

CTR_NAMESPACE = "bench-ctr"
SHIM_NAMESPACE = "bench-shim"


def multilayer_image(layers: int, layer_mib: int) -> im.Image:
    rng = random.Random(42)
    extra = [
        im.layer([im.file(f"data/layer{i}", rng.randbytes(layer_mib << 20))]) for i in range(layers)
    ]
    return im.busybox_image(media="oci", extra_layers=extra)


async def run_ctr(address: str, *args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "ctr",
        "-a",
        address,
        "-n",
        CTR_NAMESPACE,
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"ctr {' '.join(args)}: {err.decode().strip()}")


async def pull_with_shim(client: CriClient, ref: str) -> float:
    started = time.perf_counter()
    await client.image.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=ref)))
    elapsed = time.perf_counter() - started
    await client.image.remove_image(cri.RemoveImageRequest(image=cri.ImageSpec(image=ref)))
    return elapsed


async def pull_with_ctr(address: str, ref: str) -> float:
    started = time.perf_counter()
    await run_ctr(address, "images", "pull", "--plain-http", ref)
    elapsed = time.perf_counter() - started
    await run_ctr(address, "images", "rm", "--sync", ref)
    return elapsed


async def main(rounds: int, layers: int, layer_mib: int, output: Path | None) -> dict[str, object]:
    base = short_tempdir("crishim-bench-")
    daemon = EmbeddedContainerd(base / "containerd", restart=False)
    await daemon.start()
    registry = Registry(auth="none")
    await registry.start()
    shim: Shim | None = None
    try:
        image = await asyncio.to_thread(multilayer_image, layers, layer_mib)
        await registry.push("bench/multilayer", "1", image)
        ref = f"{registry.host}/bench/multilayer:1"
        shim = Shim(make_settings(base, daemon.address, containerd__namespace=SHIM_NAMESPACE))
        await shim.start()
        client = CriClient.connect(shim.socket_path)
        # One warm-up each (connections, token caches), not counted.
        await pull_with_shim(client, ref)
        await pull_with_ctr(daemon.address, ref)
        shim_times: list[float] = []
        ctr_times: list[float] = []
        for round_ in range(rounds):
            if round_ % 2 == 0:
                shim_times.append(await pull_with_shim(client, ref))
                ctr_times.append(await pull_with_ctr(daemon.address, ref))
            else:
                ctr_times.append(await pull_with_ctr(daemon.address, ref))
                shim_times.append(await pull_with_shim(client, ref))
        client.close()
    finally:
        if shim is not None:
            await shim.stop()
        await registry.stop()
        await daemon.stop()
    result: dict[str, object] = {
        "image": {"layers": layers + 1, "extra_layer_mib": layer_mib},
        "rounds": rounds,
        "shim_s": shim_times,
        "ctr_s": ctr_times,
        "shim_median_s": statistics.median(shim_times),
        "ctr_median_s": statistics.median(ctr_times),
        "ratio_shim_over_ctr": statistics.median(shim_times) / statistics.median(ctr_times),
    }
    if output is not None:
        output.write_text(json.dumps(result, indent=2) + "\n")
    return result


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4, help="extra layers on top of busybox")
    parser.add_argument("--layer-mib", type=int, default=8, help="incompressible MiB per layer")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = asyncio.run(main(args.rounds, args.layers, args.layer_mib, args.json))
    print(
        f"pull of a {result['image']} image, {args.rounds} rounds: "
        f"cri-shim median {result['shim_median_s']:.3f}s, "
        f"ctr median {result['ctr_median_s']:.3f}s, "
        f"ratio cri-shim/ctr {result['ratio_shim_over_ctr']:.2f}"
    )


if __name__ == "__main__":
    cli()
