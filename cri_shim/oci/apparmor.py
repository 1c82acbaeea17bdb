"""AppArmor: whether the host has it, and containerd's default profile.

On an AppArmor host containerd confines every unprivileged container that
asks for no profile (or RuntimeDefault) with `cri-containerd.apparmor.d`,
which it generates from its template and loads with `apparmor_parser` when
the kernel does not have it yet. cri-shim does the same, with the same
detection (`/sys/kernel/security/apparmor` present and the module enabled)
and the same rules; on a host without AppArmor only Unconfined is accepted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from cri_shim.logs import log_event

log = logging.getLogger(__name__)

DEFAULT_PROFILE = "cri-containerd.apparmor.d"
# Seconds apparmor_parser may take to load the profile.
PARSER_TIMEOUT = 60.0


def host_supports(root: Path = Path("/")) -> bool:
    """containerd's (and runc's) test: securityfs has apparmor and the module is enabled."""
    if not (root / "sys/kernel/security/apparmor").exists():
        return False
    try:
        enabled = (root / "sys/module/apparmor/parameters/enabled").read_bytes()
    except OSError:
        return False
    return enabled[:1] == b"Y"


def profile_loaded(name: str, root: Path = Path("/")) -> bool:
    """Whether the kernel has `name` (lines of .../apparmor/profiles are `name (mode)`)."""
    try:
        text = (root / "sys/kernel/security/apparmor/profiles").read_text()
    except OSError:
        return False
    return any(line.rsplit(" (", 1)[0] == name for line in text.splitlines())


def parser_version(output: str) -> int:
    """`apparmor_parser --version` as containerd compares it (2.9.95 -> 209095)."""
    match = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", output)
    if match is None:
        return 0
    major, minor, patch = (int(part or 0) for part in match.groups())
    return major * 100000 + minor * 1000 + patch


def default_profile(
    name: str = DEFAULT_PROFILE,
    *,
    version: int,
    daemon_profile: str = "unconfined",
    tunables: bool = True,
    abstractions: bool = True,
) -> str:
    """The text of containerd's default profile (contrib/apparmor/template.go)."""
    lines = ["#include <tunables/global>" if tunables else "@{PROC}=/proc/", ""]
    lines.append(f"profile {name} flags=(attach_disconnected,mediate_deleted) {{")
    if abstractions:
        lines.append("  #include <abstractions/base>")
    lines += ["", "  network,", "  capability,", "  file,", "  umount,"]
    if version >= 208096:
        lines += [
            "  # Host (privileged) processes may send signals to container processes.",
            "  signal (receive) peer=unconfined,",
            "  # Manager may send signals to container processes.",
            f"  signal (receive) peer={daemon_profile},",
            "  # Container processes may send signals amongst themselves.",
            f"  signal (send,receive) peer={name},",
        ]
    lines += [
        "",
        "  deny @{PROC}/* w,   # deny write for all files directly in /proc (not in a subdir)",
        "  # deny write to files not in /proc/<number>/** or /proc/sys/**",
        "  deny @{PROC}/{[^1-9],[^1-9][^0-9],[^1-9s][^0-9y][^0-9s],"
        "[^1-9][^0-9][^0-9][^0-9/]*}/** w,",
        "  deny @{PROC}/sys/[^k]** w,  # deny /proc/sys except /proc/sys/k*",
        "  deny @{PROC}/sys/kernel/{?,??,[^s][^h][^m]**} w,  # everything but shm* there",
        "  deny @{PROC}/sysrq-trigger rwklx,",
        "  deny @{PROC}/kcore rwklx,",
        "",
        "  deny mount,",
        "",
        "  deny /sys/[^f]*/** wklx,",
        "  deny /sys/f[^s]*/** wklx,",
        "  deny /sys/fs/[^c]*/** wklx,",
        "  deny /sys/fs/c[^g]*/** wklx,",
        "  deny /sys/fs/cg[^r]*/** wklx,",
        "  deny /sys/firmware/** rwklx,",
        "  deny /sys/devices/virtual/powercap/** rwklx,",
        "  deny /sys/kernel/security/** rwklx,",
    ]
    if version >= 208095:
        lines += ["", f"  ptrace (trace,read,tracedby,readby) peer={name},"]
    lines += ["}", ""]
    return "\n".join(lines)


async def _run(*argv: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), PARSER_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        return -1, f"{argv[0]} did not finish within {PARSER_TIMEOUT:g}s"
    return process.returncode or 0, output.decode(errors="replace")


def _daemon_profile() -> str:
    """Our own profile (`name (mode)` in attr/current), as containerd names its own."""
    try:
        current = Path("/proc/self/attr/current").read_text().strip()
    except OSError:
        return "unconfined"
    return current.rsplit(" (", 1)[0] or "unconfined"


async def load_default_profile(name: str = DEFAULT_PROFILE) -> None:
    """Load the default profile unless the kernel has it; raises OSError with why not."""
    if await asyncio.to_thread(profile_loaded, name):
        return
    parser = shutil.which("apparmor_parser")
    if parser is None:
        raise OSError(f"AppArmor is enabled but apparmor_parser is not installed to load {name}")
    code, output = await _run(parser, "--version")
    version = parser_version(output) if code == 0 else 0
    text = default_profile(
        name,
        version=version,
        daemon_profile=await asyncio.to_thread(_daemon_profile),
        tunables=await asyncio.to_thread(os.path.exists, "/etc/apparmor.d/tunables/global"),
        abstractions=await asyncio.to_thread(os.path.exists, "/etc/apparmor.d/abstractions/base"),
    )

    def write() -> str:
        with tempfile.NamedTemporaryFile("w", prefix="cri-shim-apparmor-", delete=False) as out:
            out.write(text)
            return out.name

    path = await asyncio.to_thread(write)
    try:
        code, output = await _run(parser, "-Kr", path)
    finally:
        await asyncio.to_thread(os.unlink, path)
    if code != 0:
        raise OSError(f"apparmor_parser could not load {name}: {output.strip()}")
    log_event(log, "apparmor default profile loaded", profile=name)


async def detect() -> bool:
    """Whether containers get AppArmor profiles here; loads the default profile if so."""
    if not await asyncio.to_thread(host_supports):
        log_event(log, "apparmor not available on this host; only Unconfined is accepted")
        return False
    try:
        await load_default_profile()
    except OSError as err:
        # As in containerd, creating a container that needs the profile then fails.
        log_event(log, "apparmor default profile not loaded", level=logging.ERROR, error=err)
    return True


__all__ = [
    "DEFAULT_PROFILE",
    "default_profile",
    "detect",
    "host_supports",
    "load_default_profile",
    "parser_version",
    "profile_loaded",
]
