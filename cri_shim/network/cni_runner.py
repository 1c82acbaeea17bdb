"""Running a network's CNI plugin chain: stdin, environment, plugin lookup,
failures as CniError (see `cni.py` for the whole flow)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cri_shim.logs import log_event
from cri_shim.network.cni_config import NetworkConfig
from cri_shim.network.cni_types import (
    _SAFE_NAME,
    SUPPORTED_VERSIONS,
    CniError,
    _passes_prev_result_on_del,
)
from cri_shim.network.command import CommandTimeout, run_command

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------
# Running plugins


@dataclass(frozen=True)
class NetworkChain:
    """A plugin chain as it is executed: from the config on disk, or from the cache."""

    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...]
    disable_check: bool = False

    @classmethod
    def from_config(cls, config: NetworkConfig) -> NetworkChain:
        return cls(
            name=config.name,
            cni_version=config.cni_version,
            plugins=config.plugins,
            disable_check=bool(config.raw.get("disableCheck", False)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cniVersion": self.cni_version,
            "disableCheck": self.disable_check,
            "plugins": list(self.plugins),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NetworkChain:
        return cls(
            name=str(data["name"]),
            cni_version=str(data["cniVersion"]),
            plugins=tuple(dict(p) for p in data["plugins"]),
            disable_check=bool(data.get("disableCheck", False)),
        )

    def validate(self) -> None:
        if self.cni_version not in SUPPORTED_VERSIONS:
            raise CniError(
                f"network {self.name}: cniVersion {self.cni_version or '(none)'!r} is not "
                f"supported (supported: {', '.join(SUPPORTED_VERSIONS)})"
            )
        if not _SAFE_NAME.match(self.name):
            raise CniError(f"network name {self.name!r} is not a valid CNI network name")


@dataclass(frozen=True)
class Attachment:
    """Everything besides the config that one ADD/DEL/CHECK of a chain is given."""

    container_id: str
    netns: str
    ifname: str
    cni_args: tuple[tuple[str, str], ...]
    capability_args: Mapping[str, Any]
    pod: str = ""


def plugin_stdin(
    chain: NetworkChain,
    plugin: Mapping[str, Any],
    prev_result: Mapping[str, Any] | None,
    capability_args: Mapping[str, Any],
) -> dict[str, Any]:
    """The JSON a plugin reads: its own config, the list's name and version,
    the previous result, and the runtime values of the capabilities it declares."""
    conf = dict(plugin)
    conf["name"] = chain.name
    conf["cniVersion"] = chain.cni_version
    if prev_result is not None:
        conf["prevResult"] = dict(prev_result)
    declared = plugin.get("capabilities")
    if isinstance(declared, dict):
        runtime = {
            key: value for key, value in capability_args.items() if declared.get(key) is True
        }
        if runtime:
            existing = conf.get("runtimeConfig")
            conf["runtimeConfig"] = {**(existing if isinstance(existing, dict) else {}), **runtime}
    return conf


def _plugin_failure(
    plugin: str, command: str, returncode: int, stdout: bytes, stderr: bytes
) -> CniError:
    """The plugin's own error JSON, kept verbatim; stderr when it printed none."""
    try:
        data = json.loads(stdout)
    except ValueError:
        data = None
    if isinstance(data, dict) and ("msg" in data or "code" in data):
        code = data.get("code")
        msg = str(data.get("msg", ""))
        details = str(data.get("details", "") or "")
        text = f"plugin {plugin} failed (code {code}): {msg}"
        if details:
            text += f" ({details})"
        return CniError(
            text,
            plugin=plugin,
            command=command,
            code=code if isinstance(code, int) else None,
            msg=msg,
            details=details,
        )
    output = (stderr or stdout).decode(errors="replace").strip()[-2000:]
    return CniError(
        f"plugin {plugin} failed (exit status {returncode}): {output or 'no output'}",
        plugin=plugin,
        command=command,
    )


def _find_plugin(plugin_type: str, bin_dirs: Sequence[str]) -> str | None:
    for directory in bin_dirs:
        candidate = os.path.join(directory, plugin_type)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


