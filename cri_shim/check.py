"""`cri-shim check`: is this node able to run pods through cri-shim?

Prints one line per check, `PASS|WARN|FAIL <name>: <detail>`, with the detail
saying what was found or what to fix. FAIL means pods cannot run (no
containerd, no runc, no usable CNI config, no overlay filesystem, cgroups or
directories the shim cannot use); WARN means they run but something an
operator usually wants is off. The command exits 1 when anything FAILs, so it
can gate a node's provisioning. Every check is bounded by a timeout and the
checks run concurrently, so a hung containerd cannot hang the command.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from cri_shim.container.checkpoint import criu_problem
from cri_shim.containerd.client import ContainerdClient
from cri_shim.containerd.embedded import read_binary_version
from cri_shim.containerd.introspection import Introspection
from cri_shim.containerd.version import (
    SUPPORTED,
    parse_version,
    unsupported_reason,
    version_field,
)
from cri_shim.errors import ContainerdError, ContainerdUnavailable
from cri_shim.host import detect_cgroup_driver, runs_systemd
from cri_shim.network import default_network
from cri_shim.network.cni_config import CniConfigError, load_network_config
from cri_shim.runtime_handlers import DEFAULT_HANDLER, kernel_version, probe
from cri_shim.settings import Settings

SNAPSHOTTER = "overlayfs"
# Where runc and the containerd shim usually live, beyond PATH (sudo and
# service managers often drop the sbin dirs from PATH).
SYSTEM_BIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
# Controllers without which pod resource limits cannot be applied.
REQUIRED_CONTROLLERS = ("cpu", "memory", "pids")


class Outcome(StrEnum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class CheckResult:
    outcome: Outcome
    name: str
    detail: str

    @property
    def line(self) -> str:
        return f"{self.outcome} {self.name}: {self.detail}"


def _pass(name: str, detail: str) -> list[CheckResult]:
    return [CheckResult(Outcome.PASS, name, detail)]


def _warn(name: str, detail: str) -> list[CheckResult]:
    return [CheckResult(Outcome.WARN, name, detail)]


def _fail(name: str, detail: str) -> list[CheckResult]:
    return [CheckResult(Outcome.FAIL, name, detail)]


@dataclass(frozen=True)
class Node:
    """Where host facts are read; the tests point these at fake trees."""

    proc: Path = Path("/proc")
    cgroup_root: Path = Path("/sys/fs/cgroup")
    modules: Path = Path("/lib/modules")
    bin_dirs: tuple[str, ...] = field(
        default_factory=lambda: (*os.environ.get("PATH", "").split(os.pathsep), *SYSTEM_BIN_DIRS)
    )


@dataclass(frozen=True)
class Context:
    settings: Settings
    node: Node
    timeout: float


CheckFn = Callable[[Context], Awaitable[list[CheckResult]]]


@dataclass(frozen=True)
class Check:
    name: str
    run: CheckFn
    # A check that errors or times out is a FAIL if critical, a WARN otherwise.
    critical: bool = True


# --- containerd ---------------------------------------------------------------


async def _snapshotter(client: ContainerdClient, timeout: float) -> list[CheckResult]:
    name = "snapshotter"
    plugins = await Introspection(client).plugins(
        "type==io.containerd.snapshotter.v1", timeout=timeout
    )
    plugin = next((p for p in plugins if p.id == SNAPSHOTTER), None)
    if plugin is None:
        return _fail(name, f"containerd has no {SNAPSHOTTER} snapshotter plugin")
    if plugin.init_err is not None and (plugin.init_err.code or plugin.init_err.message):
        return _fail(
            name,
            f"containerd's {SNAPSHOTTER} snapshotter failed to load: {plugin.init_err.message}",
        )
    root = plugin.exports.get("root", "")
    return _pass(
        name, f"containerd's {SNAPSHOTTER} snapshotter is loaded" + (f" ({root})" if root else "")
    )


async def _private_containerd(
    binary: str, address: str, reason: str, timeout: float
) -> list[CheckResult]:
    """Nothing answers at `address`: `serve` would start `binary`, if its version fits."""
    try:
        version = version_field(await read_binary_version(binary, timeout)) or "unknown"
    except (OSError, TimeoutError) as err:
        return _fail("containerd", f"not reachable at {address} ({reason}); {err}")
    problem = unsupported_reason(version)
    if problem is not None:
        return _fail(
            "containerd",
            f"not reachable at {address}, and {binary} (containerd.binary) is {version}: "
            f"cri-shim needs containerd {SUPPORTED}",
        )
    return _warn(
        "containerd",
        f"not reachable at {address} ({reason}); `serve` would start a private containerd "
        f"{version} from {binary} (containerd.embedded = true: not for production)",
    )


async def check_containerd(ctx: Context) -> list[CheckResult]:
    """Version answers prove the socket, gRPC and the namespace header all work."""
    config = ctx.settings.containerd
    client = ContainerdClient(config.address, config.namespace)
    try:
        try:
            version = await client.server_version(timeout=ctx.timeout)
        except (ContainerdError, ContainerdUnavailable, TimeoutError) as err:
            cause = err.__cause__ if isinstance(err, ContainerdUnavailable) else None
            reason = str(cause or err) or f"no answer within {ctx.timeout:g}s"
            private = await asyncio.to_thread(shutil.which, config.binary)
            if config.embedded and private is not None:
                return await _private_containerd(private, config.address, reason, ctx.timeout)
            return _fail("containerd", f"not reachable at {config.address}: {reason}")
        found = (
            f"containerd {version.version} (revision {version.revision or 'unknown'}) "
            f"at {config.address}"
        )
        problem = unsupported_reason(version.version)
        if problem is not None and parse_version(version.version) is not None:
            return _fail(
                "containerd", f"{found} is not supported: cri-shim needs containerd {SUPPORTED}"
            )
        if problem is not None:
            results = _warn(
                "containerd", f"{found}: {problem}; cri-shim needs containerd {SUPPORTED}"
            )
        else:
            results = _pass("containerd", found)
        try:
            results += await _snapshotter(client, ctx.timeout)
        except (ContainerdError, ContainerdUnavailable, TimeoutError) as err:
            results += _warn("snapshotter", f"cannot list containerd's plugins: {err}")
        return results
    finally:
        client.close()


# --- binaries -----------------------------------------------------------------


def _which(binary: str, dirs: Sequence[str]) -> str | None:
    return shutil.which(binary, path=os.pathsep.join(d for d in dirs if d))


async def _run_version(path: str, timeout: float) -> str:
    """First line of `<path> --version`, run without blocking the loop."""
    text = await read_binary_version(path, timeout)
    return text.splitlines()[0] if text else ""


async def check_runc(ctx: Context) -> list[CheckResult]:
    path = await asyncio.to_thread(_which, "runc", ctx.node.bin_dirs)
    if path is None:
        return _fail("runc", "runc not found in PATH or the sbin dirs: containers cannot start")
    try:
        first = await _run_version(path, ctx.timeout)
    except (OSError, TimeoutError) as err:
        return _fail("runc", f"{path} does not run: {err or 'timed out'}")
    version = first.split()[2] if first.startswith("runc version ") else first
    return _pass("runc", f"runc {version} at {path}")


async def check_runc_shim(ctx: Context) -> list[CheckResult]:
    """containerd starts every task through this shim binary, found on its PATH."""
    name = "containerd-shim-runc-v2"
    path = await asyncio.to_thread(_which, name, ctx.node.bin_dirs)
    if path is None:
        return _fail("runtime shim", f"{name} not found in PATH: containerd cannot start tasks")
    return _pass("runtime shim", f"{name} at {path}")


async def check_criu(ctx: Context) -> list[CheckResult]:
    """CheckpointContainer and restore need CRIU that works on this kernel."""
    path = await asyncio.to_thread(_which, "criu", ctx.node.bin_dirs)
    problem = await asyncio.to_thread(criu_problem, path, ctx.node.proc, search=False)
    if problem is not None or path is None:
        return _warn("criu", f"CheckpointContainer and restore are unavailable: {problem}")
    version = await _run_version(str(path), ctx.timeout)
    return _pass("criu", f"{version.removeprefix('Version: ')} at {path}: checkpoint/restore works")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


async def check_user_namespaces(ctx: Context) -> list[CheckResult]:
    """Pods with `hostUsers: false` need a handler whose runc (1.2+) and kernel
    (5.19+) can id-map mounts, and user namespaces enabled in the kernel."""
    name = "user namespaces"
    limit = await asyncio.to_thread(_read_text, Path("/proc/sys/user/max_user_namespaces"))
    if limit is not None and limit.strip() == "0":
        return _warn(name, "user.max_user_namespaces = 0: the kernel allows no user namespaces")
    kernel = kernel_version()
    default = await asyncio.to_thread(_which, "runc", ctx.node.bin_dirs)
    configured = {DEFAULT_HANDLER: default or "runc"} | {
        n: h.runc_binary for n, h in ctx.settings.runtime.handlers.items()
    }
    handlers = [await probe(n, b, kernel) for n, b in configured.items()]
    able = [h.name for h in handlers if h.user_namespaces]
    unable = "; ".join(f"{h.name}: {h.userns_problem}" for h in handlers if not h.user_namespaces)
    if not able:
        return _warn(name, f"no runtime handler can run user-namespaced pods ({unable})")
    return _pass(
        name,
        f"handlers {', '.join(able)} can run user-namespaced pods"
        + (f" (not {unable})" if unable else ""),
    )


# --- CNI ------------------------------------------------------------------------


async def check_cni(ctx: Context) -> list[CheckResult]:
    cni = ctx.settings.cni
    try:
        config = await asyncio.to_thread(load_network_config, Path(cni.conf_dir), cni.bin_dirs)
    except CniConfigError as err:
        missing = await asyncio.to_thread(default_network.missing_plugins, cni.bin_dirs)
        if ctx.settings.containerd.embedded and cni.default_network and not missing:
            return _warn(
                "cni",
                f"{err}; a `serve` that starts a private containerd writes a default network "
                f"(bridge {cni.default_bridge}, {cni.default_subnet}) into "
                f"{ctx.settings.state_path / 'cni' / 'net.d'}",
            )
        return _fail("cni", str(err))
    return _pass(
        "cni",
        f"network {config.name!r} from {config.source} (cniVersion "
        f"{config.cni_version or 'unset'}; plugins {', '.join(config.plugin_types)} found)",
    )


# --- kernel and host ------------------------------------------------------------


def _cgroups(settings: Settings, node: Node) -> list[CheckResult]:
    root = node.cgroup_root
    name = "cgroups"
    if (root / "cgroup.controllers").is_file():
        available = set((root / "cgroup.controllers").read_text().split())
        missing = [c for c in REQUIRED_CONTROLLERS if c not in available]
        if missing:
            return _fail(name, f"v2 at {root} lacks the {', '.join(missing)} controller(s)")
        layout, outcome = f"v2 (unified) at {root}", Outcome.PASS
    elif any((root / c).is_dir() for c in REQUIRED_CONTROLLERS):
        missing = [c for c in REQUIRED_CONTROLLERS if not (root / c).is_dir()]
        if missing:
            return _fail(name, f"v1 at {root} lacks the {', '.join(missing)} hierarchy")
        hybrid = " with a unified hierarchy (hybrid)" if (root / "unified").is_dir() else ""
        layout = f"v1{hybrid} at {root}; recent kubelets refuse cgroup v1, prefer v2"
        outcome = Outcome.WARN
    else:
        return _fail(name, f"no cgroup hierarchy mounted at {root}")
    configured = settings.runtime.cgroup_driver
    driver = detect_cgroup_driver(configured, root)
    if driver == "systemd" and not runs_systemd():
        return _fail(name, f"{layout}; runtime.cgroup_driver is systemd but systemd is not running")
    source = "auto-detected" if configured == "auto" else "configured"
    detail = f"{layout}; driver {driver} ({source}; kubelet's cgroupDriver must match)"
    return [CheckResult(outcome, name, detail)]


def _overlay(node: Node) -> list[CheckResult]:
    name = "overlayfs"
    filesystems = (node.proc / "filesystems").read_text()
    if any(line.split()[-1:] == ["overlay"] for line in filesystems.splitlines()):
        return _pass(name, "overlay is in /proc/filesystems")
    release = os.uname().release
    module_dir = node.modules / release / "kernel" / "fs" / "overlayfs"
    if module_dir.is_dir() and any(p.name.startswith("overlay.ko") for p in module_dir.iterdir()):
        return _warn(name, "overlay module is not loaded yet: run `modprobe overlay`")
    return _fail(name, "the kernel has no overlay filesystem: image layers cannot be mounted")


def _dir_usable(name: str, path: Path) -> list[CheckResult]:
    """A directory the shim writes: present and writable, or creatable."""
    if not path.exists():
        ancestor = path.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if os.access(ancestor, os.W_OK | os.X_OK):
            return _pass(name, f"{path} will be created (under writable {ancestor})")
        return _fail(name, f"{path} does not exist and {ancestor} is not writable")
    if not path.is_dir():
        return _fail(name, f"{path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        return _fail(name, f"{path} is not writable by uid {os.geteuid()}")
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        return _warn(name, f"{path} is world-writable (mode {mode:04o}): restrict it to root")
    return _pass(name, f"{path} writable (mode {mode:04o}, owner uid {info.st_uid})")


async def check_socket(ctx: Context) -> list[CheckResult]:
    """The CRI socket's dir must be writable; a socket already there is probed."""
    sock = Path(ctx.settings.server.socket)
    results = await asyncio.to_thread(_dir_usable, "socket", sock.parent)
    if results[0].outcome is Outcome.FAIL:
        return results
    try:
        mode = (await asyncio.to_thread(os.lstat, sock)).st_mode
    except FileNotFoundError:
        return results
    if not stat.S_ISSOCK(mode):
        return _fail("socket", f"{sock} exists and is not a socket; `serve` refuses to replace it")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(sock)), ctx.timeout)
    except (OSError, TimeoutError):
        return _warn("socket", f"stale socket at {sock} (nothing listens; `serve` removes it)")
    writer.close()
    return _pass("socket", f"a server is listening at {sock} (mode {stat.S_IMODE(mode):04o})")


