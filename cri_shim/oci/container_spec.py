"""OCI runtime spec of an application container (the pause container's sibling).

Built from the CRI ContainerConfig, the image config and the pod the way
containerd's CRI plugin builds it, so workloads cannot tell the runtimes
apart: the same process/env/user rules, the pod's namespaces joined through
the sandbox process, the pod's hostname/hosts/resolv.conf/shm files bind
mounted, the same capability, device, seccomp and AppArmor handling.

Choices where containerd has a knob or a host side effect:
- image VOLUMEs are not given anonymous volumes (containerd's default creates
  them): writes land in the container's rootfs, which is what a pod sees
  unless its rootfs is read-only;
- no rlimits are set (containerd strips the OCI defaults), so containers
  inherit the runtime's limits;
- masked/readonly paths are exactly what the CRI config lists (kubelet sends
  the defaults, or nothing for procMount: Unmasked), as containerd does;
- host paths are used as given unless `resolve_mount_source` is supplied
  (containerd creates missing ones and resolves symlinks; see
  `ensure_mount_source`); propagation is not checked against the host's mount
  table, which the shim may not share with runc.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from cri_shim.gen.runtime import v1 as cri
from cri_shim.host import CGROUP_ROOT, cgroup_v2_unified, clamp_oom_score_adj
from cri_shim.oci import apparmor
from cri_shim.oci import capabilities as caps
from cri_shim.oci.annotations import passthrough
from cri_shim.oci.defaults import (
    DEFAULT_CAPABILITIES,
    apply_userns,
    base_spec,
    cgroups_path,
    drop_namespace,
    set_namespace,
)
from cri_shim.oci.errors import SpecError
from cri_shim.oci.seccomp import profile_from_path, seccomp_for
from cri_shim.oci.userns import PodUserns, parse_userns, pod_userns_of
from cri_shim.oci.users import resolve_user

APPARMOR_DEFAULT_PROFILE = apparmor.DEFAULT_PROFILE  # containerd's name, loaded by oci.apparmor
LOCALHOST_PREFIX = "localhost/"
ETC_HOSTNAME = "/etc/hostname"
ETC_HOSTS = "/etc/hosts"
RESOLV_CONF = "/etc/resolv.conf"
DEV_SHM = "/dev/shm"
# Directories under /dev that hold no device nodes of the host's own (containerd's list).
SKIPPED_DEV_DIRS = frozenset({"pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"})
DEVICE_ACCESS = frozenset("rwm")

DeviceLookup = Callable[[str, str], list[dict[str, Any]]]


@dataclass(frozen=True)
class SandboxView:
    """What a container needs of its pod."""

    sandbox_id: str
    pid: int
    config: cri.PodSandboxConfig
    hostname_path: str
    hosts_path: str
    resolv_conf_path: str
    shm_path: str


def _device_from_path(path: str) -> dict[str, Any] | None:
    """An OCI linux.devices entry for a device node (not following symlinks)."""
    st = os.lstat(path)
    if stat.S_ISBLK(st.st_mode):
        kind = "b"
    elif stat.S_ISCHR(st.st_mode):
        kind = "c"
    elif stat.S_ISFIFO(st.st_mode):
        kind = "p"
    else:
        return None
    return {
        "path": path,
        "type": kind,
        "major": os.major(st.st_rdev),
        "minor": os.minor(st.st_rdev),
        "fileMode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
    }


def devices_from_path(host_path: str, container_path: str) -> list[dict[str, Any]]:
    """A device node, or every device below a directory (containerd's getDevices).

    `container_path` renames them inside the container; empty keeps host paths.
    """
    if not stat.S_ISDIR(os.stat(host_path).st_mode):
        device = _device_from_path(host_path)
        if device is None:
            raise SpecError(f"device host_path {host_path!r} is not a device node")
        if container_path:
            device["path"] = container_path
        return [device]
    found: list[dict[str, Any]] = []
    with os.scandir(host_path) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            inside = f"{container_path.rstrip('/')}/{entry.name}" if container_path else ""
            if entry.is_dir(follow_symlinks=False):
                if entry.name not in SKIPPED_DEV_DIRS:
                    found += devices_from_path(entry.path, inside)
                continue
            if entry.name == "console":
                continue
            try:
                device = _device_from_path(entry.path)
            except FileNotFoundError:
                continue
            if device is not None:
                if inside:
                    device["path"] = inside
                found.append(device)
    return found


def ensure_mount_source(path: str) -> str:
    """containerd's treatment of a host path: create it when missing, resolve symlinks.

    Blocking; for `ContainerSpecInput.resolve_mount_source` (run the build in a thread).
    """
    if not os.path.lexists(path):
        os.makedirs(path, mode=0o755, exist_ok=True)
    return os.path.realpath(path)


def parse_cpu_list(value: str) -> set[int]:
    """The kernel's list format of cpuset.cpus/mems ("0-3,8"); ValueError if malformed."""
    ids: set[int] = set()
    for part in value.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or not first.isascii():
            raise ValueError(f"{part!r} is not a number or a range")
        low, high = int(first), int(last) if dash else int(first)
        if high < low or high > 65535:
            raise ValueError(f"{part!r} is not a range")
        ids.update(range(low, high + 1))
    return ids


@lru_cache(maxsize=2)
def host_online(kind: str) -> frozenset[int]:
    """The host's online CPUs ("cpu") or memory nodes ("node"); node 0 alone when
    the kernel has no NUMA nodes directory."""
    try:
        text = Path(f"/sys/devices/system/{kind}/online").read_text().strip()
        return frozenset(parse_cpu_list(text))
    except (OSError, ValueError):
        return frozenset({0})


def _check_cpuset(value: str, what: str, kind: str) -> None:
    """runc writes cpuset.cpus/mems as given and fails the task with an opaque
    EINVAL; say what is wrong before that."""
    try:
        ids = parse_cpu_list(value)
    except ValueError as err:
        raise SpecError(f"resources.{what} {value!r}: {err} (expected a list like 0-3,8)") from err
    missing = sorted(ids - host_online(kind))
    if missing:
        raise SpecError(
            f"resources.{what} {value!r}: {kind} {missing[0]} is not online on this host"
        )


@lru_cache(maxsize=1)
def swap_controller_available(root: Path = CGROUP_ROOT) -> bool:
    """Whether memory+swap limits can be set (memsw on v1, memory.swap.max on v2)."""
    if not cgroup_v2_unified(root):
        return (root / "memory" / "memory.memsw.limit_in_bytes").exists()
    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return False
    for line in own:
        if line.startswith("0::"):
            return (root / line[3:].lstrip("/") / "memory.swap.max").exists()
    return False


@lru_cache(maxsize=1)
def hugetlb_controller_available(root: Path = CGROUP_ROOT) -> bool:
    """Whether hugepage limits can be set. runc fails every container that
    carries them when the hugetlb controller is missing (kubelet sends one,
    limit 0, per page size the node has), so they are left out then, as
    containerd's `tolerate_missing_hugetlb_controller` (on by default) does."""
    if not cgroup_v2_unified(root):
        return (root / "hugetlb").is_dir()
    try:
        return "hugetlb" in (root / "cgroup.controllers").read_text().split()
    except OSError:
        return False


@dataclass(frozen=True)
class ContainerSpecInput:
    container_id: str
    config: cri.ContainerConfig
    sandbox: SandboxView
    image_config: dict[str, Any]  # the OCI image config's "config" object
    image_name: str
    passwd: str | None  # the image rootfs's /etc/passwd text, None when absent
    group: str | None  # likewise /etc/group
    cgroup_driver: str  # "cgroupfs" | "systemd"
    oom_score_adj_floor: int | None  # see host.clamp_oom_score_adj
    seccomp_localhost_root: Path | None
    apparmor_available: bool
    recursive_readonly_supported: bool  # runc >= 1.1 and kernel >= 5.12: "rro"
    # pid of the container a TARGET pid namespace joins (ephemeral containers).
    target_pid: int | None = None
    # What "ALL" and privileged mean; None: this process's effective set.
    all_capabilities: tuple[str, ...] | None = None
    # None: detect from /sys/fs/cgroup.
    cgroup_v2: bool | None = None
    swap_available: bool | None = None
    hugetlb_available: bool | None = None
    # Finds device nodes: (host path, container path) -> linux.devices entries.
    device_lookup: DeviceLookup = field(default=devices_from_path)
    # Maps each bind mount's host path before use, e.g. ensure_mount_source.
    resolve_mount_source: Callable[[str], str] | None = None
    # HOSTNAME for pods without a hostname (hostNetwork); None: this node's name.
    node_hostname: str | None = None
    # containerd namespace: the cgroup parent when the pod names none, as containerd's.
    namespace: str = "k8s.io"
    # Patterns of pod / container annotation keys copied into the spec (the runtime
    # handler's pod_annotations / container_annotations, as in containerd).
    pod_annotations: tuple[str, ...] = ()
    container_annotations: tuple[str, ...] = ()


# ------------------------------------------------------------------ process


def _process_args(config: cri.ContainerConfig, image: dict[str, Any]) -> list[str]:
    """containerd/docker rules: a command replaces ENTRYPOINT and drops CMD; args replace CMD."""
    command = list(config.command)
    args = list(config.args)
    if not command:
        if not args:
            args = list(image.get("Cmd") or [])
        entrypoint = list(image.get("Entrypoint") or [])
        if entrypoint != [""]:
            command = entrypoint
    argv = command + args
    if not argv:
        raise SpecError(
            "no command specified: set command or args, or use an image with ENTRYPOINT/CMD"
        )
    if any("\x00" in arg for arg in argv):
        # execve takes C strings: runc would fail the start, not the create.
        raise SpecError("command and args must not contain a NUL byte")
    return argv


def merge_env(base: list[str], overrides: Iterable[str]) -> list[str]:
    """Override by key in place, append new keys; "KEY" without '=' unsets (containerd)."""
    result: list[str | None] = list(base)
    index = {entry.partition("=")[0]: i for i, entry in enumerate(base)}
    for entry in overrides:
        key, sep, _ = entry.partition("=")
        if not sep:
            if key in index:
                result[index[key]] = None
            continue
        if key in index:
            result[index[key]] = entry
        else:
            index[key] = len(result)
            result.append(entry)
    return [e for e in result if e is not None]


def _environment(inputs: ContainerSpecInput, default_path: str) -> list[str]:
    hostname = inputs.sandbox.config.hostname or inputs.node_hostname or socket.gethostname()
    env = merge_env([default_path], [f"HOSTNAME={hostname}"])
    config_env: list[str] = []
    for kv in inputs.config.envs:
        if not kv.key or "=" in kv.key or "\x00" in kv.key:
            raise SpecError(f"invalid environment variable name {kv.key!r}")
        if b"\x00" in kv.value:
            # A C string in the process's environment: runc refuses it at start.
            raise SpecError(f"environment variable {kv.key!r}: its value contains a NUL byte")
        # Wire type is bytes (any octets); JSON needs text, like Go's marshaller.
        config_env.append(f"{kv.key}={kv.value.decode('utf-8', errors='replace')}")
    image_env = [str(e) for e in inputs.image_config.get("Env") or []]
    return merge_env(env, image_env + config_env)


# ---------------------------------------------------------------- namespaces


def _mode(options: cri.NamespaceOption | None, name: str) -> cri.NamespaceMode:
    if options is None:
        return cri.NamespaceMode.POD
    return cri.NamespaceMode(getattr(options, name))


def _namespaces(
    spec: dict[str, Any],
    inputs: ContainerSpecInput,
    context: cri.LinuxContainerSecurityContext,
    pod_options: cri.NamespaceOption | None,
    privileged: bool,
) -> None:
    sandbox = inputs.sandbox

    def path_of(pid: int, kind: str, whose: str) -> str:
        if pid <= 0:
            raise SpecError(f"{whose} has no running process whose {kind} namespace to join")
        return f"/proc/{pid}/ns/{kind}"

    pod = f"sandbox {sandbox.sandbox_id}"
    if _mode(pod_options, "network") is cri.NamespaceMode.NODE:
        drop_namespace(spec, "network")
        drop_namespace(spec, "uts")
    else:
        set_namespace(spec, "network", path_of(sandbox.pid, "net", pod))
        set_namespace(spec, "uts", path_of(sandbox.pid, "uts", pod))
    if _mode(pod_options, "ipc") is cri.NamespaceMode.NODE:
        drop_namespace(spec, "ipc")
    else:
        set_namespace(spec, "ipc", path_of(sandbox.pid, "ipc", pod))

    options = context.namespace_options
    pid_mode = _mode(options, "pid")
    if pid_mode is cri.NamespaceMode.POD:
        set_namespace(spec, "pid", path_of(sandbox.pid, "pid", pod))
    elif pid_mode is cri.NamespaceMode.CONTAINER:
        set_namespace(spec, "pid", None)
    elif pid_mode is cri.NamespaceMode.NODE:
        drop_namespace(spec, "pid")
    elif pid_mode is cri.NamespaceMode.TARGET:
        target = options.target_id if options is not None else ""
        if inputs.target_pid is None:
            raise SpecError(
                f"pid namespace mode TARGET needs the running target container {target!r}"
            )
        set_namespace(spec, "pid", path_of(inputs.target_pid, "pid", f"container {target!r}"))
    else:
        raise SpecError(f"unknown pid namespace mode {int(pid_mode)}")

    userns = parse_userns(options.userns_options if options is not None else None)
    pod_userns = parse_userns(pod_options.userns_options if pod_options is not None else None)
    if userns != pod_userns:
        raise SpecError(
            "the container's user namespace options differ from its pod's "
            f"(pod: {_describe(pod_userns)}, container: {_describe(userns)}); "
            "a container shares its pod's user namespace"
        )
    apply_userns(
        spec,
        userns,
        path_of(sandbox.pid, "user", pod) if userns is not None else "",
        _mode(pod_options, "network") is cri.NamespaceMode.NODE,
    )
    set_namespace(spec, "mount", None)
    cgroup_v2 = inputs.cgroup_v2 if inputs.cgroup_v2 is not None else cgroup_v2_unified()
    if cgroup_v2 and not privileged:
        # Hides the host's cgroup tree; v1 and privileged keep it, as in containerd.
        set_namespace(spec, "cgroup", None)


def _describe(userns: PodUserns | None) -> str:
    if userns is None:
        return "the node's"
    return f"uids {userns.uids.label()}, gids {userns.gids.label()}"


# -------------------------------------------------------------------- mounts


def clean_path(path: str) -> str:
    """Lexical clean of an absolute path (Go's filepath.Clean without '..')."""
    return "/" + "/".join(p for p in path.split("/") if p not in ("", "."))


def _check_path(path: str, what: str) -> None:
    if not path:
        raise SpecError(f"{what} must not be empty")
    if not path.startswith("/"):
        raise SpecError(f"{what} {path!r} must be an absolute path")
    if ".." in path.split("/"):
        raise SpecError(f"{what} {path!r} must not contain '..'")
    if "\x00" in path:
        raise SpecError(f"{what} {path!r} must not contain a NUL byte")


def _validate_cri_mount(mount: cri.Mount, userns: bool) -> None:
    if mount.image is not None and mount.image.image and not mount.host_path:
        # container/image_volumes.py mounts the image and sets host_path first.
        raise SpecError(f"image volume mount at {mount.container_path!r} was not prepared")
    _check_path(mount.container_path, "mount container_path")
    _check_path(mount.host_path, f"host_path of the mount at {mount.container_path!r}")
    if (mount.uid_mappings or mount.gid_mappings) and not userns:
        raise SpecError(
            f"id-mapped mount at {mount.container_path!r} needs a pod user namespace "
            "(userns_options mode POD)"
        )
    for kind, mappings in (("uid", mount.uid_mappings), ("gid", mount.gid_mappings)):
        for line in mappings:
            if line.length < 1:
                raise SpecError(
                    f"{kind}_mappings of the mount at {mount.container_path!r}: "
                    f"length must be at least 1, got {line.length}"
                )


def _id_mappings(mappings: list[cri.IdMapping]) -> list[dict[str, int]]:
    return [
        {"containerID": m.container_id, "hostID": m.host_id, "size": m.length} for m in mappings
    ]


def _bind_options(mount: cri.Mount, rro_supported: bool, linux: dict[str, Any]) -> list[str]:
    options = ["rbind"]
    propagation = cri.MountPropagation(mount.propagation)
    host = mount.host_path
    if propagation is cri.MountPropagation.PROPAGATION_PRIVATE:
        options.append("rprivate")
    elif propagation is cri.MountPropagation.PROPAGATION_BIDIRECTIONAL:
        options.append("rshared")
        linux["rootfsPropagation"] = "rshared"
    elif propagation is cri.MountPropagation.PROPAGATION_HOST_TO_CONTAINER:
        options.append("rslave")
        if linux.get("rootfsPropagation") != "rshared":
            linux["rootfsPropagation"] = "rslave"
    else:
        raise SpecError(f"unknown mount propagation {int(propagation)} (hostPath={host!r})")
    if mount.readonly:
        if mount.recursive_read_only:
            if not rro_supported:
                raise SpecError(
                    "RRO is not supported: runtime handler does not support recursive "
                    f"read-only mounts (hostPath={host!r})"
                )
            if propagation is not cri.MountPropagation.PROPAGATION_PRIVATE:
                raise SpecError(
                    "recursive read-only mount needs private propagation, "
                    f"got {propagation.name!r} (hostPath={host!r})"
                )
            options.append("rro")
        else:
            options.append("ro")
    else:
        if mount.recursive_read_only:
            raise SpecError(
                f"recursive read-only mount conflicts with RW mount (hostPath={host!r}); "
                "set readonly too"
            )
        options.append("rw")
    return options


def _mounts(
    spec: dict[str, Any],
    inputs: ContainerSpecInput,
    context: cri.LinuxContainerSecurityContext,
    host_ipc: bool,
) -> None:
    config = inputs.config
    userns = pod_userns_of(config) is not None
    for mount in config.mounts:
        _validate_cri_mount(mount, userns)
    wanted = {clean_path(m.container_path) for m in config.mounts}
    sandbox = inputs.sandbox
    readonly = context.readonly_rootfs
    extra: list[cri.Mount] = []
    for destination, source in (
        (ETC_HOSTNAME, sandbox.hostname_path),
        (ETC_HOSTS, sandbox.hosts_path),
        (RESOLV_CONF, sandbox.resolv_conf_path),
    ):
        if source and destination not in wanted:
            extra.append(cri.Mount(container_path=destination, host_path=source, readonly=readonly))
    shm = "/dev/shm" if host_ipc else sandbox.shm_path
    if shm and DEV_SHM not in wanted:
        extra.append(cri.Mount(container_path=DEV_SHM, host_path=shm))
    # Parents before children (stable, by depth), like containerd and docker.
    mounts = sorted([*config.mounts, *extra], key=lambda m: clean_path(m.container_path).count("/"))

    destinations = {clean_path(m.container_path) for m in mounts}
    dev_replaced = "/dev" in destinations
    spec["mounts"] = [
        m
        for m in spec["mounts"]
        if clean_path(m["destination"]) not in destinations
        and not (dev_replaced and clean_path(m["destination"]).startswith("/dev/"))
    ]
    for mount in mounts:
        source = mount.host_path
        if inputs.resolve_mount_source is not None:
            try:
                source = inputs.resolve_mount_source(source)
            except OSError as err:
                raise SpecError(f"mount source {source!r}: {err.strerror or err}") from err
        entry: dict[str, Any] = {
            "destination": mount.container_path,
            "type": "bind",
            "source": source,
            "options": _bind_options(mount, inputs.recursive_readonly_supported, spec["linux"]),
        }
        # Id-mapped bind mounts (kubelet maps volumes of user-namespaced pods), as containerd.
        if mount.uid_mappings:
            entry["uidMappings"] = _id_mappings(mount.uid_mappings)
        if mount.gid_mappings:
            entry["gidMappings"] = _id_mappings(mount.gid_mappings)
        spec["mounts"].append(entry)


# ------------------------------------------------------------------- devices


def _devices(spec: dict[str, Any], inputs: ContainerSpecInput, privileged: bool) -> None:
    config = inputs.config
    requested = list(config.devices)
    host_dev = any(m.container_path == "/dev" and m.host_path == "/dev" for m in config.mounts)
    if config.tty and host_dev and not any(d.container_path == "/dev/console" for d in requested):
        # A tty container with the host's /dev needs the console node (containerd).
        requested.append(
            cri.Device(host_path="/dev/console", container_path="/dev/console", permissions="rwm")
        )
    linux = spec["linux"]
    devices: list[dict[str, Any]] = []
    rules: list[dict[str, Any]] = linux["resources"]["devices"]
    for device in requested:
        _check_path(device.host_path, "device host_path")
        if device.container_path:
            _check_path(device.container_path, f"container_path of device {device.host_path!r}")
        access = device.permissions or "rwm"
        if not set(access) <= DEVICE_ACCESS:
            raise SpecError(
                f"device {device.host_path!r} permissions {device.permissions!r}: "
                "use letters from r, w, m"
            )
        try:
            found = inputs.device_lookup(os.path.realpath(device.host_path), device.container_path)
        except OSError as err:
            raise SpecError(f"device {device.host_path!r}: {err.strerror or err}") from err
        for dev in found:
            devices.append(dev)
            rules.append(
                {
                    "allow": True,
                    "type": dev["type"],
                    "major": dev["major"],
                    "minor": dev["minor"],
                    "access": access,
                }
            )
    if privileged:
        try:
            host = inputs.device_lookup("/dev", "")
        except OSError as err:
            raise SpecError(f"listing host devices: {err.strerror or err}") from err
        taken = {d["path"] for d in devices}
        devices += [d for d in host if d["path"] not in taken]
        linux["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
    if devices:
        linux["devices"] = devices


# -------------------------------------------------------------- capabilities


def _named(names: Iterable[str]) -> tuple[bool, list[str]]:
    """(ALL present, the other names normalized)."""
    everything = False
    out: list[str] = []
    for name in names:
        if name.strip().upper() == "ALL":
            everything = True
        else:
            out.append(caps.normalize(name))
    return everything, out


def _capabilities(
    spec: dict[str, Any],
    context: cri.LinuxContainerSecurityContext,
    privileged: bool,
    available: tuple[str, ...],
) -> list[str]:
    """Fill process.capabilities; returns the bounding set (seccomp depends on it)."""
    current = list(DEFAULT_CAPABILITIES)
    ambient: list[str] = []
    requested = context.capabilities
    if requested is not None:
        add_all, added = _named(requested.add_capabilities)
        drop_all, dropped = _named(requested.drop_capabilities)
        ambient_all, ambient = _named(requested.add_ambient_capabilities)
        if add_all:
            current = list(available)
        if drop_all:
            current = []
        current = caps.dedupe([*current, *added])
        current = [c for c in current if c not in set(dropped)]
        if ambient_all:
            ambient = caps.dedupe([*available, *ambient])
        current = caps.dedupe([*current, *ambient])
    if privileged:
        current = caps.dedupe([*available, *ambient])
    sets: dict[str, list[str]] = {
        "bounding": list(current),
        "effective": list(current),
        "permitted": list(current),
    }
    if ambient:
        # Ambient capabilities must also be inheritable to survive execve.
        sets["inheritable"] = list(ambient)
        sets["ambient"] = list(ambient)
    spec["process"]["capabilities"] = sets
    return current


# -------------------------------------------------------------------- LSMs


def _apparmor(
    context: cri.LinuxContainerSecurityContext, privileged: bool, available: bool
) -> str | None:
    profile = context.apparmor
    if profile is None:
        profile = profile_from_path(context.apparmor_profile, "apparmor")
    kind = cri.SecurityProfileProfileType(profile.profile_type) if profile is not None else None
    if not available:
        if kind is not None and kind is not cri.SecurityProfileProfileType.Unconfined:
            raise SpecError(
                "apparmor is not supported: this host has no AppArmor, "
                "so only an Unconfined apparmor profile can be honoured"
            )
        return None
    if profile is None or kind is None:
        return None if privileged else APPARMOR_DEFAULT_PROFILE
    if kind is not cri.SecurityProfileProfileType.Localhost and profile.localhost_ref:
        raise SpecError("apparmor localhost_ref must only be set when profile_type is Localhost")
    if kind is cri.SecurityProfileProfileType.Unconfined:
        return None
    if kind is cri.SecurityProfileProfileType.RuntimeDefault:
        return None if privileged else APPARMOR_DEFAULT_PROFILE
    if kind is cri.SecurityProfileProfileType.Localhost:
        name = profile.localhost_ref.removeprefix(LOCALHOST_PREFIX)
        if not name:
            raise SpecError("apparmor profile_type Localhost needs localhost_ref (a profile name)")
        return name
    raise SpecError(f"unsupported apparmor profile type {int(kind)}")


# ------------------------------------------------------------------ resources


def apply_linux_resources(
    spec: dict[str, Any],
    res: cri.LinuxContainerResources,
    *,
    swap_available: bool | None = None,
    hugetlb_available: bool | None = None,
    cgroup_v2: bool | None = None,
) -> None:
    """Merge CRI resources into linux.resources the way containerd's WithResources
    does: only the fields set are written, so an update keeps what it leaves out.

    Shared by CreateContainer and UpdateContainerResources; oom_score_adj is not
    a cgroup setting and stays with the caller (containerd never updates it).
    """
    for name in ("cpu_period", "cpu_shares"):
        if getattr(res, name) < 0:
            raise SpecError(f"resources.{name} must not be negative")
    cpu: dict[str, Any] = {}
    if res.cpu_period:
        cpu["period"] = res.cpu_period
    if res.cpu_quota:
        cpu["quota"] = res.cpu_quota
    if res.cpu_shares:
        cpu["shares"] = res.cpu_shares
    if res.cpuset_cpus:
        _check_cpuset(res.cpuset_cpus, "cpuset_cpus", "cpu")
        cpu["cpus"] = res.cpuset_cpus
    if res.cpuset_mems:
        _check_cpuset(res.cpuset_mems, "cpuset_mems", "node")
        cpu["mems"] = res.cpuset_mems
    swap_ok = swap_available if swap_available is not None else swap_controller_available()
    memory: dict[str, Any] = {}
    if res.memory_limit_in_bytes:
        memory["limit"] = res.memory_limit_in_bytes
        if not res.memory_swap_limit_in_bytes and swap_ok:
            # No swap beyond the memory limit unless swap is asked for.
            memory["swap"] = res.memory_limit_in_bytes
    if res.memory_swap_limit_in_bytes and swap_ok:
        memory["swap"] = res.memory_swap_limit_in_bytes
    resources = spec["linux"].setdefault("resources", {})
    if cpu:
        resources.setdefault("cpu", {}).update(cpu)
    if memory:
        resources.setdefault("memory", {}).update(memory)
    hugetlb_ok = (
        hugetlb_available if hugetlb_available is not None else hugetlb_controller_available()
    )
    if res.hugepage_limits and hugetlb_ok:
        limits = {entry["pageSize"]: entry for entry in resources.get("hugepageLimits", [])}
        for limit in res.hugepage_limits:
            if not limit.page_size:
                raise SpecError("hugepage_limits entries need a page_size such as 2MB")
            limits[limit.page_size] = {"pageSize": limit.page_size, "limit": limit.limit}
        resources["hugepageLimits"] = list(limits.values())
    if res.unified:
        if not (cgroup_v2 if cgroup_v2 is not None else cgroup_v2_unified()):
            # runc refuses them at start ("cannot use unified on cgroup v1"), as UNKNOWN.
            raise SpecError(
                "resources.unified sets cgroup v2 files; this host's /sys/fs/cgroup is cgroup v1"
            )
        resources.setdefault("unified", {}).update(res.unified)


def resources_from_spec(spec: dict[str, Any]) -> cri.LinuxContainerResources:
    """What ContainerStatus.resources reports: read back from the spec, as
    containerd does, so it shows what the cgroup was really given."""
    out = cri.LinuxContainerResources()
    process = spec.get("process") or {}
    if "oomScoreAdj" in process:
        out.oom_score_adj = int(process["oomScoreAdj"])
    resources = (spec.get("linux") or {}).get("resources") or {}
    cpu = resources.get("cpu") or {}
    out.cpu_period = int(cpu.get("period", 0))
    out.cpu_quota = int(cpu.get("quota", 0))
    out.cpu_shares = int(cpu.get("shares", 0))
    out.cpuset_cpus = str(cpu.get("cpus", ""))
    out.cpuset_mems = str(cpu.get("mems", ""))
    memory = resources.get("memory") or {}
    out.memory_limit_in_bytes = int(memory.get("limit", 0))
    out.memory_swap_limit_in_bytes = int(memory.get("swap", 0))
    out.hugepage_limits = [
        cri.HugepageLimit(page_size=str(h["pageSize"]), limit=int(h.get("limit", 0)))
        for h in resources.get("hugepageLimits") or []
    ]
    out.unified = {str(k): str(v) for k, v in (resources.get("unified") or {}).items()}
    return out


def _resources(spec: dict[str, Any], inputs: ContainerSpecInput) -> None:
    linux_config = inputs.config.linux
    res = linux_config.resources if linux_config is not None else None
    if res is None:
        return
    apply_linux_resources(
        spec,
        res,
        swap_available=inputs.swap_available,
        hugetlb_available=inputs.hugetlb_available,
        cgroup_v2=inputs.cgroup_v2,
    )
    spec["process"]["oomScoreAdj"] = clamp_oom_score_adj(
        res.oom_score_adj, inputs.oom_score_adj_floor
    )


# ---------------------------------------------------------------------- build


def _writable(spec: dict[str, Any], mount_type: str) -> None:
    for mount in spec["mounts"]:
        if mount.get("type") == mount_type:
            mount["options"] = ["rw" if o == "ro" else o for o in mount["options"]]


def build_container_spec(inputs: ContainerSpecInput) -> dict[str, Any]:
    """The container's config.json; SpecError when the CRI config cannot be honoured."""
    config = inputs.config
    linux_config = config.linux or cri.LinuxContainerConfig()
    context = linux_config.security_context or cri.LinuxContainerSecurityContext()
    pod_linux = inputs.sandbox.config.linux or cri.LinuxPodSandboxConfig()
    pod_context = pod_linux.security_context or cri.LinuxSandboxSecurityContext()
    pod_options = pod_context.namespace_options
    privileged = context.privileged
    if privileged and not pod_context.privileged:
        raise SpecError(
            "no privileged container allowed in sandbox: the pod's security context "
            "must be privileged too"
        )

    spec = base_spec()
    process = spec["process"]
    process["args"] = _process_args(config, inputs.image_config)
    process["env"] = _environment(inputs, process["env"][0])
    cwd = config.working_dir or str(inputs.image_config.get("WorkingDir") or "") or "/"
    if not cwd.startswith("/") or "\x00" in cwd:
        raise SpecError(f"working directory {cwd!r} must be an absolute path without NUL bytes")
    process["cwd"] = cwd
    if config.tty:
        process["terminal"] = True
    user = resolve_user(
        image_user=str(inputs.image_config.get("User") or ""),
        context=context,
        passwd=inputs.passwd,
        group=inputs.group,
    )
    process["user"] = {
        "uid": user.uid,
        "gid": user.gid,
        "additionalGids": list(user.additional_gids),
    }
    process["noNewPrivileges"] = context.no_new_privs
    spec["root"]["readonly"] = context.readonly_rootfs

    _namespaces(spec, inputs, context, pod_options, privileged)
    host_ipc = _mode(pod_options, "ipc") is cri.NamespaceMode.NODE
    _mounts(spec, inputs, context, host_ipc)

    linux = spec["linux"]
    linux.pop("maskedPaths", None)
    linux.pop("readonlyPaths", None)
    if not privileged:
        if context.masked_paths:
            linux["maskedPaths"] = list(context.masked_paths)
        if context.readonly_paths:
            linux["readonlyPaths"] = list(context.readonly_paths)
    _devices(spec, inputs, privileged)
    available = (
        inputs.all_capabilities
        if inputs.all_capabilities is not None
        else caps.current_capabilities()
    )
    bounding = _capabilities(spec, context, privileged, available)
    if privileged:
        _writable(spec, "sysfs")
        _writable(spec, "cgroup")

    _resources(spec, inputs)
    linux["cgroupsPath"] = cgroups_path(
        inputs.cgroup_driver, pod_linux.cgroup_parent, inputs.namespace, inputs.container_id
    )

    apparmor = _apparmor(context, privileged, inputs.apparmor_available)
    if apparmor is not None:
        process["apparmorProfile"] = apparmor
    seccomp = seccomp_for(
        context.seccomp,
        context.seccomp_profile_path,
        privileged=privileged,
        localhost_root=inputs.seccomp_localhost_root,
        capabilities=bounding,
    )
    if seccomp is not None:
        linux["seccomp"] = seccomp

    pod_metadata = inputs.sandbox.config.metadata or cri.PodSandboxMetadata()
    metadata = config.metadata or cri.ContainerMetadata()
    spec["annotations"] = {
        **passthrough(inputs.sandbox.config.annotations, inputs.pod_annotations),
        **passthrough(config.annotations, inputs.container_annotations),
        # Ours last: a config annotation cannot pass for the runtime's own.
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": metadata.name,
        "io.kubernetes.cri.sandbox-id": inputs.sandbox.sandbox_id,
        "io.kubernetes.cri.sandbox-name": pod_metadata.name,
        "io.kubernetes.cri.sandbox-namespace": pod_metadata.namespace,
        "io.kubernetes.cri.sandbox-uid": pod_metadata.uid,
        "io.kubernetes.cri.image-name": inputs.image_name,
    }
    return spec
