"""The CRI RuntimeService: each RPC routed, through the instrumented wrapper,
to the module that owns its group (status, sandbox, container, ...).

RPCs whose group has not landed yet are left to the generated base class,
which answers UNIMPLEMENTED as kubelet expects.
"""

from __future__ import annotations

from cri_shim.cri.sandbox import SandboxHandlers
from cri_shim.cri.status import StatusHandlers
from cri_shim.gen.runtime import v1 as cri
from cri_shim.instrument import Instrumentation


class RuntimeService(cri.RuntimeServiceBase):
    def __init__(
        self, instrument: Instrumentation, status: StatusHandlers, sandboxes: SandboxHandlers
    ) -> None:
        self._call = instrument.unary
        self._status = status
        self._sandboxes = sandboxes

    async def version(self, message: cri.VersionRequest) -> cri.VersionResponse:
        return await self._call("Version", self._status.version, message)

    async def status(self, message: cri.StatusRequest) -> cri.StatusResponse:
        return await self._call("Status", self._status.status, message)

    async def runtime_config(self, message: cri.RuntimeConfigRequest) -> cri.RuntimeConfigResponse:
        return await self._call("RuntimeConfig", self._status.runtime_config, message)

    async def update_runtime_config(
        self, message: cri.UpdateRuntimeConfigRequest
    ) -> cri.UpdateRuntimeConfigResponse:
        return await self._call("UpdateRuntimeConfig", self._status.update_runtime_config, message)

    async def run_pod_sandbox(self, message: cri.RunPodSandboxRequest) -> cri.RunPodSandboxResponse:
        return await self._call("RunPodSandbox", self._sandboxes.run_pod_sandbox, message)

    async def stop_pod_sandbox(
        self, message: cri.StopPodSandboxRequest
    ) -> cri.StopPodSandboxResponse:
        return await self._call("StopPodSandbox", self._sandboxes.stop_pod_sandbox, message)

    async def remove_pod_sandbox(
        self, message: cri.RemovePodSandboxRequest
    ) -> cri.RemovePodSandboxResponse:
        return await self._call("RemovePodSandbox", self._sandboxes.remove_pod_sandbox, message)

    async def pod_sandbox_status(
        self, message: cri.PodSandboxStatusRequest
    ) -> cri.PodSandboxStatusResponse:
        return await self._call("PodSandboxStatus", self._sandboxes.pod_sandbox_status, message)

    async def list_pod_sandbox(
        self, message: cri.ListPodSandboxRequest
    ) -> cri.ListPodSandboxResponse:
        return await self._call("ListPodSandbox", self._sandboxes.list_pod_sandbox, message)
