"""User namespaces of pods (`NamespaceOption.userns_options`).

Mode POD gives the pod a user namespace of its own with one uid and one gid
mapping (kubelet's `hostUsers: false`); NODE, or no options, keeps the node's.
The rules are containerd 2.x's (`parseUsernsIDs`): exactly one mapping line per
kind, mappings only with POD, CONTAINER and TARGET refused; container id 0 must
be mapped (its rootfs is remapped from id 0, as containerd's `RootPair` needs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cri_shim.gen.runtime import v1 as cri
from cri_shim.oci.errors import SpecError

# uid_t is 32 bits; (uid_t)-1 is never a valid id.
MAX_ID = (1 << 32) - 1
FIELD = "linux.security_context.namespace_options.userns_options"


@dataclass(frozen=True)
class IdMapping:
    container_id: int
    host_id: int
    size: int

    def oci(self) -> dict[str, int]:
        return {"containerID": self.container_id, "hostID": self.host_id, "size": self.size}

    def label(self) -> str:
        """containerd's snapshot label / idmap option form: `ctr:host:size`."""
        return f"{self.container_id}:{self.host_id}:{self.size}"

    def to_host(self, container_id: int) -> int:
        """The host id of `container_id`; outside the mapping, the id itself
        (the kernel's overflow id would be wrong for file ownership)."""
        if self.container_id <= container_id < self.container_id + self.size:
            return self.host_id + container_id - self.container_id
        return container_id


@dataclass(frozen=True)
class PodUserns:
    """A pod's own user namespace: its one uid and one gid mapping."""

    uids: IdMapping
    gids: IdMapping

    def oci_mappings(self) -> dict[str, list[dict[str, int]]]:
        return {"uidMappings": [self.uids.oci()], "gidMappings": [self.gids.oci()]}

    def to_record(self) -> dict[str, Any]:
        return {"uids": self.uids.oci(), "gids": self.gids.oci()}


def _mapping(mappings: list[cri.IdMapping], kind: str, field: str) -> IdMapping | None:
    if not mappings:
        return None
    if len(mappings) > 1:
        raise SpecError(
            f"{field}.{kind}: only one mapping line is supported, got {len(mappings)} "
            "(map one contiguous range starting at container id 0)"
        )
    line = mappings[0]
    if line.length < 1:
        raise SpecError(f"{field}.{kind}[0].length must be at least 1, got {line.length}")
    if line.container_id != 0:
        raise SpecError(
            f"{field}.{kind}[0].container_id is {line.container_id}: container id 0 must be "
            "mapped (the mapping must start at container id 0)"
        )
    if line.host_id + line.length - 1 > MAX_ID - 1:
        raise SpecError(
            f"{field}.{kind}[0]: host ids {line.host_id}..{line.host_id + line.length - 1} "
            f"exceed the largest id {MAX_ID - 1}"
        )
    return IdMapping(line.container_id, line.host_id, line.length)


def parse_userns(options: cri.UserNamespace | None, field: str = FIELD) -> PodUserns | None:
    """The pod's user namespace, or None for the node's. SpecError (INVALID_ARGUMENT)
    says what to change when the options cannot be honoured."""
    if options is None:
        return None
    uids = _mapping(list(options.uids), "uids", field)
    gids = _mapping(list(options.gids), "gids", field)
    mode = cri.NamespaceMode(options.mode)
    if mode is cri.NamespaceMode.NODE:
        if uids is not None or gids is not None:
            raise SpecError(
                f"{field}: mode NODE takes no mappings, got {len(options.uids)} uid and "
                f"{len(options.gids)} gid mappings (use mode POD for a pod user namespace)"
            )
        return None
    if mode is cri.NamespaceMode.POD:
        if uids is None or gids is None:
            raise SpecError(
                f"{field}: mode POD needs one uid and one gid mapping, got "
                f"{len(options.uids)} and {len(options.gids)}"
            )
        return PodUserns(uids, gids)
    raise SpecError(
        f"{field}.mode {mode.name} is not supported: user namespaces are per pod "
        "(use POD with one uid and one gid mapping, or NODE)"
    )


def pod_userns_of(config: cri.PodSandboxConfig | cri.ContainerConfig) -> PodUserns | None:
    """parse_userns of a pod or container config's namespace options."""
    linux = config.linux
    context = linux.security_context if linux is not None else None
    options = context.namespace_options if context is not None else None
    return parse_userns(options.userns_options if options is not None else None)


def same_userns(a: PodUserns | None, b: PodUserns | None) -> bool:
    return a == b


__all__ = ["IdMapping", "PodUserns", "SpecError", "parse_userns", "pod_userns_of", "same_userns"]
