import asyncio

import pytest
from grpclib import GRPCError
from grpclib.const import Status

from cri_shim.errors import (
    ContainerdError,
    ContainerdUnavailable,
    DataLoss,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unknown,
    invalid_argument,
    to_grpc_error,
)
from cri_shim.gen.runtime import v1 as cri
from cri_shim.images.errors import pull_error
from cri_shim.instrument import Instrumentation, request_ids
from cri_shim.registry.errors import ImageNotFoundError, RegistryUnavailableError


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ContainerdError("Get", Status.NOT_FOUND, "container x: not found"), Status.NOT_FOUND),
        (ContainerdError("Create", Status.ALREADY_EXISTS, "exists"), Status.ALREADY_EXISTS),
        (ContainerdError("Get", Status.UNAVAILABLE, "closing"), Status.UNAVAILABLE),
        (ContainerdError("Get", Status.INTERNAL, "boom"), Status.UNKNOWN),
        (ContainerdUnavailable("/run/c.sock", ConnectionRefusedError()), Status.UNAVAILABLE),
        (TimeoutError(), Status.DEADLINE_EXCEEDED),
        (PermissionError("denied"), Status.PERMISSION_DENIED),
        (KeyError("oops"), Status.INTERNAL),
        (invalid_argument("bad"), Status.INVALID_ARGUMENT),
        (NotFound("container x not found"), Status.NOT_FOUND),
        (FailedPrecondition("exited"), Status.FAILED_PRECONDITION),
        (ResourceExhausted("too many"), Status.RESOURCE_EXHAUSTED),
        (DataLoss("digest"), Status.DATA_LOSS),
        (Unknown("plugin said no"), Status.UNKNOWN),
    ],
)
def test_exceptions_map_to_actionable_statuses(error: Exception, status: Status) -> None:
    mapped = to_grpc_error(error, "Rpc")
    assert mapped.status is status
    assert mapped.message


def test_containerd_errors_name_the_call_and_cause() -> None:
    mapped = to_grpc_error(ContainerdError("Containers.Get", Status.NOT_FOUND, "no such"), "X")
    assert mapped.message == "containerd Containers.Get: no such"
    unreachable = to_grpc_error(ContainerdUnavailable("/run/c.sock"), "X")
    assert "not reachable at /run/c.sock" in (unreachable.message or "")


@pytest.mark.parametrize(
    ("detail", "status", "setting"),
    [
        # runc 1.1's words, as the fuzz test met them (Tasks.Update).
        (
            'runc did not terminate successfully: exit status 1: failed to write "G": write'
            " /sys/fs/cgroup/cpuset/k8s.io/abc/cpuset.cpus: invalid argument",
            Status.INVALID_ARGUMENT,
            "cpuset.cpus",
        ),
        (
            "OCI runtime create failed: runc create failed: error setting cgroup config for"
            ' procHooks process: failed to write "500": write'
            " /sys/fs/cgroup/cpu,cpuacct/k8s.io/abc/cpu.cfs_quota_us: invalid argument: unknown",
            Status.INVALID_ARGUMENT,
            "cpu.cfs_quota_us",
        ),
        (
            'failed to write "4096": write /sys/fs/cgroup/memory/k8s.io/abc/memory.limit_in_bytes:'
            " device or resource busy",
            Status.FAILED_PRECONDITION,
            "memory.limit_in_bytes",
        ),
    ],
)
def test_a_cgroup_value_the_kernel_refused_is_the_callers_to_fix(
    detail: str, status: Status, setting: str
) -> None:
    mapped = to_grpc_error(ContainerdError("Tasks.Update", Status.UNKNOWN, detail), "X")
    assert mapped.status is status
    assert setting in (mapped.message or "") and detail in (mapped.message or "")
    other = to_grpc_error(ContainerdError("Tasks.Update", Status.UNKNOWN, "exit status 1"), "X")
    assert other.status is Status.UNKNOWN


async def test_wrapper_turns_a_crash_into_internal_without_traceback_text() -> None:
    instrument = Instrumentation()

    async def broken(request: cri.ContainerStatusRequest) -> cri.ContainerStatusResponse:
        raise ValueError("bad state")

    with pytest.raises(GRPCError) as caught:
        await instrument.unary("ContainerStatus", broken, cri.ContainerStatusRequest("abc"))
    assert caught.value.status is Status.INTERNAL
    assert caught.value.message is not None
    assert "Traceback" not in caught.value.message
    assert "ValueError: bad state" in caught.value.message
    assert instrument.in_flight == 0


async def test_wrapper_reports_outcomes_to_observers() -> None:
    instrument = Instrumentation()
    seen: list[tuple[str, Status]] = []
    instrument.observers.append(lambda rpc, status, elapsed: seen.append((rpc, status)))

    async def ok(request: cri.VersionRequest) -> cri.VersionResponse:
        return cri.VersionResponse(version="0.1.0")

    async def missing(request: cri.VersionRequest) -> cri.VersionResponse:
        raise GRPCError(Status.NOT_FOUND, "gone")

    await instrument.unary("Version", ok, cri.VersionRequest())
    with pytest.raises(GRPCError):
        await instrument.unary("Version", missing, cri.VersionRequest())
    assert seen == [("Version", Status.OK), ("Version", Status.NOT_FOUND)]


async def test_wait_idle_waits_for_calls_in_flight() -> None:
    instrument = Instrumentation()
    release = asyncio.Event()

    async def slow(request: cri.VersionRequest) -> cri.VersionResponse:
        await release.wait()
        return cri.VersionResponse()

    call = asyncio.create_task(instrument.unary("Version", slow, cri.VersionRequest()))
    await asyncio.sleep(0)
    assert instrument.in_flight == 1
    assert not await instrument.wait_idle(0.05)
    release.set()
    assert await instrument.wait_idle(1.0)
    await call


def test_request_ids_pick_pod_and_container_ids() -> None:
    request = cri.RunPodSandboxRequest(
        config=cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name="web", namespace="prod"))
    )
    assert request_ids(request) == {"pod_name": "web", "pod_namespace": "prod"}
    assert request_ids(cri.StopContainerRequest(container_id="c1")) == {"container": "c1"}


def test_domain_errors_keep_their_message_and_pull_errors_name_the_image() -> None:
    assert to_grpc_error(NotFound("container abc not found"), "X").message == (
        "container abc not found"
    )
    missing = pull_error(ImageNotFoundError("reg/x:1 not found", reference="reg/x:1"), "reg/x:1")
    assert missing is not None
    mapped = to_grpc_error(missing, "PullImage")
    assert mapped.status is Status.NOT_FOUND
    assert mapped.message == 'failed to pull and unpack image "reg/x:1": reg/x:1 not found'
    down = pull_error(RegistryUnavailableError("reg: refused"), "reg/x:1")
    assert down is not None and to_grpc_error(down, "PullImage").status is Status.UNAVAILABLE
    assert pull_error(KeyError("not a pull error"), "reg/x:1") is None
