"""Errors a CRI caller can act on, and their one translation into gRPC statuses.

Code below the RPC layer raises the typed errors here (`NotFound`,
`InvalidArgument`, ...; the lower-case helpers build them), or lets its own
errors escape (containerd's, CNI's, the registry's). `to_grpc_error`, called by
the RPC wrapper alone (`instrument.py`), turns each into a status with an
actionable message, so no Python traceback ever reaches kubelet or crictl.
Model: containerd's errdefs and its instrumented CRI service.
"""

from __future__ import annotations

import asyncio
import re

from grpclib import GRPCError
from grpclib.const import Status
from grpclib.exceptions import StreamTerminatedError


class CriError(Exception):
    """A failure the caller can act on; its message reaches the caller verbatim."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CriError):
    """The request itself is wrong."""


class NotFound(CriError):
    """The named pod, container or image does not exist."""


class AlreadyExists(CriError):
    """The name is taken."""


class FailedPrecondition(CriError):
    """The object is not in a state that allows the call (e.g. exec in an exited container)."""


class ResourceExhausted(CriError):
    """A limit of the shim's own was reached."""


class DeadlineExceeded(CriError):
    """The work did not finish in the time it was given."""


class PermissionDenied(CriError):
    """The registry (or the host) refused access."""


class Unauthenticated(CriError):
    """The registry wants credentials the request did not bring."""


class Unavailable(CriError):
    """A dependency cannot serve right now; the caller should retry."""


class Unimplemented(CriError):
    """The shim does not do this."""


class DataLoss(CriError):
    """Content did not match its digest."""


class Unknown(CriError):
    """Another program's failure passed on in its own words (a CNI plugin's, a registry's)."""


_STATUS: dict[type[CriError], Status] = {
    InvalidArgument: Status.INVALID_ARGUMENT,
    NotFound: Status.NOT_FOUND,
    AlreadyExists: Status.ALREADY_EXISTS,
    FailedPrecondition: Status.FAILED_PRECONDITION,
    ResourceExhausted: Status.RESOURCE_EXHAUSTED,
    DeadlineExceeded: Status.DEADLINE_EXCEEDED,
    PermissionDenied: Status.PERMISSION_DENIED,
    Unauthenticated: Status.UNAUTHENTICATED,
    Unavailable: Status.UNAVAILABLE,
    Unimplemented: Status.UNIMPLEMENTED,
    DataLoss: Status.DATA_LOSS,
    Unknown: Status.UNKNOWN,
    CriError: Status.UNKNOWN,
}


def invalid_argument(message: str) -> InvalidArgument:
    return InvalidArgument(message)


def not_found(message: str) -> NotFound:
    return NotFound(message)


def already_exists(message: str) -> AlreadyExists:
    return AlreadyExists(message)


def failed_precondition(message: str) -> FailedPrecondition:
    return FailedPrecondition(message)


def unavailable(message: str) -> Unavailable:
    return Unavailable(message)


def unimplemented(message: str) -> Unimplemented:
    return Unimplemented(message)


def go_quote(text: str) -> str:
    """Go's %q for the plain names and ids containerd quotes in its messages, so
    messages worded as containerd's read the same."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def require(value: str, field: str) -> str:
    """Reject an empty required string field with the field's CRI name."""
    if not value:
        raise invalid_argument(f"{field} must not be empty")
    return value


class ContainerdUnavailable(ConnectionError):
    """containerd did not answer at all (socket missing, refused, or connection lost)."""

    def __init__(self, address: str, cause: BaseException | None = None) -> None:
        detail = f": {cause}" if cause is not None and str(cause) else ""
        super().__init__(f"containerd is not reachable at {address}{detail}")
        self.address = address


class ContainerdError(Exception):
    """containerd answered a call with an error status."""

    def __init__(self, method: str, status: Status, message: str) -> None:
        super().__init__(f"containerd {method}: {message or status.name}")
        self.method = method
        self.status = status
        self.detail = message


# containerd's own statuses mean the same thing to a CRI caller, except the
# transport-level ones, which become UNAVAILABLE so kubelet retries.
_PASS_THROUGH = {
    Status.INVALID_ARGUMENT,
    Status.NOT_FOUND,
    Status.ALREADY_EXISTS,
    Status.FAILED_PRECONDITION,
    Status.RESOURCE_EXHAUSTED,
    Status.UNIMPLEMENTED,
    Status.PERMISSION_DENIED,
    Status.UNAUTHENTICATED,
    Status.DEADLINE_EXCEEDED,
    Status.ABORTED,
    Status.OUT_OF_RANGE,
    Status.CANCELLED,
}


# runc failing to apply a resource setting: the kernel refused the value written
# to a cgroup file (a CFS quota under 1 ms, a cpuset naming an absent CPU, a
# memory limit below what the cgroup already uses).
_CGROUP_REFUSAL = re.compile(
    r"(/sys/fs/cgroup/\S*?([\w.]+)): "
    r"(invalid argument|numerical result out of range|device or resource busy)"
)


def _cgroup_refusal(err: ContainerdError) -> GRPCError | None:
    found = _CGROUP_REFUSAL.search(err.detail)
    if found is None:
        return None
    setting, reason = found.group(2), found.group(3)
    if reason == "device or resource busy":
        return GRPCError(
            Status.FAILED_PRECONDITION,
            f"the kernel refused the container's {setting} now (it already uses more than"
            f" the new value allows): {err}",
        )
    return GRPCError(
        Status.INVALID_ARGUMENT,
        f"the kernel refused the container's {setting} value ({reason}); check its"
        f" resources: {err}",
    )


def to_grpc_error(err: BaseException, rpc: str) -> GRPCError:
    """Translate an exception escaping a handler into a status a person can act on."""
    if isinstance(err, GRPCError):
        return err
    if isinstance(err, CriError):
        kind = next(k for k in type(err).__mro__ if k in _STATUS)
        return GRPCError(_STATUS[kind], err.message)
    if isinstance(err, ContainerdError):
        refusal = _cgroup_refusal(err) if err.status is Status.UNKNOWN else None
        if refusal is not None:
            return refusal
        status = err.status if err.status in _PASS_THROUGH else Status.UNKNOWN
        if err.status is Status.UNAVAILABLE:
            status = Status.UNAVAILABLE
        return GRPCError(status, str(err))
    if isinstance(err, ContainerdUnavailable | StreamTerminatedError):
        return GRPCError(Status.UNAVAILABLE, str(err) or "lost the connection to containerd")
    if isinstance(err, asyncio.TimeoutError | TimeoutError):
        return GRPCError(Status.DEADLINE_EXCEEDED, f"{rpc} timed out")
    if isinstance(err, PermissionError):
        return GRPCError(Status.PERMISSION_DENIED, f"{rpc}: {err}")
    if isinstance(err, ConnectionError):
        return GRPCError(Status.UNAVAILABLE, f"{rpc}: {err}")
    return GRPCError(
        Status.INTERNAL,
        f"{rpc} failed unexpectedly ({type(err).__name__}: {err}); see cri-shim logs",
    )
