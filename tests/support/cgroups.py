"""Which cgroup layout this host offers, as skip marks that say what is missing.

Tests that read a container's cgroup files are written per layout: the v1
variant runs on hosts with v1 controllers (these VMs: v1 plus a controller-less
cgroup2 at /sys/fs/cgroup/unified), the v2 variant where /sys/fs/cgroup is a
cgroup2 hierarchy offering the controllers the test reads.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cri_shim.host import CGROUP_ROOT, cgroup_v2_unified

V2_CONTROLLERS = ("cpu", "memory", "pids")


def v1_missing(root: Path = CGROUP_ROOT) -> str:
    """Why v1 controller files cannot be read here; "" when they can."""
    if cgroup_v2_unified(root):
        return f"reads cgroup v1 files; {root} is a cgroup v2 (unified) hierarchy on this host"
    missing = [c for c in ("cpu", "memory") if not (root / c).is_dir()]
    if missing:
        return f"reads cgroup v1 files; this host mounts no v1 {', '.join(missing)} hierarchy"
    return ""


def v2_missing(root: Path = CGROUP_ROOT) -> str:
    """Why containers here do not get cgroup v2 files; "" when they do."""
    if not cgroup_v2_unified(root):
        hybrid = root / "unified"
        where = ""
        if cgroup_v2_unified(hybrid):
            offered = (hybrid / "cgroup.controllers").read_text().split()
            where = f" (cgroup2 only at {hybrid}, controllers: {' '.join(offered) or 'none'})"
        return (
            f"needs {root} to be a cgroup v2 hierarchy; this host mounts cgroup v1 "
            f"controllers there{where}"
        )
    offered = (root / "cgroup.controllers").read_text().split()
    missing = [c for c in V2_CONTROLLERS if c not in offered]
    if missing:
        return f"the cgroup v2 hierarchy at {root} lacks the {', '.join(missing)} controller(s)"
    return ""


V1_ONLY = pytest.mark.skipif(bool(v1_missing()), reason=v1_missing() or "cgroup v1")
V2_ONLY = pytest.mark.skipif(bool(v2_missing()), reason=v2_missing() or "cgroup v2")

#: Parametrize a test over the two layouts; the one this host lacks is skipped.
LAYOUTS = (
    pytest.param("v1", marks=V1_ONLY, id="cgroup-v1"),
    pytest.param("v2", marks=V2_ONLY, id="cgroup-v2"),
)

__all__ = ["LAYOUTS", "V1_ONLY", "V2_ONLY", "v1_missing", "v2_missing"]
