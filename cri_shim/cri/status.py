"""Version, Status, RuntimeConfig and UpdateRuntimeConfig.

All four answer from memory: containerd health and CNI readiness are kept
current by background watchers, so kubelet's frequent Status polls cost no
containerd round-trip and no disk access.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from cri_shim import __version__
from cri_shim.container.cri_log import MAX_LINE_BYTES
from cri_shim.containerd.health import ContainerdHealth
from cri_shim.containerd.runtime import RUNC_RUNTIME
from cri_shim.containerd.snapshots import SNAPSHOTTER
from cri_shim.errors import invalid_argument
from cri_shim.gen.runtime import v1 as cri
from cri_shim.host import CgroupDriver
from cri_shim.logs import log_event
from cri_shim.network.cni_config import NetworkConfig
from cri_shim.network.cni_types import DEFAULT_IFNAME
from cri_shim.network.pod_cidr import PodCidrError, PodCidrStore
from cri_shim.network.readiness import NOT_READY_REASON, NetworkReadiness
from cri_shim.settings import Settings, as_dict
from cri_shim.store.encoded import EncodedStatusResponse, prebuilt
from cri_shim.store.verbose import go_json

log = logging.getLogger(__name__)

# The CRI API version this runtime implements (kubelet checks it).
KUBE_RUNTIME_API_VERSION = "0.1.0"
RUNTIME_NAME = "cri-shim"
RUNTIME_API_VERSION = "v1"
RUNTIME_NOT_READY_REASON = "ContainerdNotServing"
CNI_INTERFACE_PREFIX = "eth"  # pods' interfaces: eth0 (go-cni's prefix)


@dataclass
class RuntimeFacts:
    """What Status reports about runtime handlers and features (the server fills
    it from what the host and this runtime support)."""

    handlers: tuple[str, ...] = ("", "runc")
    recursive_read_only_mounts: bool = False
    # Handlers whose runc and kernel can run pods in their own user namespace.
    userns_handlers: frozenset[str] = frozenset()
    supplemental_groups_policy: bool = False
    restrict_oom_score_adj: bool = False  # negative oom_score_adj is clamped on this host
    apparmor: bool = False  # profiles are applied (the kernel has AppArmor)


def _sorted_keys(value: Any) -> Any:
    """JSON objects with their keys sorted at every level, as Go marshals a map."""
    if isinstance(value, dict):
        return {key: _sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(item) for item in value]
    return value


def _cni_network(config: NetworkConfig, ifname: str) -> dict[str, Any]:
    """One network of go-cni's config (containerd's `cniconfig.Networks[]`)."""
    plugins = []
    for plugin in config.plugins:
        network: dict[str, Any] = {
            key: plugin[key] for key in ("capabilities", "name", "type") if plugin.get(key)
        }
        ipam = plugin.get("ipam")
        network["ipam"] = (
            {"type": ipam["type"]} if isinstance(ipam, dict) and "type" in ipam else {}
        )
        plugins.append({"Network": network, "Source": go_json(_sorted_keys(plugin))})
    return {
        "Config": {
            "Name": config.name,
            "CNIVersion": config.cni_version,
            "Plugins": plugins,
            "Source": go_json(config.raw),
        },
        "IFName": ifname,
    }


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
        # verbose → (what the answer was built from, its encoding)
        self._answers: dict[bool, tuple[tuple[object, ...], bytes]] = {}

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

    def _containerd_config(self) -> dict[str, Any]:
        """containerd 2.4's `config` keys whose meaning cri-shim shares, valued as
        cri-shim behaves (its CRI config struct, json.Marshal'd), plus containerd
        1.x's `sandboxImage` and `containerd.snapshotter`, which scripts read."""
        settings = self.settings
        runtime = settings.runtime
        facts = self.facts
        systemd = self.cgroup_driver is CgroupDriver.SYSTEMD
        runc = {
            "runtimeType": RUNC_RUNTIME,
            "runtimePath": "",
            "PodAnnotations": list(runtime.pod_annotations) or None,
            "ContainerAnnotations": list(runtime.container_annotations) or None,
            "options": {"SystemdCgroup": systemd},
            "privileged_without_host_devices": False,
            "privileged_without_host_devices_all_devices_allowed": False,
            "cgroupWritable": False,
            "baseRuntimeSpec": "",
            "cniConfDir": "",
            "cniMaxConfNum": 0,
            "snapshotter": "",
            "sandboxer": "podsandbox",
            "disablePauseImagePull": False,
            "io_type": "",
        }
        return {
            "containerd": {
                "defaultRuntimeName": runtime.default_runtime,
                "runtimes": {runtime.default_runtime: runc},
                "snapshotter": SNAPSHOTTER,
                "ignoreBlockIONotEnabledErrors": False,
                "ignoreRdtNotEnabledErrors": False,
            },
            "cni": {
                "binDirs": list(self.network.bin_dirs),
                "confDir": self.network.conf_dir.as_posix(),
                "maxConfNum": 1,
                "setupSerially": False,
                "confTemplate": "",
                "ipPref": "",
                "useInternalLoopback": False,
            },
            "sandboxImage": runtime.sandbox_image,
            "enableSelinux": False,
            "selinuxCategoryRange": 1024,
            "maxContainerLogLineSize": MAX_LINE_BYTES,
            "disableApparmor": not facts.apparmor,
            "restrictOOMScoreAdj": facts.restrict_oom_score_adj,
            "disableProcMount": False,
            "unsetSeccompProfile": "",
            "tolerateMissingHugetlbController": True,
            "disableHugetlbController": False,
            "device_ownership_from_security_context": False,
            "ignoreImageDefinedVolumes": False,
            "netnsMountsUnderStateDir": False,
            "enableUnprivilegedPorts": False,
            "enableUnprivilegedICMP": False,
            "cdiSpecDirs": None,
            "drainExecSyncIOTimeout": "0s",
            "ignoreDeprecationWarnings": None,
            "statsCollectPeriod": "",
            "statsRetentionPeriod": "",
            "enableCRIU": False,
            "containerdRootDir": "",
            "containerdEndpoint": self.health.client.address,
            "rootDir": settings.state_dir,
            "stateDir": settings.state_dir,
        }

    def _verbose_info(self) -> dict[str, str]:
        """containerd's info keys (config, cniconfig, lastCNILoadStatus[.default]), each
        holding cri-shim's own keys too (snake_case settings beside containerd's
        camelCase), plus cri-shim's `containerd` and `cgroupDriver`."""
        containerd = {
            "address": self.health.client.address,
            "namespace": self.health.client.namespace,
            "serving": self.health.serving,
            "version": self.health.version.version if self.health.version else "",
            "revision": self.health.version.revision if self.health.version else "",
        }
        own = as_dict(self.settings)
        config = self._containerd_config()
        for section in ("containerd", "cni"):
            config[section].update(own.pop(section))
        config.update(own)
        network = self.network.config
        cni = {
            "PluginDirs": list(self.network.bin_dirs),
            "PluginConfDir": self.network.conf_dir.as_posix(),
            "PluginMaxConfNum": 1,
            "Prefix": CNI_INTERFACE_PREFIX,
            "Networks": [_cni_network(network, DEFAULT_IFNAME)] if network is not None else None,
            "confDir": self.network.conf_dir.as_posix(),
            "binDirs": list(self.network.bin_dirs),
            "network": network.raw if network is not None else None,
            "podCIDRs": list(self.pod_cidrs.cidrs),
        }
        load_status = "OK" if self.network.ready else self.network.error
        return {
            "config": go_json(config),
            "containerd": go_json(containerd),
            "cniconfig": go_json(cni),
            "lastCNILoadStatus": load_status,
            "lastCNILoadStatus.default": load_status,
            "cgroupDriver": self.cgroup_driver.value,
        }

    def _answer_key(self, verbose: bool) -> tuple[object, ...]:
        """Everything a Status answer is made of that can change while serving."""
        health, network, version = self.health, self.network, self.health.version
        return (
            verbose,
            health.serving,
            health.last_error,
            version.version if version else "",
            version.revision if version else "",
            network.ready,
            network.message,
            network.error,
            network.config,
            tuple(self.pod_cidrs.cidrs),
        )

    async def status(self, request: cri.StatusRequest) -> cri.StatusResponse:
        """Answered from an encoding kept until something it reports changes
        (kubelet polls it every few seconds; crictl info asks for the verbose one)."""
        key = self._answer_key(request.verbose)
        cached = self._answers.get(request.verbose)
        if cached is None or cached[0] != key:
            cached = (key, bytes(self._build_status(request.verbose)))
            self._answers[request.verbose] = cached
        return prebuilt(EncodedStatusResponse, cached[1])

    def _build_status(self, verbose: bool) -> cri.StatusResponse:
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
            info=self._verbose_info() if verbose else {},
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
