"""Per-pod files the containers of a pod share: hostname, hosts, resolv.conf,
and a private /dev/shm (a tmpfs of its own, so pods cannot see each other's
shared memory). They live in the sandbox's directory under the state dir."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
from pathlib import Path

from cri_shim.gen.runtime import v1 as cri
from cri_shim.logs import log_event

log = logging.getLogger(__name__)

SHM_SIZE = "65536k"
# <sys/mount.h>: nosuid, nodev, noexec; MNT_DETACH is umount -l.
SHM_FLAGS = 0x2 | 0x4 | 0x8
SHM_DATA = f"mode=1777,size={SHM_SIZE}".encode()
MNT_DETACH = 0x2
HOST_RESOLV_CONF = Path("/etc/resolv.conf")
HOST_HOSTS = Path("/etc/hosts")
# resolv.conf limits glibc honours; kubelet validates the same ones.
MAX_DNS_SEARCHES = 32

_libc = ctypes.CDLL(None, use_errno=True)


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
        # The pod's user namespace, pinned by bind mount (pods with userns mode POD).
        self.userns = self.root / "userns"

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
        await asyncio.to_thread(self._create_sync, hostname, dns, private_shm)

    def _create_sync(self, hostname: str, dns: cri.DnsConfig | None, private_shm: bool) -> None:
        """Files and the shm mount in one thread hop, the mount by syscall: a `mount`
        process costs a fork and exec (~5 ms) on every RunPodSandbox."""
        self._write_files(hostname, dns)
        if private_shm and not self._shm_mounted():
            _call(
                "mount",
                _libc.mount(b"shm", bytes(self.shm), b"tmpfs", ctypes.c_ulong(SHM_FLAGS), SHM_DATA),
                self.shm,
            )

    def _shm_mounted(self) -> bool:
        target = str(self.shm)
        with open("/proc/self/mountinfo") as mounts:
            return any(line.split()[4] == target for line in mounts)

    def _release_shm_sync(self) -> None:
        if self._shm_mounted():
            _call("umount", _libc.umount2(bytes(self.shm), ctypes.c_int(MNT_DETACH)), self.shm)

    async def release_shm(self) -> None:
        """Unmount the pod's /dev/shm (idempotent)."""
        await asyncio.to_thread(self._release_shm_sync)

    def _remove_sync(self) -> None:
        self._release_shm_sync()
        if self.userns.exists():
            _libc.umount2(bytes(self.userns), ctypes.c_int(MNT_DETACH))
        shutil.rmtree(self.root, True)

    async def remove(self) -> None:
        await asyncio.to_thread(self._remove_sync)


def _call(what: str, result: int, target: Path) -> None:
    if result != 0:
        code = ctypes.get_errno()
        message = f"{what} {target}: {os.strerror(code)}"
        log_event(log, "command failed", level=logging.WARNING, command=what, error=message)
        raise OSError(code, message)
