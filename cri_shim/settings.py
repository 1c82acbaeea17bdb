"""Typed settings: defaults, then a TOML file, then environment, then flags.

One frozen object is built at start-up and passed down; nothing else reads the
environment or the config file. Unknown keys are refused by name so that a
typo in a node's config fails loudly instead of silently doing nothing.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "CRI_SHIM_"


class SettingsError(ValueError):
    """A configuration problem, reported to the operator as one line."""


@dataclass(frozen=True)
class ServerSettings:
    socket: str = "/run/cri-shim/cri-shim.sock"
    socket_mode: int = 0o660
    # Seconds in-flight calls get to finish after SIGTERM before they are cancelled.
    shutdown_grace: float = 10.0


@dataclass(frozen=True)
class ContainerdSettings:
    address: str = "/run/containerd/containerd.sock"
    namespace: str = "k8s.io"
    # Start a private containerd under the state dir when none answers at `address`.
    embedded: bool = True
    binary: str = "containerd"
    connect_timeout: float = 5.0
    # How often the shim checks that containerd still answers.
    health_interval: float = 1.0


@dataclass(frozen=True)
class StreamingSettings:
    address: str = "127.0.0.1"
    port: int = 0
    tls_cert_file: str = ""
    tls_key_file: str = ""


@dataclass(frozen=True)
class CniSettings:
    conf_dir: str = "/etc/cni/net.d"
    bin_dirs: tuple[str, ...] = ("/opt/cni/bin", "/usr/lib/cni")
    # Pod network namespaces are pinned here; the default is where `ip netns` looks.
    netns_dir: str = "/var/run/netns"
    # Seconds one plugin invocation may take before it is killed.
    plugin_timeout: float = 60.0
    # ADD results kept for DEL after a restart; "" means <state_dir>/cni-cache.
    cache_dir: str = ""


@dataclass(frozen=True)
class RuntimeSettings:
    # "auto" picks systemd when the host runs systemd on a cgroup v2 hierarchy.
    cgroup_driver: str = "auto"
    sandbox_image: str = "registry.k8s.io/pause:3.9"
    default_runtime: str = "runc"


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus /metrics and the /healthz, /livez probes, over plain HTTP."""

    enabled: bool = True
    # Loopback by default: the endpoint has no authentication.
    address: str = "127.0.0.1"
    # 0 binds a free port (tests); the bound port is `Shim.metrics_port`.
    port: int = 9438


@dataclass(frozen=True)
class Settings:
    state_dir: str = "/var/lib/cri-shim"
    server: ServerSettings = field(default_factory=ServerSettings)
    containerd: ContainerdSettings = field(default_factory=ContainerdSettings)
    streaming: StreamingSettings = field(default_factory=StreamingSettings)
    cni: CniSettings = field(default_factory=CniSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    log: LogSettings = field(default_factory=LogSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)


_CHOICES: dict[str, tuple[str, ...]] = {
    "runtime.cgroup_driver": ("auto", "systemd", "cgroupfs"),
    "log.level": ("debug", "info", "warning", "error"),
    "log.format": ("text", "json"),
}


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Coerce a TOML, env or flag value to the field's declared type."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                pass
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part]
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
    type_name = getattr(annotation, "__name__", str(annotation))
    raise SettingsError(f"config key {key!r}: expected {type_name}, got {value!r}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise SettingsError(f"unknown config key {prefix + key!r}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        annotation = hints[f.name]
        value = data[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, Mapping):
                raise SettingsError(f"config key {key!r} must be a table")
            kwargs[f.name] = _build(annotation, value, key + ".")  # type: ignore[arg-type]
        else:
            converted = _convert(value, annotation, key)
            allowed = _CHOICES.get(key)
            if allowed is not None and converted not in allowed:
                raise SettingsError(f"config key {key!r} must be one of {', '.join(allowed)}")
            kwargs[f.name] = converted
    return cls(**kwargs)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _nest(dotted: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def known_keys() -> list[str]:
    """Every dotted key, in declaration order; used for env lookup and docs."""
    keys: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = _field_types(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], prefix + f.name + ".")
            else:
                keys.append(prefix + f.name)

    walk(Settings, "")
    return keys


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """CRI_SHIM_CONTAINERD_ADDRESS=... sets containerd.address, and so on."""
    found: dict[str, Any] = {}
    for key in known_keys():
        name = ENV_PREFIX + key.replace(".", "_").upper()
        if name in environ:
            found[key] = environ[name]
    return found


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as err:
        raise SettingsError(f"cannot read config file {path}: {err.strerror or err}") from err
    except tomllib.TOMLDecodeError as err:
        raise SettingsError(f"config file {path} is not valid TOML: {err}") from err


def load(
    config_file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Settings from defaults < TOML file < environment < explicit overrides (flags)."""
    data: dict[str, Any] = {}
    if config_file is not None:
        data = read_toml(config_file)
    data = _merge(data, _nest(env_overrides(os.environ if environ is None else environ)))
    if overrides:
        data = _merge(data, _nest(overrides))
    settings: Settings = _build(Settings, data, "")
    return settings


def _toml_value(value: Any, *, octal: bool = False) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"0o{value:o}" if octal else str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_toml(settings: Settings) -> str:
    """The settings as a TOML document that `load` reads back unchanged."""
    hints = _field_types(Settings)
    lines = [
        f"{f.name} = {_toml_value(getattr(settings, f.name))}"
        for f in dataclasses.fields(settings)
        if not dataclasses.is_dataclass(hints[f.name])
    ]
    for f in dataclasses.fields(settings):
        if dataclasses.is_dataclass(hints[f.name]):
            section = getattr(settings, f.name)
            lines += ["", f"[{f.name}]"]
            for sub in dataclasses.fields(section):
                value = getattr(section, sub.name)
                lines.append(f"{sub.name} = {_toml_value(value, octal=sub.name.endswith('_mode'))}")
    return "\n".join(lines) + "\n"


def as_dict(settings: Settings) -> dict[str, Any]:
    return dataclasses.asdict(settings)


__all__ = [
    "CniSettings",
    "ContainerdSettings",
    "LogSettings",
    "MetricsSettings",
    "RuntimeSettings",
    "ServerSettings",
    "Settings",
    "SettingsError",
    "StreamingSettings",
    "as_dict",
    "known_keys",
    "load",
    "render_toml",
]

