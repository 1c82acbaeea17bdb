"""Pull failures as the gRPC statuses kubelet and crictl act on.

The registry client's message already names the host and the reference and
says what went wrong; it is passed on verbatim (it ends up in the pod's
events), prefixed the way containerd prefixes its own pull errors (kubelet events read the same).
"""

from __future__ import annotations

from grpclib import GRPCError
from grpclib.const import Status

from cri_shim.images.unpack import LayerMismatchError
from cri_shim.registry.errors import (
    DigestMismatchError,
    ImageNotFoundError,
    PullStalledError,
    RegistryAuthError,
    RegistryError,
    RegistryUnavailableError,
    UnsupportedManifestError,
)
from cri_shim.registry.reference import ReferenceError


def pull_status(err: BaseException) -> Status | None:
    """The status for a pull failure we understand, or None to let the generic mapping decide."""
    if isinstance(err, ReferenceError):
        return Status.INVALID_ARGUMENT
    if isinstance(err, RegistryAuthError):
        return Status.PERMISSION_DENIED if err.status_code == 403 else Status.UNAUTHENTICATED
    if isinstance(err, ImageNotFoundError):
        return Status.NOT_FOUND
    if isinstance(err, PullStalledError):
        return Status.DEADLINE_EXCEEDED
    if isinstance(err, UnsupportedManifestError):
        return Status.FAILED_PRECONDITION
    if isinstance(err, DigestMismatchError | LayerMismatchError):
        return Status.DATA_LOSS
    if isinstance(err, RegistryUnavailableError):
        return Status.UNAVAILABLE
    if isinstance(err, RegistryError):
        return Status.UNKNOWN
    return None


def pull_error(err: BaseException, image: str) -> GRPCError | None:
    """A GRPCError for `err` raised while pulling `image`, or None when it is not a pull error."""
    status = pull_status(err)
    if status is None:
        return None
    if isinstance(err, ReferenceError):
        return GRPCError(status, str(err))
    return GRPCError(status, f'failed to pull and unpack image "{image}": {err}')


__all__ = ["pull_error", "pull_status"]
