"""Which containerd versions cri-shim runs on, read from a version string.

Supported: 1.6, 1.7 and 2.x (the test suite runs against Debian's 1.6.20 and
2.4.2). Older containerds are past their end of life and untested; a 3.x would
be a new API major nobody has tried, so `cri-shim check` refuses both.
"""

from __future__ import annotations

import re

SUPPORTED = "1.6, 1.7 or 2.x"
# "v2.4.2", "1.6.20~ds1" (Debian), "1.7.24-0ubuntu1", or a whole `containerd --version` line.
VERSION_PATTERN = re.compile(r"(?:^|\s)(v?(\d+)\.(\d+)\.\d+\S*)")


def parse_version(text: str) -> tuple[int, int] | None:
    """(major, minor) of the first version in `text`, None if there is none."""
    match = VERSION_PATTERN.search(text)
    return (int(match.group(2)), int(match.group(3))) if match else None


def version_field(text: str) -> str | None:
    """The version as written (e.g. "v2.4.2"), None if there is none."""
    match = VERSION_PATTERN.search(text)
    return match.group(1) if match else None


def unsupported_reason(version: str) -> str | None:
    """Why cri-shim cannot run on this containerd version, or None if it can."""
    parsed = parse_version(version)
    if parsed is None:
        return f"cannot read a containerd version from {version!r}"
    major, minor = parsed
    if (major, minor) < (1, 6) or major > 2:
        return f"containerd {version} is not supported: cri-shim needs containerd {SUPPORTED}"
    return None
