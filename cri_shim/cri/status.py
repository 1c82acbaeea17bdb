"""Version, Status, RuntimeConfig and UpdateRuntimeConfig.

All four answer from memory: containerd health and CNI readiness are kept
current by background watchers, so kubelet's frequent Status polls cost no
containerd round-trip and no disk access.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from cri_shim import __version__
from cri_shim.containerd.health import ContainerdHealth
from cri_shim.errors import invalid_argument
from cri_shim.gen.runtime import v1 as cri
from cri_shim.host import CgroupDriver
from cri_shim.logs import log_event
from cri_shim.network.pod_cidr import PodCidrError, PodCidrStore
from cri_shim.network.readiness import NOT_READY_REASON, NetworkReadiness
from cri_shim.settings import Settings, as_dict

log = logging.getLogger(__name__)

# The CRI API version this runtime implements (kubelet checks it).
KUBE_RUNTIME_API_VERSION = "0.1.0"
RUNTIME_NAME = "cri-shim"
RUNTIME_API_VERSION = "v1"
RUNTIME_NOT_READY_REASON = "ContainerdNotServing"


@dataclass
class RuntimeFacts:
    """What Status reports about runtime handlers and features (the server fills
    it from what the host and this runtime support)."""

    handlers: tuple[str, ...] = ("", "runc")
    recursive_read_only_mounts: bool = False
    # Handlers whose runc and kernel can run pods in their own user namespace.
    userns_handlers: frozenset[str] = frozenset()
    supplemental_groups_policy: bool = False


class StatusHandlers:
    def __init__(
        self,
        settings: Settings,
        health: ContainerdHealth,
        network: NetworkReadiness,
        pod_cidrs: PodCidrStore,
        cgroup_driver: CgroupDriver,
        facts: RuntimeFacts | None = None,
    ) -> None:
        self.settings = settings
        self.health = health
        self.network = network
        self.pod_cidrs = pod_cidrs
        self.cgroup_driver = cgroup_driver
        self.facts = facts or RuntimeFacts()

    async def version(self, request: cri.VersionRequest) -> cri.VersionResponse:
        return cri.VersionResponse(
            version=KUBE_RUNTIME_API_VERSION,
            runtime_name=RUNTIME_NAME,
            runtime_version=__version__,
            runtime_api_version=RUNTIME_API_VERSION,
        )

    def _conditions(self) -> list[cri.RuntimeCondition]:
        runtime_ready = self.health.serving
        network_ready = self.network.ready
        return [
            cri.RuntimeCondition(
                type="RuntimeReady",
                status=runtime_ready,
                reason="" if runtime_ready else RUNTIME_NOT_READY_REASON,
                message="" if runtime_ready else self.health.last_error,
            ),
            cri.RuntimeCondition(
                type="NetworkReady",
                status=network_ready,
                reason="" if network_ready else NOT_READY_REASON,
                message=self.network.message,
            ),
        ]

    def _verbose_info(self) -> dict[str, str]:
        containerd = {
            "address": self.health.client.address,
            "namespace": self.health.client.namespace,
            "serving": self.health.serving,
            "version": self.health.version.version if self.health.version else "",
            "revision": self.health.version.revision if self.health.version else "",
        }
        config = self.network.config
        cni = {
            "confDir": self.network.conf_dir.as_posix(),
            "binDirs": list(self.network.bin_dirs),
            "network": config.raw if config is not None else None,
            "podCIDRs": list(self.pod_cidrs.cidrs),
        }
        return {
            "config": json.dumps(as_dict(self.settings)),
            "containerd": json.dumps(containerd),
            "cniconfig": json.dumps(cni),
            "lastCNILoadStatus": "OK" if self.network.ready else self.network.error,
            "cgroupDriver": self.cgroup_driver.value,
        }

    async def status(self, request: cri.StatusRequest) -> cri.StatusResponse:
        facts = self.facts
        handlers = [
            cri.RuntimeHandler(
                name=name,
                features=cri.RuntimeHandlerFeatures(
                    recursive_read_only_mounts=facts.recursive_read_only_mounts,
                    user_namespaces=name in facts.userns_handlers,
                ),
            )
            for name in facts.handlers
        ]
        return cri.StatusResponse(
            status=cri.RuntimeStatus(conditions=self._conditions()),
            info=self._verbose_info() if request.verbose else {},
            runtime_handlers=handlers,
            features=cri.RuntimeFeatures(
                supplemental_groups_policy=facts.supplemental_groups_policy
            ),
        )

    async def runtime_config(self, request: cri.RuntimeConfigRequest) -> cri.RuntimeConfigResponse:
        driver = (
            cri.CgroupDriver.SYSTEMD
            if self.cgroup_driver is CgroupDriver.SYSTEMD
            else cri.CgroupDriver.CGROUPFS
        )
        return cri.RuntimeConfigResponse(linux=cri.LinuxRuntimeConfiguration(cgroup_driver=driver))

    async def update_runtime_config(
        self, request: cri.UpdateRuntimeConfigRequest
    ) -> cri.UpdateRuntimeConfigResponse:
        config = request.runtime_config
        network = config.network_config if config is not None else None
        if network is not None and network.pod_cidr:
            try:
                changed = await self.pod_cidrs.update(network.pod_cidr)
            except PodCidrError as err:
                raise invalid_argument(str(err)) from err
            if changed:
                log_event(log, "pod cidr updated", pod_cidrs=",".join(self.pod_cidrs.cidrs))
        return cri.UpdateRuntimeConfigResponse()
