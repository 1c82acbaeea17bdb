"""Network namespaces for pods, pinned by bind mount like `ip netns add` does.

A pod's namespace must outlive any process in it (the pause container starts
after CNI has wired the namespace, and DEL may run after every process is
gone), so it is pinned as a bind mount of the nsfs inode on an empty file
`<netns_dir>/cni-<uuid>`, the naming containerd uses. The pin directory is
made a shared mount first, exactly as iproute2 does: mount namespaces that
copied the host's table (containers, services with PrivateTmp) then see our
unmount too, and a removed pod's namespace really goes away instead of
lingering in their copies.

Creation does what util-linux `unshare --net=<file>` does, on a throwaway
thread instead of a process (a fork and exec cost ~5 ms per RunPodSandbox);
mount and unmount go straight to the syscalls (in a worker thread) so that
errno tells "not mounted" apart from "busy".
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import logging
import os
import re
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cri_shim.logs import log_event
from cri_shim.network.command import CommandResult, run_command

log = logging.getLogger(__name__)

DEFAULT_NETNS_DIR = "/var/run/netns"
NETNS_PREFIX = "cni-"

# <linux/sched.h>, <linux/nsfs.h>, <sys/mount.h>
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
NS_GET_NSTYPE = 0xB703
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 0x2

UMOUNT_ATTEMPTS = 5
UMOUNT_RETRY_DELAY = 0.1

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(OSError):
    """A namespace could not be created, entered or removed."""


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _mount(source: str, target: str, flags: int) -> None:
    _check(
        _libc.mount(source.encode(), target.encode(), None, ctypes.c_ulong(flags), None),
        f"mount {target}",
    )


def _umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def _setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def _is_netns_pin(path: str) -> bool:
    """True when `path` is an nsfs mount of a network namespace."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:  # ENOTTY: a plain file, not an nsfs inode
        return False
    finally:
        os.close(fd)


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _mount_entry(directory: str) -> tuple[bool, bool]:
    """(is a mount point, is shared) for `directory`, from /proc/self/mountinfo."""
    target = os.path.realpath(directory)
    found = (False, False)
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) < 7:
                continue
            mount_point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), fields[4])
            if mount_point != target:
                continue
            optional = fields[6 : fields.index("-")]
            # The last entry for a mount point is the one on top.
            found = (True, any(f.startswith("shared:") for f in optional))
    return found


_prepared: set[str] = set()
_prepare_lock = threading.Lock()


def _prepare_dir_sync(netns_dir: str) -> str:
    directory = os.path.abspath(netns_dir)
    with _prepare_lock:
        if directory in _prepared:
            return directory
        os.makedirs(directory, mode=0o755, exist_ok=True)
        mounted, shared = _mount_entry(directory)
        if not shared:
            if not mounted:
                _mount(directory, directory, MS_BIND | MS_REC)
            _mount("none", directory, MS_SHARED | MS_REC)
        _prepared.add(directory)
    return directory


async def _prepare_dir(netns_dir: str) -> str:
    """Make the pin dir a shared mount point (once per process), as `ip netns` does."""
    try:
        return await asyncio.to_thread(_prepare_dir_sync, netns_dir)
    except OSError as err:
        raise NetnsError(err.errno, f"cannot prepare netns dir {netns_dir}: {err}") from err


def _create_pin_file(path: str) -> None:
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))


def _remove_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _pin_new_netns(path: str) -> None:
    """unshare(CLONE_NEWNET) moves only the calling thread, so it runs on a thread
    of its own that binds its new namespace onto `path` and ends: no pooled
    thread is ever left in a pod's namespace."""
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            _check(_libc.unshare(ctypes.c_int(CLONE_NEWNET)), "unshare(CLONE_NEWNET)")
            _mount("/proc/thread-self/ns/net", path, MS_BIND)
        except BaseException as err:
            failures.append(err)

    thread = threading.Thread(target=worker, name="netns-create", daemon=True)
    thread.start()
    thread.join()
    if failures:
        raise failures[0]


# Run by a child process (unshare(CLONE_NEWUSER) refuses a threaded caller): a new
# user namespace and a network namespace it owns, held until stdin closes.
_USERNS_HOLDER = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    f"if libc.unshare({CLONE_NEWUSER | CLONE_NEWNET}) != 0:\n"
    "    sys.stderr.write(os.strerror(ctypes.get_errno())); sys.exit(1)\n"
    "sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.read()\n"
)


