"""Image references, normalised the way Docker and containerd do it.

`busybox` and `docker.io/library/busybox:latest` must name the same image
everywhere (image records, repo tags, pull requests), so every reference is
parsed once into a fully qualified `Reference` (distribution/reference's
ParseNormalizedNamed followed by TagNameOnly).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_HEX_ID = re.compile(r"[a-f0-9]{64}")
_IMAGE_ID = re.compile(r"sha256:[a-f0-9]{64}")
# Hex lengths of the digest algorithms containerd can verify.
DIGEST_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}


class ReferenceError(ValueError):
    """A reference that cannot name an image; the message says what is wrong."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(f"invalid image reference {text!r}: {reason}")
        self.text = text
        self.reason = reason


@dataclass(frozen=True)
class Reference:
    domain: str
    path: str
    tag: str | None
    digest: str | None

    @property
    def repository(self) -> str:
        """`docker.io/library/busybox`: the name without tag or digest."""
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        text = self.repository
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def with_digest(self, digest: str) -> Reference:
        """`repository@digest` (no tag): the form of CRI repo digests."""
        return Reference(self.domain, self.path, None, digest)

    @property
    def object(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG


def validate_digest(digest: str) -> str | None:
    """Why `digest` is not a digest we can verify, or None when it is fine."""
    if not _DIGEST.fullmatch(digest):
        return f"invalid digest {digest!r}: expected <algorithm>:<hex>"
    algorithm, _, encoded = digest.partition(":")
    length = DIGEST_HEX_LENGTHS.get(algorithm)
    if length is None:
        return f"unsupported digest algorithm {algorithm!r} (use sha256, sha384 or sha512)"
    if len(encoded) != length or encoded.lower() != encoded:
        return f"invalid digest {digest!r}: {algorithm} needs {length} lowercase hex digits"
    return None


def is_digest_id(text: str) -> bool:
    """`sha256:<64 hex>`: an image id, which callers look up instead of parsing as a name."""
    return bool(_IMAGE_ID.fullmatch(text))


def _split_domain(name: str) -> tuple[str, str]:
    """Like distribution's splitDockerDomain: the first component is a registry host
    only if it looks like one (has `.` or `:`, is `localhost`, or has capitals)."""
    first, sep, rest = name.partition("/")
    if not sep or (
        not any(c in first for c in ".:") and first != "localhost" and first.lower() == first
    ):
        domain, remainder = DEFAULT_DOMAIN, name
    else:
        domain, remainder = first, rest
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = OFFICIAL_REPO_PREFIX + remainder
    return domain, remainder


def parse_reference(text: str) -> Reference:
    """Parse and normalise an image reference; a missing tag and digest means `:latest`."""
    if not text:
        raise ReferenceError(text, "empty reference")
    if text != text.strip() or any(c.isspace() for c in text):
        raise ReferenceError(text, "contains whitespace")
    if _HEX_ID.fullmatch(text):
        raise ReferenceError(text, "a 64-character hex string is an image id, not a name")
    name, at, digest = text.partition("@")
    if at:
        problem = validate_digest(digest)
        if problem is not None:
            raise ReferenceError(text, problem)
    colon = name.rfind(":")
    tag: str | None = None
    if colon > name.rfind("/"):
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise ReferenceError(
                text,
                f"invalid tag {tag!r}: up to 128 letters, digits, '_', '.' or '-', "
                "not starting with '.' or '-'",
            )
    if not name:
        raise ReferenceError(text, "no repository name")
    domain, path = _split_domain(name)
    if path.lower() != path:
        raise ReferenceError(text, f"repository name {path!r} must be lowercase")
    if not _DOMAIN.fullmatch(domain):
        raise ReferenceError(text, f"invalid registry host {domain!r}")
    for component in path.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            raise ReferenceError(
                text,
                f"invalid repository path component {component!r}: lowercase letters and "
                "digits, separated by '.', '_', '__' or '-'",
            )
    full = f"{domain}/{path}"
    if len(full) > NAME_TOTAL_LENGTH_MAX:
        raise ReferenceError(
            text, f"repository name must not be longer than {NAME_TOTAL_LENGTH_MAX} characters"
        )
    if tag is None and not at:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest if at else None)


__all__ = [
    "DEFAULT_DOMAIN",
    "DEFAULT_TAG",
    "Reference",
    "ReferenceError",
    "is_digest_id",
    "parse_reference",
    "validate_digest",
]