async def check_state_dir(ctx: Context) -> list[CheckResult]:
    return await asyncio.to_thread(_dir_usable, "state dir", ctx.settings.state_path)


def _netns(node: Node) -> list[CheckResult]:
    if (node.proc / "self" / "ns" / "net").exists():
        return _pass("netns", "network namespaces are supported")
    return _fail("netns", "the kernel has no network namespaces: pods cannot get a network")


def _read_sysctl(node: Node, name: str) -> str | None:
    try:
        return (node.proc / "sys" / name.replace(".", "/")).read_text().strip()
    except FileNotFoundError:
        return None


def _ip_forward(node: Node) -> list[CheckResult]:
    value = _read_sysctl(node, "net.ipv4.ip_forward")
    if value == "1":
        return _pass("ip_forward", "net.ipv4.ip_forward = 1")
    return _warn(
        "ip_forward",
        f"net.ipv4.ip_forward = {value or 'missing'}: pod traffic is not routed off the node "
        "unless the CNI plugin enables it (sysctl -w net.ipv4.ip_forward=1)",
    )


def _br_netfilter(node: Node) -> list[CheckResult]:
    value = _read_sysctl(node, "net.bridge.bridge-nf-call-iptables")
    if value == "1":
        return _pass("br_netfilter", "net.bridge.bridge-nf-call-iptables = 1")
    if value is None:
        return _warn(
            "br_netfilter",
            "module not loaded: Service traffic between pods on one bridge skips iptables "
            "(modprobe br_netfilter)",
        )
    return _warn(
        "br_netfilter",
        f"net.bridge.bridge-nf-call-iptables = {value}: Service traffic between pods on one "
        "bridge skips iptables (sysctl -w net.bridge.bridge-nf-call-iptables=1)",
    )


