"""Content verification: everything fetched is checked against the digest that named it."""

from __future__ import annotations

import hashlib

from cri_shim.registry.errors import DigestMismatchError
from cri_shim.registry.reference import DIGEST_HEX_LENGTHS
from cri_shim.registry.types import Descriptor


def _hasher(algorithm: str) -> hashlib._Hash:
    if algorithm not in DIGEST_HEX_LENGTHS:
        raise DigestMismatchError(f"unsupported digest algorithm {algorithm!r}")
    return hashlib.new(algorithm)


def compute_digest(data: bytes, algorithm: str = "sha256") -> str:
    hasher = _hasher(algorithm)
    hasher.update(data)
    return f"{algorithm}:{hasher.hexdigest()}"


class DigestVerifier:
    """Hash a blob as it streams past, then check size and digest against its descriptor.

    Resuming a download at an offset: feed the bytes already stored first.
    """

    def __init__(self, algorithm: str = "sha256") -> None:
        self.algorithm = algorithm
        self._hasher = _hasher(algorithm)
        self.size = 0

    @classmethod
    def for_descriptor(cls, descriptor: Descriptor) -> DigestVerifier:
        return cls(descriptor.digest.partition(":")[0])

    def update(self, data: bytes) -> None:
        self._hasher.update(data)
        self.size += len(data)

    @property
    def digest(self) -> str:
        return f"{self.algorithm}:{self._hasher.hexdigest()}"

    def verify(self, descriptor: Descriptor, *, host: str = "", reference: str = "") -> None:
        """Raise DigestMismatchError unless what was hashed is exactly `descriptor`'s content."""
        where = f" from {host}" if host else ""
        of = f" of {reference}" if reference else ""
        if self.size != descriptor.size:
            raise DigestMismatchError(
                f"blob {descriptor.digest}{of}{where}: got {self.size} bytes, "
                f"expected {descriptor.size}",
                host=host,
                reference=reference,
            )
        if self.digest != descriptor.digest:
            raise DigestMismatchError(
                f"blob {descriptor.digest}{of}{where}: content hashes to {self.digest}",
                host=host,
                reference=reference,
            )


def verify_bytes(
    data: bytes, descriptor: Descriptor, *, host: str = "", reference: str = ""
) -> None:
    """Check a fully read blob (manifest, config) against its descriptor."""
    verifier = DigestVerifier.for_descriptor(descriptor)
    verifier.update(data)
    verifier.verify(descriptor, host=host, reference=reference)


__all__ = ["DigestVerifier", "compute_digest", "verify_bytes"]
