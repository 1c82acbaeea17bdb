"""What a runtime handler can do, from `runc features` and the kernel: the real
Debian runc (1.1.5, no id-mapped mounts) and the peer runc (1.2+) are probed."""

from __future__ import annotations

from typing import Any

import pytest

from cri_shim.runtime_handlers import kernel_version, probe, userns_problem
from tests.support.peers import require_peer

CAPABLE: dict[str, Any] = {
    "linux": {"namespaces": ["user", "net"], "mountExtensions": {"idmap": {"enabled": True}}}
}


@pytest.mark.parametrize(
    ("features", "kernel", "problem"),
    [
        (CAPABLE, (6, 18), ""),
        (None, (6, 18), "runc 1.2 or newer"),
        ({"linux": {"namespaces": ["net"]}}, (6, 18), "does not support user namespaces"),
        ({"linux": {"namespaces": ["user"]}}, (6, 18), "cannot make id-mapped mounts"),
        (CAPABLE, (5, 15), "Linux 5.19 or newer"),
    ],
)
def test_userns_problem(
    features: dict[str, Any] | None, kernel: tuple[int, int], problem: str
) -> None:
    found = userns_problem(features, kernel)
    assert (found == "") if not problem else (problem in found)


def test_kernel_version_parses_releases() -> None:
    assert kernel_version("6.18.2-cloud-amd64") == (6, 18)
    assert kernel_version("garbage") == (0, 0)


async def test_probe_asks_the_real_runc_binaries() -> None:
    kernel = kernel_version()
    old = await probe("runc", "", kernel)  # Debian's runc on PATH
    assert not old.user_namespaces and "id-mapped" in old.userns_problem
    new = await probe("runc-current", require_peer("RUNC"), kernel)
    assert new.user_namespaces, new.userns_problem
    missing = await probe("gone", "/nonexistent/runc", kernel)
    assert not missing.user_namespaces and "not found" in missing.userns_problem
