"""Per-pod files the containers of a pod share: hostname, hosts, resolv.conf,
and a private /dev/shm (a tmpfs of its own, so pods cannot see each other's
shared memory). They live in the sandbox's directory under the state dir."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from cri_shim.gen.runtime import v1 as cri
from cri_shim.logs import log_event

log = logging.getLogger(__name__)

SHM_SIZE = "65536k"
HOST_RESOLV_CONF = Path("/etc/resolv.conf")
HOST_HOSTS = Path("/etc/hosts")
# resolv.conf limits glibc honours; kubelet validates the same ones.
MAX_DNS_SEARCHES = 32


class SandboxFilesError(ValueError):
    pass


def render_resolv_conf(dns: cri.DnsConfig) -> str:
    if len(dns.searches) > MAX_DNS_SEARCHES:
        raise SandboxFilesError(f"dns_config has {len(dns.searches)} searches; at most 32 allowed")
    lines = [f"search {' '.join(dns.searches)}"] if dns.searches else []
    lines += [f"nameserver {server}" for server in dns.servers]
    if dns.options:
        lines.append(f"options {' '.join(dns.options)}")
    return "\n".join(lines) + "\n"


class SandboxDirs:
    def __init__(self, root: Path, sandbox_id: str) -> None:
        self.root = root / sandbox_id
        self.hostname = self.root / "hostname"
        self.hosts = self.root / "hosts"
        self.resolv_conf = self.root / "resolv.conf"
        self.shm = self.root / "shm"

    def _write_files(self, hostname: str, dns: cri.DnsConfig | None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.shm.mkdir(exist_ok=True)
        self.hostname.write_text(hostname + "\n")
        if HOST_HOSTS.exists():
            shutil.copyfile(HOST_HOSTS, self.hosts)
        else:
            self.hosts.write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n")
        if dns is not None and (dns.servers or dns.searches or dns.options):
            self.resolv_conf.write_text(render_resolv_conf(dns))
        elif HOST_RESOLV_CONF.exists():
            shutil.copyfile(HOST_RESOLV_CONF, self.resolv_conf)
        else:
            self.resolv_conf.write_text("")

    async def create(self, hostname: str, dns: cri.DnsConfig | None, private_shm: bool) -> None:
        await asyncio.to_thread(self._write_files, hostname, dns)
        if private_shm and not await self._shm_mounted():
            await _run(
                "mount",
                "-t",
                "tmpfs",
                "-o",
                f"nosuid,nodev,noexec,mode=1777,size={SHM_SIZE}",
                "shm",
                str(self.shm),
            )

    async def _shm_mounted(self) -> bool:
        mounts = await asyncio.to_thread(Path("/proc/self/mountinfo").read_text)
        target = str(self.shm)
        return any(line.split()[4] == target for line in mounts.splitlines())

    async def release_shm(self) -> None:
        """Unmount the pod's /dev/shm (idempotent)."""
        if await self._shm_mounted():
            await _run("umount", "-l", str(self.shm))

    async def remove(self) -> None:
        await self.release_shm()
        await asyncio.to_thread(shutil.rmtree, self.root, True)


async def _run(*cmd: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        message = stderr.decode(errors="replace").strip()
        log_event(
            log, "command failed", level=logging.WARNING, command=" ".join(cmd), error=message
        )
        raise OSError(f"{cmd[0]} failed: {message}")