def _write_id_maps(pid: int, uid_map: str, gid_map: str) -> None:
    for name, line in (("uid_map", uid_map), ("gid_map", gid_map)):
        with open(f"/proc/{pid}/{name}", "w") as handle:
            handle.write(line + "\n")


def _pin_holder_namespaces(pid: int, netns_path: str, userns_path: str) -> None:
    _create_pin_file(userns_path)
    _mount(f"/proc/{pid}/ns/user", userns_path, MS_BIND)
    _mount(f"/proc/{pid}/ns/net", netns_path, MS_BIND)


async def _pin_netns_in_userns(
    netns_path: str, userns_path: str, uid_map: str, gid_map: str
) -> None:
    """containerd's setupNetnsWithinUserns: the pod's network namespace is owned by
    its user namespace (so runc can mount sysfs and set net.* sysctls there), and
    both are pinned. Maps are `container host size` lines."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        "-S",
        "-c",
        _USERNS_HOLDER,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None and holder.stderr is not None
    try:
        line = await holder.stdout.readline()
        if line != b"ready\n":
            error = (await holder.stderr.read()).decode(errors="replace")
            raise OSError(errno.EPERM, f"unshare(CLONE_NEWUSER|CLONE_NEWNET): {error}")
        await asyncio.to_thread(_write_id_maps, holder.pid, uid_map, gid_map)
        await asyncio.to_thread(_pin_holder_namespaces, holder.pid, netns_path, userns_path)
    finally:
        holder.stdin.close()
        if holder.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                holder.kill()
        await holder.wait()


def new_pin_name() -> str:
    return f"{NETNS_PREFIX}{uuid.uuid4()}"


@dataclass(frozen=True)
class UsernsPin:
    """Create the network namespace inside a new user namespace with these maps
    (`container host size`), pinned at `path`."""

    path: str
    uid_map: str
    gid_map: str


async def create_pod_netns(
    netns_dir: str | Path = DEFAULT_NETNS_DIR,
    name: str | None = None,
    userns: UsernsPin | None = None,
) -> str:
    """Create a new network namespace pinned at `<netns_dir>/<name>` (default
    `cni-<uuid>`), owned by a new pinned user namespace when `userns` says so;
    returns its path."""
    directory = await _prepare_dir(os.fspath(netns_dir))
    path = os.path.join(directory, name or new_pin_name())
    await asyncio.to_thread(_create_pin_file, path)
    if userns is None:
        work = asyncio.ensure_future(asyncio.to_thread(_pin_new_netns, path))
    else:
        work = asyncio.ensure_future(
            _pin_netns_in_userns(path, userns.path, userns.uid_map, userns.gid_map)
        )
    try:
        await asyncio.shield(work)
    except BaseException as err:
        with contextlib.suppress(BaseException):
            await work  # a cancelled caller: the mount may still land; undo it after
        await remove_pod_netns(path)
        if userns is not None:
            await remove_pod_netns(userns.path)
        if isinstance(err, OSError):
            raise NetnsError(
                err.errno or errno.EIO, f"cannot create network namespace: {err}"
            ) from err
        raise
    try:
        await asyncio.to_thread(_loopback_up, path)
    except BaseException:
        await remove_pod_netns(path)
        if userns is not None:
            await remove_pod_netns(userns.path)
        raise
    log_event(log, "netns created", level=logging.DEBUG, netns=path)
    return path


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
_IFREQ_FLAGS = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags in the union


def _loopback_up(path: str) -> None:
    """Bring `lo` up in the pod's namespace, as containerd's own loopback network
    does before the configured one: a conflist without the loopback plugin
    (flannel's, calico's) would otherwise leave pods without 127.0.0.1."""
    with _socket_in_netns(path, socket.AF_INET) as sock:  # its ioctls act in that netns
        request = _IFREQ_FLAGS.pack(b"lo", 0)
        _, flags = _IFREQ_FLAGS.unpack(fcntl.ioctl(sock, SIOCGIFFLAGS, request))
        if not flags & IFF_UP:
            fcntl.ioctl(sock, SIOCSIFFLAGS, _IFREQ_FLAGS.pack(b"lo", flags | IFF_UP))


def _unmount_pin(path: str) -> bool:
    """Unmount one layer; retry a busy pin, then detach it lazily. False if not mounted."""
    for attempt in range(UMOUNT_ATTEMPTS):
        try:
            _umount(path)
            return True
        except OSError as err:
            if err.errno in (errno.EINVAL, errno.ENOENT):  # not (or no longer) a mount point
                return False
            if err.errno != errno.EBUSY:
                raise
        if attempt < UMOUNT_ATTEMPTS - 1:
            time.sleep(UMOUNT_RETRY_DELAY)
    _umount(path, MNT_DETACH)
    return True


def _remove_sync(path: str) -> bool:
    """Unmount every pin stacked on `path`, then delete it; False when it was absent."""
    if not os.path.lexists(path):
        return False
    while _unmount_pin(path):
        pass
    _remove_file(path)
    return True


async def remove_pod_netns(path: str | Path) -> None:
    """Unmount and delete a pinned namespace. Idempotent: a missing pin is fine."""
    target = os.fspath(path)
    if not target:
        return
    try:
        removed = await asyncio.to_thread(_remove_sync, target)
    except OSError as err:
        raise NetnsError(err.errno, f"cannot remove network namespace {target}: {err}") from err
    if removed:
        log_event(log, "netns removed", level=logging.DEBUG, netns=target)


async def netns_exists(path: str | Path) -> bool:
    """True when `path` is a pinned network namespace (not merely an empty file)."""
    target = os.fspath(path)
    return bool(target) and await asyncio.to_thread(_is_netns_pin, target)


exists = netns_exists


async def run_in_netns(
    path: str | Path,
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    timeout: float = 30.0,
) -> CommandResult:
    """Run a command inside the namespace (`nsenter --net=...`), for helpers and tests."""
    return await run_command(
        ["nsenter", f"--net={os.fspath(path)}", "--", *argv], input=input, timeout=timeout
    )


def _socket_in_netns(path: str, family: socket.AddressFamily) -> socket.socket:
    """A socket created inside the namespace; it stays there whatever thread uses it.

    setns() moves only the calling thread, so this runs on a throwaway thread
    that ends right after: even if switching back failed, no pooled thread is
    ever left in a pod's namespace.
    """
    made: list[socket.socket] = []
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(target, CLONE_NEWNET)
                    try:
                        made.append(socket.socket(family, socket.SOCK_STREAM))
                    finally:
                        _setns(own, CLONE_NEWNET)
                finally:
                    os.close(own)
            finally:
                os.close(target)
        except BaseException as err:
            failures.append(err)

    thread = threading.Thread(target=worker, name="netns-socket", daemon=True)
    thread.start()
    thread.join()
    if failures or not made:
        for sock in made:
            sock.close()
        error = failures[0] if failures else RuntimeError("no socket was made")
        raise NetnsError(getattr(error, "errno", None) or errno.EIO, f"netns {path}: {error}")
    return made[0]


def _candidate_addresses(host: str) -> list[str]:
    if host == "localhost":
        return ["127.0.0.1", "::1"]
    return [str(ipaddress.ip_address(host))]


async def open_connection_in_netns(
    path: str | Path, host: str, port: int, *, timeout: float = 10.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to host:port as seen from inside the pod's namespace (port-forward).

    `host` is an IP literal or "localhost" (tried as 127.0.0.1, then ::1, as
    kubelet's port-forward expects). The connection itself is ordinary asyncio.
    """
    last_error: OSError | None = None
    for address in _candidate_addresses(host):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = await asyncio.to_thread(_socket_in_netns, os.fspath(path), family)
        sock.setblocking(False)
        try:
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(sock, (address, port)), timeout)
        except (OSError, TimeoutError) as err:
            sock.close()
            last_error = err
            continue
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)
    assert last_error is not None
    raise last_error


__all__ = [
    "DEFAULT_NETNS_DIR",
    "NetnsError",
    "UsernsPin",
    "create_pod_netns",
    "exists",
    "netns_exists",
    "open_connection_in_netns",
    "remove_pod_netns",
    "run_in_netns",
]
