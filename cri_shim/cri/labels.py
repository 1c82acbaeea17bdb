"""Label checks shared by RunPodSandbox and CreateContainer.

CRI labels become containerd container labels. containerd's metadata store
refuses an empty key with an untyped error ("key required", UNKNOWN to a
client), so an empty key is refused here first, as the request's fault.
"""

from __future__ import annotations

from collections.abc import Mapping

from cri_shim.errors import invalid_argument


def require_label_keys(labels: Mapping[str, str], field: str) -> None:
    """INVALID_ARGUMENT when a label has an empty key."""
    if "" in labels:
        raise invalid_argument(f"{field} has a label with an empty key")


__all__ = ["require_label_keys"]
