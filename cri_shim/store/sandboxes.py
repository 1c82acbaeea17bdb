"""In-memory view of pod sandboxes: answers PodSandboxStatus and ListPodSandbox
without a containerd round-trip. containerd stays the source of truth: every
record is also kept on the sandbox's containerd container (`Sandbox.to_record`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from cri_shim.gen.runtime import v1 as cri
from cri_shim.store.encoded import EncodingCache
from cri_shim.store.index import IdIndex, NameIndex
from cri_shim.store.record import RECORD_VERSION, check_record_version


class SandboxState(StrEnum):
    READY = "ready"
    NOTREADY = "notready"


@dataclass
class Sandbox(EncodingCache):
    """Change it only by assigning fields: that is what drops its cached encodings."""

    id: str
    name: str
    config: cri.PodSandboxConfig
    runtime_handler: str
    created_at: int
    image_id: str
    netns_path: str = ""
    ip: str = ""
    additional_ips: list[str] = field(default_factory=list)
    state: SandboxState = SandboxState.NOTREADY
    pid: int = 0
    network_ready: bool = False
    image: str = ""  # the sandbox image's name, as on the containerd container
    # The pause container's OCI spec and the CNI ADD result, for verbose status.
    spec: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    cni_result: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    task_deleted: bool = False  # the pause task is gone (stopped pod, or found so on load)
    # The latest UpdatePodSandboxResources (kubelet's pod-level resize), as containerd
    # records it: the pod overhead and the pod's resources.
    overhead: cri.LinuxContainerResources | None = None
    resources: cri.LinuxContainerResources | None = None
    # A stop ran to its end: task gone, network torn down (not in any encoding).
    stop_complete: bool = field(default=False, compare=False)
    # One lock per sandbox: lifecycle calls on one pod never interleave.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False, compare=False)

    @property
    def metadata(self) -> cri.PodSandboxMetadata:
        return self.config.metadata or cri.PodSandboxMetadata()

    def to_record(self) -> dict[str, Any]:
        """What survives a restart of the shim (the run-complete mark is added by the run)."""
        return {
            "version": RECORD_VERSION,
            "id": self.id,
            "name": self.name,
            "config": self.config.to_dict(),
            "runtimeHandler": self.runtime_handler,
            "createdAt": self.created_at,
            "imageId": self.image_id,
            "netnsPath": self.netns_path,
            "ip": self.ip,
            "additionalIps": self.additional_ips,
            "cniResult": self.cni_result,
            **self._updated_resources(),
        }

    def _updated_resources(self) -> dict[str, Any]:
        if self.overhead is None and self.resources is None:
            return {}
        return {
            "updatedResources": {
                "overhead": self.overhead.to_dict() if self.overhead is not None else None,
                "resources": self.resources.to_dict() if self.resources is not None else None,
            }
        }

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Sandbox:
        """The sandbox as run; its state is for the caller to set from the task."""
        check_record_version(data, "pod sandbox")
        updated = data.get("updatedResources") or {}
        return cls(
            id=data["id"],
            name=data["name"],
            config=cri.PodSandboxConfig.from_dict(data["config"]),
            runtime_handler=data.get("runtimeHandler", ""),
            created_at=int(data.get("createdAt", 0)),
            image_id=data.get("imageId", ""),
            netns_path=data.get("netnsPath", ""),
            ip=data.get("ip", ""),
            additional_ips=list(data.get("additionalIps", [])),
            cni_result=data.get("cniResult") or None,
            overhead=_resources(updated.get("overhead")),
            resources=_resources(updated.get("resources")),
        )

    @property
    def host_network(self) -> bool:
        linux = self.config.linux
        context = linux.security_context if linux is not None else None
        options = context.namespace_options if context is not None else None
        return options is not None and options.network == cri.NamespaceMode.NODE

    def namespace_options(self) -> cri.NamespaceOption:
        linux = self.config.linux
        context = linux.security_context if linux is not None else None
        if context is not None and context.namespace_options is not None:
            return context.namespace_options
        return cri.NamespaceOption()

    def cri_state(self) -> cri.PodSandboxState:
        if self.state is SandboxState.READY:
            return cri.PodSandboxState.SANDBOX_READY
        return cri.PodSandboxState.SANDBOX_NOTREADY

    def to_cri(self) -> cri.PodSandbox:
        return cri.PodSandbox(
            id=self.id,
            metadata=self.metadata,
            state=self.cri_state(),
            created_at=self.created_at,
            labels=dict(self.config.labels),
            annotations=dict(self.config.annotations),
            runtime_handler=self.runtime_handler,
        )

    def to_status(self) -> cri.PodSandboxStatus:
        """As containerd reports it: no IP once the network namespace is closed (the pod
        stopped) and none for host-network pods; the namespace options the config gave."""
        linux = self.config.linux
        context = linux.security_context if linux is not None else None
        if self.host_network or not self.network_ready:
            network = cri.PodSandboxNetworkStatus()
        else:
            network = cri.PodSandboxNetworkStatus(
                ip=self.ip,
                additional_ips=[cri.PodIp(ip=ip) for ip in self.additional_ips],
            )
        return cri.PodSandboxStatus(
            id=self.id,
            metadata=self.metadata,
            state=self.cri_state(),
            created_at=self.created_at,
            network=network,
            linux=cri.LinuxPodSandboxStatus(
                namespaces=cri.Namespace(
                    options=context.namespace_options if context is not None else None
                )
            ),
            labels=dict(self.config.labels),
            annotations=dict(self.config.annotations),
            runtime_handler=self.runtime_handler,
        )

    def process_status(self) -> str:
        """The pause task's status as containerd's verbose info names it."""
        if self.task_deleted:
            return "deleted"
        return "running" if self.pid else "stopped"

    def netns_closed(self) -> bool:
        """containerd's netNamespaceClosed: the pod's own namespace is gone."""
        return not self.host_network and not self.network_ready


def _resources(data: Any) -> cri.LinuxContainerResources | None:
    return cri.LinuxContainerResources.from_dict(data) if isinstance(data, dict) else None


def sandbox_name(metadata: cri.PodSandboxMetadata) -> str:
    """kubelet's unique name for a pod attempt, as containerd's CRI forms it."""
    return "_".join([metadata.name, metadata.namespace, metadata.uid, str(metadata.attempt)])


class SandboxStore:
    def __init__(self) -> None:
        self.by_id: IdIndex[Sandbox] = IdIndex("pod sandbox")
        self.names = NameIndex()

    def add(self, sandbox: Sandbox) -> None:
        self.by_id.add(sandbox.id, sandbox)

    def remove(self, sandbox: Sandbox) -> None:
        self.by_id.discard(sandbox.id)
        self.names.release(sandbox.name, sandbox.id)

    def list(self, filters: cri.PodSandboxFilter | None) -> list[Sandbox]:
        items = list(self.by_id)
        if filters is None:
            return items
        if filters.id:
            items = [s for s in items if s.id.startswith(filters.id)]
        if filters.state is not None:
            wanted = filters.state.state
            items = [s for s in items if s.cri_state() == wanted]
        if filters.label_selector:
            selector = dict(filters.label_selector)
            items = [
                s for s in items if all(s.config.labels.get(k) == v for k, v in selector.items())
            ]
        return items
