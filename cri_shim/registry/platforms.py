"""Choosing an index entry for a platform, with containerd's compatibility rules.

containerd's `platforms.Default()` on Linux accepts the host's exact platform
and then older variants of the same CPU family (arm64 can run arm/v8..v5, an
arm/v7 host arm/v6 and v5), preferring the closest. Matching is done on
normalised names so `aarch64`, `arm64/v8` and `arm64` are one platform.
"""

from __future__ import annotations

from collections.abc import Sequence

from cri_shim.registry.types import Descriptor, Platform


def normalize(platform: Platform) -> Platform:
    """Canonical os/arch/variant spelling (containerd's platforms.Normalize)."""
    os_name = platform.os.lower()
    if os_name == "macos":
        os_name = "darwin"
    arch, variant = platform.architecture.lower(), platform.variant.lower()
    if arch in ("i386",):
        arch, variant = "386", ""
    elif arch in ("x86_64", "x86-64", "amd64"):
        arch = "amd64"
        if variant == "v1":
            variant = ""
    elif arch in ("aarch64", "arm64"):
        arch = "arm64"
        if variant in ("8", "v8", "v8.0"):
            variant = ""
    elif arch == "armhf":
        arch, variant = "arm", "v7"
    elif arch == "armel":
        arch, variant = "arm", "v6"
    elif arch == "arm":
        if variant in ("", "7"):
            variant = "v7"
        elif variant in ("5", "6", "8"):
            variant = "v" + variant
    return Platform(os_name, arch, variant, platform.os_version)


def compatible(host: Platform) -> list[Platform]:
    """Normalised platforms `host` runs, best first."""
    base = normalize(host)
    found = [base]
    if base.architecture == "arm64":
        found += [Platform(base.os, "arm", f"v{n}") for n in (8, 7, 6, 5)]
    elif base.architecture == "arm" and base.variant.startswith("v"):
        try:
            level = int(base.variant[1:])
        except ValueError:
            level = 0
        found += [Platform(base.os, "arm", f"v{n}") for n in range(level - 1, 4, -1)]
    return found


def _key(p: Platform) -> tuple[str, str, str]:
    return (p.os, p.architecture, p.variant)


def select(entries: Sequence[Descriptor], host: Platform) -> Descriptor | None:
    """The best entry for `host`: closest compatible platform, then exact variant
    spelling, then index order. Entries without a platform are not chosen."""
    ranks = {_key(p): i for i, p in enumerate(compatible(host))}
    best: tuple[int, int, int] | None = None
    chosen: Descriptor | None = None
    for position, entry in enumerate(entries):
        if entry.platform is None:
            continue
        rank = ranks.get(_key(normalize(entry.platform)))
        if rank is None:
            continue
        inexact = int(entry.platform.variant != host.variant)
        score = (rank, inexact, position)
        if best is None or score < best:
            best, chosen = score, entry
    return chosen


__all__ = ["compatible", "normalize", "select"]
