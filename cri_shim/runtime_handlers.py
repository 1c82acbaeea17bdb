"""Runtime handlers: the default `runc` and those of `[runtime.handlers.<name>]`.

Each names a runc binary the runc shim runs (its `BinaryName` option). What a
handler can do is asked of that runc once at start-up (`runc features`, the
JSON containerd 2.x introspects through the shim): user namespaces for pods
need runc to know the user namespace and id-mapped mounts (runc 1.2+), and a
kernel that id-maps overlayfs layers and bind mounts (Linux 5.19+).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

from cri_shim.logs import log_event
from cri_shim.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_HANDLER = "runc"
# Id-mapped mounts on overlayfs layers (the rootfs) arrived in Linux 5.19.
IDMAP_KERNEL = (5, 19)
FEATURES_TIMEOUT = 10.0


@dataclass(frozen=True)
class RuntimeHandler:
    name: str
    # "" runs the shim's default runc (`runc` on the runc shim's PATH).
    runc_binary: str
    user_namespaces: bool = False
    # Why user namespaces are not available ("" when they are).
    userns_problem: str = ""
    # Where the runc was found (or the name that was not).
    runc_path: str = ""


def kernel_version(release: str | None = None) -> tuple[int, int]:
    parts = (release or os.uname().release).split("-")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def userns_problem(features: dict[str, Any] | None, kernel: tuple[int, int]) -> str:
    """ "" when runc's features and the kernel allow pod user namespaces, else why not."""
    if features is None:
        return "runc has no `features` command (runc 1.2 or newer is needed)"
    linux = features.get("linux") or {}
    if "user" not in (linux.get("namespaces") or []):
        return "runc does not support user namespaces"
    idmap = ((linux.get("mountExtensions") or {}).get("idmap") or {}).get("enabled")
    if not idmap:
        return "runc cannot make id-mapped mounts (runc 1.2 or newer is needed)"
    if kernel < IDMAP_KERNEL:
        return (
            f"kernel {kernel[0]}.{kernel[1]} cannot id-map overlayfs layers "
            f"(Linux {IDMAP_KERNEL[0]}.{IDMAP_KERNEL[1]} or newer is needed)"
        )
    return ""


async def runc_features(binary: str) -> tuple[dict[str, Any] | None, str, str]:
    """(`runc features` JSON or None, the runc path, why it could not be run or "")."""
    path = await asyncio.to_thread(shutil.which, binary)
    if path is None:
        return None, binary, f"{binary} not found"
    try:
        process = await asyncio.create_subprocess_exec(
            path,
            "features",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError as err:
        return None, path, f"{path}: {err.strerror or err}"
    try:
        out, _ = await asyncio.wait_for(process.communicate(), FEATURES_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        return None, path, f"{path} features timed out"
    if process.returncode != 0:
        return None, path, ""
    try:
        data = json.loads(out)
    except ValueError:
        return None, path, ""
    return (data if isinstance(data, dict) else None), path, ""


async def probe(name: str, runc_binary: str, kernel: tuple[int, int]) -> RuntimeHandler:
    features, path, error = await runc_features(runc_binary or "runc")
    problem = error or userns_problem(features, kernel)
    return RuntimeHandler(name, runc_binary, not problem, problem, runc_path=path)


async def probe_handlers(settings: Settings) -> dict[str, RuntimeHandler]:
    """Every handler by name, "" (the default) included."""
    kernel = kernel_version()
    configured = {DEFAULT_HANDLER: ""} | {
        name: handler.runc_binary for name, handler in settings.runtime.handlers.items()
    }
    found = await asyncio.gather(*(probe(n, b, kernel) for n, b in configured.items()))
    handlers = {h.name: h for h in found}
    for handler in found:
        log_event(
            log,
            "runtime handler",
            handler=handler.name,
            runc=handler.runc_path,
            user_namespaces=handler.user_namespaces,
            userns_problem=handler.userns_problem,
        )
    default = settings.runtime.default_runtime
    handlers[""] = handlers.get(default, handlers[DEFAULT_HANDLER])
    return handlers


__all__ = ["RuntimeHandler", "kernel_version", "probe_handlers", "runc_features", "userns_problem"]
