"""RunPodSandbox, StopPodSandbox, RemovePodSandbox, PodSandboxStatus, ListPodSandbox,
StreamPodSandboxes.

Status and List answer from the in-memory store. Stop and Remove of an
unknown id succeed: kubelet retries them after restarts and must not be told
a pod it is cleaning up "does not exist".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from cri_shim.cri.labels import require_label_keys
from cri_shim.errors import Unknown, failed_precondition, invalid_argument, not_found, require
from cri_shim.gen.runtime import v1 as cri
from cri_shim.network.cni import CniError, CniNotReady
from cri_shim.oci.sandbox_spec import SpecError
from cri_shim.oci.userns import pod_userns_of
from cri_shim.runtime_handlers import RuntimeHandler
from cri_shim.sandbox.files import SandboxFilesError
from cri_shim.sandbox.lifecycle import SandboxManager
from cri_shim.sandbox.resources import PodCgroupError, PodResourcesError
from cri_shim.sandbox.resources import validate as validate_pod_resources
from cri_shim.store.encoded import (
    BatchLimits,
    EncodedStreamPodSandboxesResponse,
    batches,
    list_pod_sandbox_response,
    pod_sandbox_status_response,
    prebuilt,
)
from cri_shim.store.sandboxes import SandboxStore
from cri_shim.store.verbose import RUNC_IDENTITY, RuntimeIdentity, go_json, sandbox_info

KNOWN_HANDLERS = ("", "runc")
MAX_NAME_LENGTH = 253
MAX_PORT = 65535


def _refuse_line_breaks(config: cri.PodSandboxConfig) -> None:
    """Hostname and DNS settings are written into /etc/hosts, /etc/hostname and
    resolv.conf line by line: a line break would add entries the pod did not ask for."""
    values: list[tuple[str, str]] = [("config.hostname", config.hostname)]
    dns = config.dns_config
    if dns is not None:
        for field in ("servers", "searches", "options"):
            values += [
                (f"config.dns_config.{field}[{i}]", v) for i, v in enumerate(getattr(dns, field))
            ]
    for field, value in values:
        if any(c in value for c in "\n\r\0"):
            raise invalid_argument(f"{field} {value!r} must not contain a line break or NUL")


def _validate_config(config: cri.PodSandboxConfig | None) -> cri.PodSandboxConfig:
    if config is None:
        raise invalid_argument("config must be set")
    metadata = config.metadata
    if metadata is None:
        raise invalid_argument("config.metadata must be set")
    require(metadata.name, "config.metadata.name")
    require(metadata.namespace, "config.metadata.namespace")
    require(metadata.uid, "config.metadata.uid")
    require_label_keys(config.labels, "config.labels")
    for field, value in (("name", metadata.name), ("namespace", metadata.namespace)):
        if len(value) > MAX_NAME_LENGTH:
            raise invalid_argument(
                f"config.metadata.{field} is {len(value)} characters; "
                f"at most {MAX_NAME_LENGTH} allowed"
            )
    for index, mapping in enumerate(config.port_mappings):
        if mapping.protocol not in (cri.Protocol.TCP, cri.Protocol.UDP, cri.Protocol.SCTP):
            raise invalid_argument(
                f"config.port_mappings[{index}].protocol {int(mapping.protocol)} is not "
                "TCP, UDP or SCTP"
            )
        for field in ("container_port", "host_port"):
            port = getattr(mapping, field)
            if not 0 <= port <= MAX_PORT:
                raise invalid_argument(
                    f"config.port_mappings[{index}].{field} {port} is outside 0-{MAX_PORT}"
                )
    _refuse_line_breaks(config)
    if config.log_directory and not config.log_directory.startswith("/"):
        raise invalid_argument(
            f"config.log_directory {config.log_directory!r} must be an absolute path"
        )
    if config.log_directory and ".." in config.log_directory.split("/"):
        raise invalid_argument(
            f"config.log_directory {config.log_directory!r} must not contain '..'"
        )
    return config


class SandboxHandlers:
    def __init__(
        self,
        store: SandboxStore,
        manager: SandboxManager,
        default_runtime: str,
        limits: BatchLimits | None = None,
        runtime: RuntimeIdentity = RUNC_IDENTITY,
        handlers: Mapping[str, RuntimeHandler] | None = None,
    ) -> None:
        self.store = store
        self.limits = limits or BatchLimits()
        self.runtime = runtime
        self.manager = manager
        self.default_runtime = default_runtime
        self.handlers = handlers or {}

    async def run_pod_sandbox(self, request: cri.RunPodSandboxRequest) -> cri.RunPodSandboxResponse:
        config = _validate_config(request.config)
        handler = request.runtime_handler
        known = sorted({*KNOWN_HANDLERS, *self.handlers} - {""})
        if handler not in known and handler not in ("", self.default_runtime):
            raise not_found(
                f"runtime handler {handler!r} is not configured (known: {', '.join(known)})"
            )
        try:
            userns = pod_userns_of(config)
        except SpecError as err:
            raise invalid_argument(str(err)) from err
        runtime = self.handlers.get(handler)
        if userns is not None and runtime is not None and not runtime.user_namespaces:
            capable = sorted(n for n, h in self.handlers.items() if h.user_namespaces and n)
            raise failed_precondition(
                f"runtime handler {handler or self.default_runtime!r} cannot run a pod in its "
                f"own user namespace: {runtime.userns_problem}"
                + (f"; handlers that can: {', '.join(capable)}" if capable else "")
            )
        try:
            sandbox_id = await self.manager.run(config, handler)
        except (SpecError, SandboxFilesError) as err:
            raise invalid_argument(str(err)) from err
        except CniNotReady as err:
            raise failed_precondition(f"pod network is not ready: {err}") from err
        except CniError as err:
            # The plugin's own words; like containerd, the call fails as UNKNOWN.
            raise Unknown(f"failed to set up pod network: {err}") from err
        return cri.RunPodSandboxResponse(pod_sandbox_id=sandbox_id)

    async def update_pod_sandbox_resources(
        self, request: cri.UpdatePodSandboxResourcesRequest
    ) -> cri.UpdatePodSandboxResourcesResponse:
        require(request.pod_sandbox_id, "pod_sandbox_id")
        try:
            for field, value in (("overhead", request.overhead), ("resources", request.resources)):
                if value is not None:
                    validate_pod_resources(value, field)
        except PodResourcesError as err:
            raise invalid_argument(str(err)) from err
        sandbox = self.store.by_id.get(request.pod_sandbox_id)
        try:
            await self.manager.update_resources(sandbox, request.overhead, request.resources)
        except PodCgroupError as err:
            raise failed_precondition(str(err)) from err
        return cri.UpdatePodSandboxResourcesResponse()

    async def stop_pod_sandbox(
        self, request: cri.StopPodSandboxRequest
    ) -> cri.StopPodSandboxResponse:
        require(request.pod_sandbox_id, "pod_sandbox_id")
        sandbox = self.store.by_id.find(request.pod_sandbox_id)
        if sandbox is not None:
            await self.manager.stop(sandbox)
        return cri.StopPodSandboxResponse()

    async def remove_pod_sandbox(
        self, request: cri.RemovePodSandboxRequest
    ) -> cri.RemovePodSandboxResponse:
        require(request.pod_sandbox_id, "pod_sandbox_id")
        sandbox = self.store.by_id.find(request.pod_sandbox_id)
        if sandbox is not None:
            await self.manager.remove(sandbox)
        return cri.RemovePodSandboxResponse()

    async def pod_sandbox_status(
        self, request: cri.PodSandboxStatusRequest
    ) -> cri.PodSandboxStatusResponse:
        require(request.pod_sandbox_id, "pod_sandbox_id")
        sandbox = self.store.by_id.get(request.pod_sandbox_id)
        if not request.verbose:
            return pod_sandbox_status_response(sandbox)
        info = sandbox.info_bytes(lambda: {"info": go_json(sandbox_info(sandbox, self.runtime))})
        return pod_sandbox_status_response(sandbox, info)

    async def list_pod_sandbox(
        self, request: cri.ListPodSandboxRequest
    ) -> cri.ListPodSandboxResponse:
        return list_pod_sandbox_response(self.store.list(request.filter))

    async def stream_pod_sandboxes(
        self, request: cri.StreamPodSandboxesRequest
    ) -> AsyncIterator[cri.StreamPodSandboxesResponse]:
        """ListPodSandbox in bounded batches, from one snapshot of cached encodings."""
        items = [s.list_bytes() for s in self.store.list(request.filter)]
        for body in batches(items, self.limits):
            yield prebuilt(EncodedStreamPodSandboxesResponse, body)
