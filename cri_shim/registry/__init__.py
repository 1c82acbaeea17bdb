"""Registry client: resolves image references and streams blobs over the OCI
distribution API, with mirrors, auth and TLS configured like containerd's.

The containerd side (`cri_shim.images`) writes what this fetches into the
content store; nothing here talks to containerd.
"""

from cri_shim.registry.client import BlobInterruptedError, RegistryClient
from cri_shim.registry.digest import DigestVerifier, compute_digest, verify_bytes
from cri_shim.registry.errors import (
    DigestMismatchError,
    ImageNotFoundError,
    PlatformNotFoundError,
    PullStalledError,
    RegistryAuthError,
    RegistryError,
    RegistryUnavailableError,
    UnsupportedManifestError,
)
from cri_shim.registry.reference import (
    Reference,
    ReferenceError,
    is_digest_id,
    parse_reference,
)
from cri_shim.registry.types import (
    Credentials,
    Descriptor,
    Platform,
    ResolvedImage,
    host_platform,
)

__all__ = [
    "BlobInterruptedError",
    "Credentials",
    "Descriptor",
    "DigestMismatchError",
    "DigestVerifier",
    "ImageNotFoundError",
    "Platform",
    "PlatformNotFoundError",
    "PullStalledError",
    "Reference",
    "ReferenceError",
    "RegistryAuthError",
    "RegistryClient",
    "RegistryError",
    "RegistryUnavailableError",
    "ResolvedImage",
    "UnsupportedManifestError",
    "compute_digest",
    "host_platform",
    "is_digest_id",
    "parse_reference",
    "verify_bytes",
]
