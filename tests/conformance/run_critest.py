"""Run the CRI validation suite (critest) against a freshly started cri-shim.

    python -m tests.conformance.run_critest --critest /path/to/critest [--focus REGEX]

critest is not part of this repository: build it yourself from cri-tools and
pass its path. This script brings up everything critest needs offline: the
test image catalog served by local registries (each upstream registry mapped
to a local mirror through containerd-style hosts.toml files), a CNI bridge
config on a private subnet, and `cri-shim serve` with a private containerd.
It prints critest's own summary line and exits with critest's status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.pods import write_shim_config
from tests.support.catalog import ServedCatalog, catalog

# The one critest spec no offline mirror can satisfy: it pins Google's build by digest.
DEFAULT_SKIP = r"public image with digest should be pulled and removed"
SUMMARY = re.compile(r"Ran \d+ of \d+ Specs.*|\d+ Passed \| \d+ Failed.*")


def write_cni_config(conf_dir: Path, octet: int, data_dir: Path) -> str:
    bridge = f"crishimct{octet}"
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "10-critest.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": "critest",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": bridge,
                        "isGateway": True,
                        "ipMasq": False,
                        "hairpinMode": True,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": f"10.236.{octet}.0/24"}]],
                            "dataDir": str(data_dir),
                            "routes": [{"dst": "0.0.0.0/0"}],
                        },
                    },
                    {"type": "portmap", "capabilities": {"portMappings": True}},
                    {"type": "loopback"},
                ],
            },
            indent=2,
        )
    )
    return bridge


async def wait_for_socket(path: Path, process: asyncio.subprocess.Process) -> None:
    for _ in range(600):
        if process.returncode is not None:
            raise SystemExit(f"cri-shim exited with {process.returncode}")
        if path.exists():
            return
        await asyncio.sleep(0.1)
    raise SystemExit("cri-shim did not create its socket within 60s")


async def run(args: argparse.Namespace) -> int:
    base = Path(tempfile.mkdtemp(prefix="critest-", dir="/tmp"))
    octet = random.randrange(10, 250)
    bridge = write_cni_config(base / "cni", octet, base / "ipam")
    served = ServedCatalog(entries=catalog(own=False), storage_dir=base / "registry")
    await served.start()
    shim: asyncio.subprocess.Process | None = None
    try:
        hosts_dir = served.write_hosts_dir(base / "certs.d")
        config = write_shim_config(
            base, hosts_dir, str(base / "no-host-containerd.sock"), embedded=True
        )
        with (base / "cri-shim.log").open("ab") as log:
            shim = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "cri_shim",
                "serve",
                "--config",
                str(config),
                stdout=log,
                stderr=log,
            )
        socket = base / "cri.sock"
        await wait_for_socket(socket, shim)
        skip = "|".join(filter(None, [DEFAULT_SKIP, args.skip]))
        cmd = [
            args.critest,
            f"-runtime-endpoint=unix://{socket}",
            f"-ginkgo.skip={skip}",
        ]
        if args.parallel > 1:
            cmd.append(f"-parallel={args.parallel}")
        if args.focus:
            cmd.append(f"-ginkgo.focus={args.focus}")
        cmd += args.extra
        print("running:", " ".join(cmd), flush=True)
        env = dict(os.environ)
        env["PATH"] = f"{Path(args.critest).parent}{os.pathsep}{env.get('PATH', '')}"
        critest = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
        )
        assert critest.stdout is not None
        output = bytearray()
        async for line in critest.stdout:
            output += line
            if args.verbose:
                sys.stdout.buffer.write(line)
        code = await critest.wait()
        (base / "critest.log").write_bytes(bytes(output))
        for text in output.decode(errors="replace").splitlines():
            if SUMMARY.search(text) or text.startswith(("[FAIL]", "  [FAIL]")):
                print(text.strip())
        print(f"critest exit {code}; output in {base / 'critest.log'}")
        print(f"shim log in {base / 'cri-shim.log'}")
        return code
    finally:
        if shim is not None and shim.returncode is None:
            shim.send_signal(signal.SIGTERM)
            await shim.wait()
        await served.stop()
        subprocess.run(["ip", "link", "delete", bridge], check=False, capture_output=True)
        if not args.keep:
            shutil.rmtree(base / "registry", ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--critest", required=True, help="path to a critest binary")
    parser.add_argument("--focus", default="", help="ginkgo focus regex")
    parser.add_argument("--skip", default="", help="extra ginkgo skip regex")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the registry storage")
    parser.add_argument("-v", "--verbose", action="store_true", help="stream critest output")
    parser.add_argument("extra", nargs="*", help="more critest flags, after --")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