class CniRunner:
    """Executes plugin chains; knows nothing about pods, caches or locks."""

    def __init__(self, bin_dirs: Sequence[str], timeout: float = 60.0) -> None:
        self.bin_dirs = tuple(bin_dirs)
        self.timeout = timeout

    async def invoke(
        self,
        command: str,
        conf: Mapping[str, Any],
        attachment: Attachment,
    ) -> dict[str, Any] | None:
        """Run one plugin; its parsed stdout for ADD, None otherwise."""
        plugin_type = str(conf.get("type", ""))
        if not _SAFE_NAME.match(plugin_type):
            raise CniError(f"plugin type {plugin_type!r} is not a valid plugin name")
        binary = await asyncio.to_thread(_find_plugin, plugin_type, self.bin_dirs)
        if binary is None:
            raise CniError(
                f"plugin {plugin_type} not found in {':'.join(self.bin_dirs)}",
                plugin=plugin_type,
                command=command,
            )
        env = dict(os.environ)
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        env.update(
            {
                "CNI_COMMAND": command,
                "CNI_CONTAINERID": attachment.container_id,
                "CNI_NETNS": attachment.netns,
                "CNI_IFNAME": attachment.ifname,
                "CNI_ARGS": ";".join(f"{k}={v}" for k, v in attachment.cni_args),
                "CNI_PATH": ":".join(self.bin_dirs),
            }
        )
        started = time.monotonic()
        try:
            result = await run_command(
                [binary], input=json.dumps(conf).encode(), env=env, timeout=self.timeout
            )
        except CommandTimeout:
            raise CniError(
                f"plugin {plugin_type} did not finish {command} within {self.timeout:g}s "
                "and was killed",
                plugin=plugin_type,
                command=command,
            ) from None
        log_event(
            log,
            "cni plugin ran",
            level=logging.DEBUG,
            pod=attachment.container_id,
            plugin=plugin_type,
            command=command,
            status=result.returncode,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
            stderr=result.stderr.decode(errors="replace").strip()[-500:],
        )
        if not result.ok:
            raise _plugin_failure(
                plugin_type, command, result.returncode, result.stdout, result.stderr
            )
        if command != "ADD" or not result.stdout.strip():
            return None
        try:
            output = json.loads(result.stdout)
        except ValueError as err:
            raise CniError(
                f"plugin {plugin_type} printed a result that is not JSON: {err}",
                plugin=plugin_type,
                command=command,
            ) from err
        if not isinstance(output, dict):
            raise CniError(f"plugin {plugin_type} printed a result that is not a JSON object")
        return output

    async def add(self, chain: NetworkChain, attachment: Attachment) -> dict[str, Any]:
        """ADD through the chain, each plugin seeing the previous one's result."""
        chain.validate()
        result: dict[str, Any] | None = None
        for plugin in chain.plugins:
            conf = plugin_stdin(chain, plugin, result, attachment.capability_args)
            try:
                output = await self.invoke("ADD", conf, attachment)
            except CniError as err:
                err.partial_result = result
                raise
            if output is not None:
                result = output
        if result is None:
            raise CniError(f"network {chain.name}: no plugin returned a result")
        return result

    async def delete(
        self,
        chain: NetworkChain,
        attachment: Attachment,
        prev_result: Mapping[str, Any] | None,
        *,
        best_effort: bool = False,
    ) -> None:
        """DEL through the chain in reverse; stop at the first error unless best effort."""
        chain.validate()
        if not _passes_prev_result_on_del(chain.cni_version):
            prev_result = None
        first_error: CniError | None = None
        for plugin in reversed(chain.plugins):
            conf = plugin_stdin(chain, plugin, prev_result, attachment.capability_args)
            try:
                await self.invoke("DEL", conf, attachment)
            except CniError as err:
                if not best_effort:
                    raise
                first_error = first_error or err
                log_event(
                    log,
                    "cni rollback step failed",
                    level=logging.WARNING,
                    pod=attachment.container_id,
                    plugin=err.plugin,
                    error=str(err),
                )
        if first_error is not None:
            log_event(
                log,
                "cni rollback incomplete",
                level=logging.WARNING,
                pod=attachment.container_id,
                network=chain.name,
            )

    async def check(
        self, chain: NetworkChain, attachment: Attachment, prev_result: Mapping[str, Any]
    ) -> None:
        """CHECK through the chain (in ADD order); raises on the first complaint."""
        chain.validate()
        if chain.disable_check or not _passes_prev_result_on_del(chain.cni_version):
            return
        for plugin in chain.plugins:
            conf = plugin_stdin(chain, plugin, prev_result, attachment.capability_args)
            await self.invoke("CHECK", conf, attachment)
