"""Errors a CRI caller can act on, and the mapping of everything else onto them.

Handlers raise `grpclib.GRPCError` through the helpers below. Anything else
that escapes a handler is translated by `to_grpc_error`, so no Python traceback
ever reaches kubelet or crictl.
"""

from __future__ import annotations

import asyncio

from grpclib import GRPCError
from grpclib.const import Status
from grpclib.exceptions import StreamTerminatedError


def invalid_argument(message: str) -> GRPCError:
    return GRPCError(Status.INVALID_ARGUMENT, message)


def not_found(message: str) -> GRPCError:
    return GRPCError(Status.NOT_FOUND, message)


def already_exists(message: str) -> GRPCError:
    return GRPCError(Status.ALREADY_EXISTS, message)


def failed_precondition(message: str) -> GRPCError:
    return GRPCError(Status.FAILED_PRECONDITION, message)


def unavailable(message: str) -> GRPCError:
    return GRPCError(Status.UNAVAILABLE, message)


def unimplemented(message: str) -> GRPCError:
    return GRPCError(Status.UNIMPLEMENTED, message)


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


def to_grpc_error(err: BaseException, rpc: str) -> GRPCError:
    """Translate an exception escaping a handler into a status a person can act on."""
    if isinstance(err, GRPCError):
        return err
    if isinstance(err, ContainerdError):
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
