"""Pull failures as the domain errors kubelet and crictl act on (statuses are set
in the RPC wrapper, `cri_shim.errors.to_grpc_error`).

The registry client's message already names the host and the reference and
says what went wrong; it is passed on verbatim (it ends up in the pod's
events), prefixed the way containerd prefixes its own pull errors (kubelet events read the same).
"""

from __future__ import annotations

from cri_shim.errors import (
    CriError,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    Unknown,
)
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


def pull_kind(err: BaseException) -> type[CriError] | None:
    """The kind of a pull failure we understand; None lets the generic mapping decide."""
    if isinstance(err, ReferenceError):
        return InvalidArgument
    if isinstance(err, RegistryAuthError):
        return PermissionDenied if err.status_code == 403 else Unauthenticated
    if isinstance(err, ImageNotFoundError):
        return NotFound
    if isinstance(err, PullStalledError):
        return DeadlineExceeded
    if isinstance(err, UnsupportedManifestError):
        return FailedPrecondition
    if isinstance(err, DigestMismatchError | LayerMismatchError):
        return DataLoss
    if isinstance(err, RegistryUnavailableError):
        return Unavailable
    if isinstance(err, RegistryError):
        return Unknown
    return None


def pull_error(err: BaseException, image: str) -> CriError | None:
    """The domain error for `err` raised pulling `image`; None when it is no pull error."""
    kind = pull_kind(err)
    if kind is None:
        return None
    if isinstance(err, ReferenceError):
        return kind(str(err))
    return kind(f'failed to pull and unpack image "{image}": {err}')


__all__ = ["pull_error", "pull_kind"]
