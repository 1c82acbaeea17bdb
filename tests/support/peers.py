"""Where the test peers (crictl, critest, containerd 2.x, runc, kubelet) are.

Each comes from its environment variable (CRICTL, CRITEST, CONTAINERD2, ...) when
set, else from `tests/peers/build.sh <group>`, which builds the pinned version
once into a cache and prints `NAME=/abs/path` lines. A peer that cannot be had
is a test failure, never a skip: `deploy/setup-dev.sh` builds them all, so a
missing one means the machine was not set up, and a skipped check would hide it.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest

PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"
BUILD_SCRIPT = PEERS_DIR / "build.sh"
VERSIONS_FILE = PEERS_DIR / "versions.env"

# Variable name -> build.sh group that prints it.
GROUPS = {
    "CRICTL": "cri-tools",
    "CRITEST": "cri-tools",
    "CONTAINERD2": "containerd2",
    "CONTAINERD2_SHIM": "containerd2",
    "CONTAINERD2_CTR": "containerd2",
    "RUNC": "runc",
    "CRIU": "criu",
    "KUBELET": "kubelet",
}
# A cold build of a group takes minutes on a 2-core machine; a cached one, a second.
BUILD_TIMEOUT = 45 * 60


class PeerMissing(RuntimeError):
    pass


def versions() -> dict[str, str]:
    """The pinned peer versions (tests/peers/versions.env)."""
    pinned: dict[str, str] = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and not name.startswith("#"):
            pinned[name] = value
    return pinned


def parse_build_output(text: str) -> dict[str, str]:
    """`NAME=/abs/path` lines, as build.sh prints them."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name in GROUPS and value.startswith("/"):
            found[name] = value
    return found


@functools.cache
def _built(group: str) -> dict[str, str]:
    try:
        done = subprocess.run(
            ["bash", str(BUILD_SCRIPT), group],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise PeerMissing(f"{BUILD_SCRIPT} {group} did not finish: {err}") from err
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise PeerMissing(f"{BUILD_SCRIPT} {group} exited {done.returncode}:\n{tail}")
    return parse_build_output(done.stdout)


def peer_path(name: str) -> str:
    """The binary's absolute path; raises PeerMissing saying how to get it."""
    if name not in GROUPS:
        raise KeyError(name)
    path = os.environ.get(name) or _built(GROUPS[name]).get(name)
    hint = f"set ${name} or run deploy/setup-dev.sh (it runs tests/peers/build.sh)"
    if not path:
        raise PeerMissing(f"peer {name} not found: {hint}")
    if not os.access(path, os.X_OK):
        raise PeerMissing(f"peer {name}={path} is not an executable file: {hint}")
    return path


def require_peer(name: str) -> str:
    """peer_path for a test: a missing peer fails the test with one clear line."""
    try:
        return peer_path(name)
    except PeerMissing as err:
        pytest.fail(str(err), pytrace=False)