def _threaded(fn: Callable[[Node], list[CheckResult]]) -> CheckFn:
    async def run(ctx: Context) -> list[CheckResult]:
        return await asyncio.to_thread(fn, ctx.node)

    return run


async def check_cgroups(ctx: Context) -> list[CheckResult]:
    return await asyncio.to_thread(_cgroups, ctx.settings, ctx.node)


CHECKS: tuple[Check, ...] = (
    Check("containerd", check_containerd),
    Check("runc", check_runc),
    Check("runtime shim", check_runc_shim),
    Check("criu", check_criu, critical=False),
    Check("user namespaces", check_user_namespaces, critical=False),
    Check("cni", check_cni),
    Check("cgroups", check_cgroups),
    Check("overlayfs", _threaded(_overlay)),
    Check("socket", check_socket),
    Check("state dir", check_state_dir),
    Check("netns", _threaded(_netns)),
    Check("ip_forward", _threaded(_ip_forward), critical=False),
    Check("br_netfilter", _threaded(_br_netfilter), critical=False),
)


async def _guarded(check: Check, ctx: Context) -> list[CheckResult]:
    """A check never raises: a crash or a hang becomes its own FAIL (or WARN) line."""
    outcome = Outcome.FAIL if check.critical else Outcome.WARN
    try:
        # The margin lets a check report its own, more precise timeout first.
        return await asyncio.wait_for(check.run(ctx), ctx.timeout + 1.0)
    except TimeoutError:
        return [CheckResult(outcome, check.name, f"no answer within {ctx.timeout:g}s")]
    except Exception as err:
        return [CheckResult(outcome, check.name, f"check failed: {type(err).__name__}: {err}")]


async def run_checks(
    settings: Settings,
    *,
    timeout: float = 5.0,
    node: Node | None = None,
    checks: Sequence[Check] = CHECKS,
) -> list[CheckResult]:
    """Every check, concurrently; results in the checks' declared order."""
    ctx = Context(settings, node or Node(), timeout)
    groups = await asyncio.gather(*(_guarded(check, ctx) for check in checks))
    return [result for group in groups for result in group]


def exit_code(results: Sequence[CheckResult]) -> int:
    return 1 if any(r.outcome is Outcome.FAIL for r in results) else 0


__all__ = [
    "CHECKS",
    "Check",
    "CheckResult",
    "Node",
    "Outcome",
    "exit_code",
    "run_checks",
]
