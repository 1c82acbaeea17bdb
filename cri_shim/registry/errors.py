"""Pull failures, typed so the CRI layer can map them to statuses kubelet acts on.

Every message names the registry host and the reference, because it ends up
verbatim in `kubectl describe pod` events.
"""

from __future__ import annotations


class RegistryError(Exception):
    """A registry could not give us the image (base class)."""

    def __init__(self, message: str, *, host: str = "", reference: str = "") -> None:
        super().__init__(message)
        self.host = host
        self.reference = reference


class RegistryAuthError(RegistryError):
    """401/403 after presenting what credentials we had: UNAUTHENTICATED / PERMISSION_DENIED."""

    def __init__(
        self, message: str, *, status_code: int, host: str = "", reference: str = ""
    ) -> None:
        super().__init__(message, host=host, reference=reference)
        self.status_code = status_code


class ImageNotFoundError(RegistryError):
    """No endpoint has the manifest: NOT_FOUND."""


class PlatformNotFoundError(ImageNotFoundError):
    """The index has no manifest this host can run (containerd: not found too)."""


class UnsupportedManifestError(RegistryError):
    """A manifest we refuse to pull (Docker schema 1, unknown media type, malformed)."""


class RegistryUnavailableError(RegistryError):
    """No endpoint answered usefully (connection refused, TLS failure, 5xx): UNAVAILABLE.
    `http_status` is the status when the registry did answer (5xx, 408, 429)."""

    def __init__(
        self, message: str, *, host: str = "", reference: str = "", http_status: int = 0
    ) -> None:
        super().__init__(message, host=host, reference=reference)
        self.http_status = http_status


class PullStalledError(RegistryError):
    """No byte arrived for `registry.stall_timeout` seconds."""


class DigestMismatchError(RegistryError):
    """Content did not hash to (or was not the size of) the digest that named it."""


__all__ = [
    "DigestMismatchError",
    "ImageNotFoundError",
    "PlatformNotFoundError",
    "PullStalledError",
    "RegistryAuthError",
    "RegistryError",
    "RegistryUnavailableError",
    "UnsupportedManifestError",
]
