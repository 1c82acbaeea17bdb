"""Versions of the JSON records kept on containerd containers (one extension each).

A pod's and a container's record are what a restarted shim rebuilds them from
(`Sandbox.to_record`/`from_record`, `Container.to_record`/`from_record`).
Records written before versions existed carry none and read as version 1.
"""

from __future__ import annotations

from typing import Any

RECORD_VERSION = 1


class RecordVersionError(ValueError):
    """A record written by a newer cri-shim, in a layout this one does not know."""


def check_record_version(data: dict[str, Any], kind: str) -> None:
    version = data.get("version", 1)
    if version != RECORD_VERSION:
        raise RecordVersionError(
            f"{kind} {data.get('id', '?')}: record version {version!r} (this cri-shim reads 1)"
        )
