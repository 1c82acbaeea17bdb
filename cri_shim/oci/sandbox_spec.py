"""OCI spec of a pod's infra (pause) container.

The pause process holds the pod's namespaces; everything here follows what
containerd's CRI plugin builds for it so that pods behave the same: read-only
rootfs, no new privileges, the pod's sysctls, oom_score_adj -998 (clamped
where the host does not allow lowering it), cpu shares 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cri_shim.gen.runtime import v1 as cri
from cri_shim.host import clamp_oom_score_adj
from cri_shim.oci.annotations import passthrough
from cri_shim.oci.defaults import (
    SYS_BIND_MOUNT,
    apply_userns,
    base_spec,
    cgroups_path,
    drop_namespace,
    replace_mount,
    set_namespace,
)
from cri_shim.oci.errors import SpecError
from cri_shim.oci.userns import PodUserns

# SpecError moved to oci.errors; re-exported for existing importers.
__all__ = ["SandboxSpecInput", "SpecError", "build_sandbox_spec"]

SANDBOX_OOM_SCORE_ADJ = -998
SANDBOX_CPU_SHARES = 2
# Sysctls that act on the network namespace; meaningless (and dangerous) with hostNetwork.
NETWORK_SYSCTL_PREFIX = "net."
# containerd 2.x's enable_unprivileged_ports / enable_unprivileged_icmp (on by default):
# any user in a pod may bind low ports and open ICMP echo sockets, unless the pod says.
UNPRIVILEGED_PORTS_SYSCTL = ("net.ipv4.ip_unprivileged_port_start", "0")
UNPRIVILEGED_ICMP_SYSCTL = ("net.ipv4.ping_group_range", "0 2147483647")


@dataclass(frozen=True)
class SandboxSpecInput:
    sandbox_id: str
    config: cri.PodSandboxConfig
    image_config: dict[str, Any]
    netns_path: str
    shm_path: str
    hostname: str
    cgroup_driver: str
    oom_score_adj_floor: int | None
    # Patterns of pod annotation keys copied into the spec (the handler's pod_annotations).
    pod_annotations: tuple[str, ...] = ()
    # The pod's own user namespace (mode POD), pinned at userns_path ("" with
    # hostNetwork: runc makes it and the containers join the pause process's).
    userns: PodUserns | None = None
    userns_path: str = ""
    # containerd namespace: the cgroup parent when the pod names none, as containerd's.
    namespace: str = "k8s.io"
    # The configured sandbox (pause) image's name, for containerd's image-name annotation.
    image_name: str = ""
    # The pod's resolv.conf, bound read-only ("" in unit tests: no mount).
    resolv_conf_path: str = ""
    # cri-shim itself runs in a user namespace: no ping_group_range (as containerd).
    host_in_userns: bool = False


def _namespace_mode(options: cri.NamespaceOption | None, field: str) -> cri.NamespaceMode:
    if options is None:
        return cri.NamespaceMode.POD
    return cri.NamespaceMode(getattr(options, field))


def _process_args(image_config: dict[str, Any]) -> list[str]:
    args = list(image_config.get("Entrypoint") or []) + list(image_config.get("Cmd") or [])
    if not args:
        raise SpecError("sandbox image has neither entrypoint nor cmd")
    return args


def _user(
    spec: dict[str, Any], context: cri.LinuxSandboxSecurityContext | None, image_user: str
) -> None:
    user = spec["process"]["user"]
    if context is not None and context.run_as_user is not None:
        user["uid"] = context.run_as_user.value
    elif image_user:
        uid, _, gid = image_user.partition(":")
        if uid.isdigit():
            user["uid"] = int(uid)
        if gid.isdigit():
            user["gid"] = int(gid)
    if context is not None and context.run_as_group is not None:
        user["gid"] = context.run_as_group.value
    groups = list(context.supplemental_groups) if context is not None else []
    # containerd 2.x's WithUser lists the primary gid first whenever a user is set
    # (it also drops the pod's supplemental groups there; cri-shim keeps them).
    if image_user or (context is not None and context.run_as_user is not None):
        groups = [user["gid"]] + [g for g in groups if g != user["gid"]]
    if groups:
        user["additionalGids"] = groups


def build_sandbox_spec(inputs: SandboxSpecInput) -> dict[str, Any]:
    config = inputs.config
    linux = config.linux or cri.LinuxPodSandboxConfig()
    context = linux.security_context
    options = context.namespace_options if context is not None else None
    spec = base_spec()
    # containerd's default mounts have no cgroupfs: only containers get one.
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] != "/sys/fs/cgroup"]
    process = spec["process"]
    process["args"] = _process_args(inputs.image_config)
    process["env"] = list(inputs.image_config.get("Env") or [process["env"][0]])
    process["cwd"] = inputs.image_config.get("WorkingDir") or "/"
    process["noNewPrivileges"] = True
    process["oomScoreAdj"] = clamp_oom_score_adj(SANDBOX_OOM_SCORE_ADJ, inputs.oom_score_adj_floor)
    _user(spec, context, str(inputs.image_config.get("User") or ""))
    spec["root"]["readonly"] = True
    spec["hostname"] = inputs.hostname

    host_network = _namespace_mode(options, "network") is cri.NamespaceMode.NODE
    if host_network:
        drop_namespace(spec, "network")
        drop_namespace(spec, "uts")
        # A requested hostname stays: runc refuses it without a private UTS namespace,
        # which is how containerd's CRI fails such a pod too.
        if not inputs.hostname:
            spec.pop("hostname", None)
    else:
        set_namespace(spec, "network", inputs.netns_path)
    apply_userns(spec, inputs.userns, inputs.userns_path, host_network)
    if _namespace_mode(options, "pid") is cri.NamespaceMode.NODE:
        drop_namespace(spec, "pid")
    host_ipc = _namespace_mode(options, "ipc") is cri.NamespaceMode.NODE
    if host_ipc:
        drop_namespace(spec, "ipc")
    # Read-only as in containerd: the pause process writes neither (containers bind
    # the same files themselves); resolv.conf is there for VM runtimes (kata).
    replace_mount(
        spec,
        {
            "destination": "/dev/shm",
            "type": "bind",
            "source": "/dev/shm" if host_ipc else inputs.shm_path,
            "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
        },
    )
    if inputs.resolv_conf_path:
        replace_mount(
            spec,
            {
                "destination": "/etc/resolv.conf",
                "type": "bind",
                "source": inputs.resolv_conf_path,
                "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
            },
        )
    if host_network and inputs.userns is not None:
        replace_mount(spec, dict(SYS_BIND_MOUNT))  # the host's /sys last, as containerd's

    sysctls = dict(linux.sysctls)
    if host_network:
        bad = sorted(k for k in sysctls if k.startswith(NETWORK_SYSCTL_PREFIX))
        if bad:
            raise SpecError(f"sysctls {', '.join(bad)} cannot be set on a hostNetwork pod")
    else:
        sysctls.setdefault(*UNPRIVILEGED_PORTS_SYSCTL)
        # The range names gids of this namespace: meaningless across a user namespace.
        if inputs.userns is None and not inputs.host_in_userns:
            sysctls.setdefault(*UNPRIVILEGED_ICMP_SYSCTL)
    if host_ipc:
        bad = sorted(
            k
            for k in sysctls
            if k.startswith(("kernel.shm", "kernel.msg", "kernel.sem", "fs.mqueue."))
        )
        if bad:
            raise SpecError(f"sysctls {', '.join(bad)} cannot be set on a hostIPC pod")
    if sysctls:
        spec["linux"]["sysctl"] = sysctls

    if context is not None and context.privileged:
        spec["linux"].pop("maskedPaths", None)
        spec["linux"].pop("readonlyPaths", None)
        # sysfs has one superblock per network namespace: a read-only mount by the
        # pause process would make every privileged container's /sys read-only too
        # (containerd 2.x mounts it rw here for the same reason).
        for mount in spec["mounts"]:
            if mount["destination"] == "/sys":
                mount["options"] = ["rw" if o == "ro" else o for o in mount["options"]]
    spec["linux"]["cgroupsPath"] = cgroups_path(
        inputs.cgroup_driver, linux.cgroup_parent, inputs.namespace, inputs.sandbox_id
    )
    spec["linux"]["resources"]["cpu"] = {"shares": SANDBOX_CPU_SHARES}
    metadata = config.metadata or cri.PodSandboxMetadata()
    spec["annotations"] = {
        # Allowed pod annotations first: the runtime's own keys below always win.
        **passthrough(config.annotations, inputs.pod_annotations),
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-id": inputs.sandbox_id,
        "io.kubernetes.cri.sandbox-name": metadata.name,
        "io.kubernetes.cri.sandbox-namespace": metadata.namespace,
        "io.kubernetes.cri.sandbox-uid": metadata.uid,
        "io.kubernetes.cri.sandbox-log-directory": config.log_directory,
        "io.kubernetes.cri.podsandbox.image-name": inputs.image_name,
    }
    return spec
