"""Run the CRI validation suite (critest) against a freshly started cri-shim.

    python -m tests.conformance.run_critest [--critest PATH] [--containerd PATH] [--focus REGEX]

critest is the pinned peer build ($CRITEST, or tests/peers/build.sh); the shim's
private containerd is `containerd` on PATH unless --containerd names another
(tests/test_critest.py runs both streaming modes against each containerd version
of the matrix). This script brings up everything critest needs offline: the
test image catalog served by local registries (each upstream registry mapped
to a local mirror through containerd-style hosts.toml files), a CNI bridge
config on a private subnet, and `cri-shim serve` with a private containerd.
It prints critest's own summary line, the failed specs (from critest's JUnit
report), and exits with critest's status.
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
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

from tests.pods import USERNS_HANDLER, write_shim_config
from tests.support.catalog import ServedCatalog, catalog

# The one critest spec no offline mirror can satisfy: it pins Google's build by digest.
DEFAULT_SKIP = r"public image with digest should be pulled and removed"
SUMMARY = re.compile(r"Ran \d+ of \d+ Specs.*|\d+ Passed \| \d+ Failed.*")
# Ginkgo's JUnit statuses that mean the spec (or a suite node) did not pass.
FAILED_STATES = {"failed", "panicked", "interrupted", "timedout", "aborted"}


@dataclass
class CritestResult:
    """One critest run: its exit status and the specs by outcome (JUnit report)."""

    code: int
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    log_dir: Path = Path()

    @property
    def ran(self) -> int:
        return len(self.passed) + len(self.failed)

    def summary(self) -> str:
        return (
            f"critest: {len(self.passed)} passed, {len(self.failed)} failed, "
            f"{len(self.skipped)} skipped (exit {self.code}; logs in {self.log_dir})"
        )


def parse_junit(path: Path) -> tuple[list[str], list[str], list[str]]:
    """(passed, failed, skipped) spec names from Ginkgo's JUnit report. Suite
    nodes ([BeforeSuite] and the like) count only when they fail."""
    passed: list[str] = []
    failed: list[str] = []
    skipped: list[str] = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        status = case.get("status", "")
        is_spec = name.startswith("[It]")
        if status in FAILED_STATES or case.find("failure") is not None:
            failed.append(name)
        elif not is_spec:
            continue
        elif status == "passed":
            passed.append(name)
        else:
            skipped.append(name)
    return passed, failed, skipped


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


def default_critest() -> str:
    from tests.support.peers import peer_path

    return peer_path("CRITEST")


async def run(args: argparse.Namespace) -> int:
    result = await run_suite(
        args.critest or default_critest(),
        containerd=args.containerd,
        focus=args.focus,
        skip=args.skip,
        parallel=args.parallel,
        extra=args.extra,
        keep=args.keep,
        verbose=args.verbose,
    )
    for name in result.failed:
        print(f"FAILED {name}")
    print(result.summary())
    return result.code


async def run_suite(
    critest: str,
    *,
    containerd: str = "containerd",
    runc: str = "",
    focus: str = "",
    skip: str = "",
    parallel: int = 1,
    extra: list[str] | None = None,
    keep: bool = False,
    verbose: bool = False,
) -> CritestResult:
    """critest against a fresh `cri-shim serve` with a private containerd, its pods
    on the runtime handler whose runc is `runc` (default: the peer build)."""
    if not runc:
        from tests.support.peers import peer_path

        runc = peer_path("RUNC")
    base = Path(tempfile.mkdtemp(prefix="critest-", dir="/tmp"))
    # Searchable by all, as containerd's state dir: user-namespaced pods' mapped root
    # must reach its rootfs under it.
    base.chmod(0o711)
    octet = random.randrange(10, 250)
    bridge = write_cni_config(base / "cni", octet, base / "ipam")
    served = ServedCatalog(entries=catalog(own=False), storage_dir=base / "registry")
    await served.start()
    shim: asyncio.subprocess.Process | None = None
    try:
        hosts_dir = served.write_hosts_dir(base / "certs.d")
        config = write_shim_config(
            base,
            hosts_dir,
            str(base / "no-host-containerd.sock"),
            embedded=True,
            containerd_extra=f"binary = {json.dumps(containerd)}\n",
            handlers={USERNS_HANDLER: runc},
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
        report = base / "junit.xml"
        cmd = [
            critest,
            f"-runtime-endpoint=unix://{socket}",
            # The handler with the peer runc: the only one here that can run critest's
            # user-namespace specs (Debian's runc 1.1.5 has no id-mapped mounts).
            f"-runtime-handler={USERNS_HANDLER}",
            f"-ginkgo.skip={'|'.join(filter(None, [DEFAULT_SKIP, skip]))}",
            f"-ginkgo.junit-report={report}",
            "-ginkgo.no-color",
        ]
        if parallel > 1:
            cmd.append(f"-parallel={parallel}")
        if focus:
            cmd.append(f"-ginkgo.focus={focus}")
        cmd += extra or []
        print("running:", " ".join(cmd), flush=True)
        env = dict(os.environ)
        env["PATH"] = f"{Path(critest).parent}{os.pathsep}{env.get('PATH', '')}"
        runner = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
        )
        assert runner.stdout is not None
        output = bytearray()
        async for line in runner.stdout:
            output += line
            if verbose:
                sys.stdout.buffer.write(line)
        code = await runner.wait()
        (base / "critest.log").write_bytes(bytes(output))
        for text in output.decode(errors="replace").splitlines():
            if SUMMARY.search(text) or text.startswith(("[FAIL]", "  [FAIL]")):
                print(text.strip())
        print(f"critest exit {code}; output in {base / 'critest.log'}")
        print(f"shim log in {base / 'cri-shim.log'}", flush=True)
        result = CritestResult(code, log_dir=base)
        if report.exists():
            result.passed, result.failed, result.skipped = parse_junit(report)
        elif code != 0:
            result.failed.append(f"critest exited {code} without a JUnit report")
        return result
    finally:
        if shim is not None and shim.returncode is None:
            shim.send_signal(signal.SIGTERM)
            await shim.wait()
        await served.stop()
        subprocess.run(["ip", "link", "delete", bridge], check=False, capture_output=True)
        if not keep:
            shutil.rmtree(base / "registry", ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--critest", default="", help="critest binary (default: the peer build)")
    parser.add_argument(
        "--containerd", default="containerd", help="containerd binary for the private containerd"
    )
    parser.add_argument("--focus", default="", help="ginkgo focus regex")
    parser.add_argument("--skip", default="", help="extra ginkgo skip regex")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the registry storage")
    parser.add_argument("-v", "--verbose", action="store_true", help="stream critest output")
    parser.add_argument("extra", nargs="*", help="more critest flags, after --")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
