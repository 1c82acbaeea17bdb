"""Finding and validating the node's CNI network configuration.

Follows libcni's rules: files ending in .conf, .conflist or .json in the conf
dir, in lexical order, the first valid one wins. A single-plugin .conf is
treated as a list of one. NetworkReady is true exactly when one is found.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_SUFFIXES = (".conf", ".conflist", ".json")


class CniConfigError(Exception):
    """No usable network configuration; the message says what to fix."""


@dataclass(frozen=True)
class NetworkConfig:
    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...]
    source: Path
    raw: dict[str, Any] = field(compare=False, repr=False)

    @property
    def plugin_types(self) -> tuple[str, ...]:
        return tuple(str(p["type"]) for p in self.plugins)


def _parse(path: Path, bin_dirs: Sequence[str]) -> NetworkConfig:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise CniConfigError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise CniConfigError(f"{path}: top level must be a JSON object")
    if path.suffix == ".conflist" or "plugins" in data:
        plugins = data.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise CniConfigError(f"{path}: 'plugins' must be a non-empty list")
    else:
        plugins = [data]
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise CniConfigError(f"{path}: network 'name' is missing")
    for index, plugin in enumerate(plugins):
        if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str):
            raise CniConfigError(f"{path}: plugin #{index} has no 'type'")
        if bin_dirs and not any((Path(d) / plugin["type"]).is_file() for d in bin_dirs):
            raise CniConfigError(
                f"{path}: plugin binary {plugin['type']!r} not found in {', '.join(bin_dirs)}"
            )
    return NetworkConfig(
        name=name,
        cni_version=str(data.get("cniVersion", "")),
        plugins=tuple(plugins),
        source=path,
        raw=data,
    )


def load_network_config(conf_dir: Path, bin_dirs: Sequence[str] = ()) -> NetworkConfig:
    """The first valid network config in `conf_dir`, or CniConfigError saying why none is."""
    try:
        candidates = sorted(
            p for p in conf_dir.iterdir() if p.suffix in CONFIG_SUFFIXES and p.is_file()
        )
    except FileNotFoundError as err:
        raise CniConfigError(f"CNI config dir {conf_dir} does not exist") from err
    except OSError as err:
        raise CniConfigError(f"CNI config dir {conf_dir} is not readable: {err}") from err
    if not candidates:
        raise CniConfigError(f"no network config found in {conf_dir}")
    problems: list[str] = []
    for path in candidates:
        try:
            return _parse(path, bin_dirs)
        except CniConfigError as err:
            problems.append(str(err))
    raise CniConfigError("; ".join(problems))


def dir_signature(conf_dir: Path) -> tuple[tuple[str, int, int], ...]:
    """A cheap fingerprint of the conf dir, to re-read configs only when it changes."""
    try:
        entries = list(conf_dir.iterdir())
    except OSError:
        return ()
    signature = []
    for entry in entries:
        try:
            stat = entry.stat()
        except OSError:
            continue
        signature.append((entry.name, stat.st_mtime_ns, stat.st_size))
    return tuple(sorted(signature))
