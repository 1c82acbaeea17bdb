"""Typed settings: defaults, then a TOML file, then environment, then flags.

One frozen object is built at start-up and passed down; nothing else reads the
environment or the config file. Unknown keys are refused by name so that a
typo in a node's config fails loudly instead of silently doing nothing.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
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
    # Bounds of one message of the Stream* list RPCs (containerd's defaults): at most this
    # many items, and this many bytes (kubelet's default max receive is 16 MiB).
    stream_batch_items: int = 5000
    stream_batch_bytes: int = 15 * 1024 * 1024
    # Largest gRPC message accepted, checked from its length prefix before it is read
    # (containerd's and kubelet's default); larger ones get RESOURCE_EXHAUSTED.
    max_recv_message_size: int = 16 * 1024 * 1024


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
    # Seconds an exec/attach/port-forward connection may pass without traffic (kubelet: 4 h);
    # 0 never closes an idle one.
    idle_timeout: float = 14400.0
    # Seconds a connection may take to send its request headers (and stay idle before it
    # upgrades); an exec/attach/port-forward session already running is not affected.
    header_timeout: float = 10.0
    # Open connections (sessions included); further ones get a 503. Lowered at start-up to
    # an eighth of RLIMIT_NOFILE so descriptors remain for the CRI socket and containerd.
    max_connections: int = 1000


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
    # With a private containerd and no usable config in conf_dir: write a bridge network
    # into <state_dir>/cni/net.d and use it. Bridge and subnet chosen to avoid the usual
    # defaults (cni0, docker0, 10.88/10.42/10.244, 172.17).
    default_network: bool = True
    default_bridge: str = "crishim0"
    default_subnet: str = "10.209.0.0/16"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Go duration strings, as containerd's and hosts.toml's settings take them
    (`0s`, `500ms`, `5s`, `1m30s`), in seconds."""
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {text!r}")
    return total


def format_duration(seconds: float) -> str:
    """A duration as Go's time.Duration prints it (`0s`, `500ms`, `2s`, `1m30s`)."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:g}s"
    if hours or minutes:
        text = f"{int(minutes)}m{text}"
    if hours:
        text = f"{int(hours)}h{text}"
    return text


@dataclass(frozen=True)
class RuntimeHandlerSettings:
    """One extra runtime handler (`[runtime.handlers.<name>]`), as containerd's
    `[...runtimes.<name>]` with the runc shim: pods asking for `<name>` run with
    this runc binary (the shim's `BinaryName` option)."""

    # runc executable (absolute path, or a name looked up on the shim's PATH).
    runc_binary: str = ""


@dataclass(frozen=True)
class RuntimeSettings:
    # "auto" picks systemd when the host runs systemd on a cgroup v2 hierarchy.
    cgroup_driver: str = "auto"
    sandbox_image: str = "registry.k8s.io/pause:3.9"
    default_runtime: str = "runc"
    # Pod and container annotations copied into the OCI spec (containerd's per-handler
    # `pod_annotations` / `container_annotations`): glob patterns of keys, none by default.
    # The runtime's own `io.kubernetes.cri.*` annotations always win over them.
    pod_annotations: tuple[str, ...] = ()
    container_annotations: tuple[str, ...] = ()
    # containerd's key and default: how long ExecSync waits, after the command exits,
    # for its output pipes to close (a background child may hold them); "0s" waits
    # as long as they stay open, as containerd does. A Go duration string.
    drain_exec_sync_io_timeout: str = "0s"

    @property
    def drain_exec_sync_io_seconds(self) -> float:
        return parse_duration(self.drain_exec_sync_io_timeout)

    # CheckpointContainer and restore through CRIU (containerd's `enable_criu`).
    enable_criu: bool = True
    # CreateContainer with a checkpoint archive's path as the image restores it
    # (containerd 2.0-2.3's `enable_experimental_restore_via_create`, CRI-O).
    restore_via_create: bool = True
    # Runtime handlers beside the default `runc` (RunPodSandbox's `runtime_handler`).
    handlers: Mapping[str, RuntimeHandlerSettings] = field(default_factory=dict)


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class RegistryMirrorSettings:
    """Old-style CRI mirror list (`[registry.mirrors."docker.io"]`), tried in order."""

    endpoint: tuple[str, ...] = ()


@dataclass(frozen=True)
class RegistryTlsSettings:
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    insecure_skip_verify: bool = False


@dataclass(frozen=True)
class RegistryAuthSettings:
    """Static credentials, used when a pull request carries none."""

    username: str = ""
    password: str = ""
    # base64 "user:password", as in a docker config.json.
    auth: str = ""
    identitytoken: str = ""


@dataclass(frozen=True)
class RegistryHostSettings:
    """Per registry host (`[registry.configs."host:port"]`), keyed by the host contacted."""

    tls: RegistryTlsSettings = field(default_factory=RegistryTlsSettings)
    auth: RegistryAuthSettings = field(default_factory=RegistryAuthSettings)


@dataclass(frozen=True)
class RegistrySettings:
    # Directory of containerd-style `<host>/hosts.toml` files; wins over `mirrors` for a host.
    config_path: str = ""
    # Hosts reached over https without verification, falling back to plain http.
    insecure_registries: tuple[str, ...] = ()
    # Seconds without a single byte from the registry before a pull is aborted.
    stall_timeout: float = 300.0
    max_concurrent_downloads: int = 3
    mirrors: Mapping[str, RegistryMirrorSettings] = field(default_factory=dict)
    configs: Mapping[str, RegistryHostSettings] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus /metrics and the /healthz, /livez probes, over plain HTTP."""

    enabled: bool = True
    # Loopback by default: the endpoint has no authentication.
    address: str = "127.0.0.1"
    # 0 binds a free port (tests); the bound port is `Shim.metrics_port`.
    port: int = 9438
    # As for streaming: seconds to send request headers, and open connections (lowered
    # at start-up to 1/32 of RLIMIT_NOFILE).
    header_timeout: float = 10.0
    max_connections: int = 64


@dataclass(frozen=True)
class Settings:
    state_dir: str = "/var/lib/cri-shim"
    server: ServerSettings = field(default_factory=ServerSettings)
    containerd: ContainerdSettings = field(default_factory=ContainerdSettings)
    streaming: StreamingSettings = field(default_factory=StreamingSettings)
    cni: CniSettings = field(default_factory=CniSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    log: LogSettings = field(default_factory=LogSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)


_CHOICES: dict[str, tuple[str, ...]] = {
    "runtime.cgroup_driver": ("auto", "systemd", "cgroupfs"),
    "log.level": ("debug", "info", "warning", "error"),
    "log.format": ("text", "json"),
}

_MiB = 1024 * 1024
_HOUR = 3600.0

# Inclusive bounds of numeric keys: outside them the setting cannot work, or is unsafe.
_RANGES: dict[str, tuple[float, float]] = {
    "server.shutdown_grace": (0.0, _HOUR),
    "server.stream_batch_items": (1, 1_000_000),
    "server.stream_batch_bytes": (1024, 64 * _MiB),
    "server.max_recv_message_size": (64 * 1024, 2047 * _MiB),
    "containerd.connect_timeout": (0.1, _HOUR),
    "containerd.health_interval": (0.1, _HOUR),
    "streaming.port": (0, 65535),
    "streaming.idle_timeout": (0.0, 30 * 24 * _HOUR),
    "streaming.header_timeout": (0.1, _HOUR),
    "streaming.max_connections": (1, 1_000_000),
    "cni.plugin_timeout": (0.1, _HOUR),
    "registry.stall_timeout": (0.1, 24 * _HOUR),
    "registry.max_concurrent_downloads": (1, 64),
    "metrics.port": (0, 65535),
    "metrics.header_timeout": (0.1, _HOUR),
    "metrics.max_connections": (1, 1_000_000),
}


# String keys that cannot work empty.
_NON_EMPTY = frozenset(
    {
        "state_dir",
        "server.socket",
        "containerd.address",
        "containerd.binary",
        "streaming.address",
        "cni.conf_dir",
        "runtime.sandbox_image",
        "runtime.default_runtime",
        "metrics.address",
    }
)
# containerd's own rule for namespace names.
_NAMESPACE = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")


def _check_range(key: str, value: Any) -> None:
    if key in _NON_EMPTY and not value:
        raise SettingsError(f"config key {key!r} must not be empty")
    if key == "containerd.namespace" and not _NAMESPACE.fullmatch(value):
        raise SettingsError(
            f"config key {key!r} must be a containerd namespace name "
            f"(letters and digits joined by '.', '_' or '-'), got {value!r}"
        )
    if key == "server.socket_mode":
        # The socket runs pods as root: group access at most, never others'.
        if not 0 <= value <= 0o770 or value & 0o007:
            raise SettingsError(
                f"config key {key!r} must give no access to others (at most 0o770), got 0o{value:o}"
            )
        return
    if key == "runtime.drain_exec_sync_io_timeout":
        try:
            parse_duration(value)
        except ValueError:
            raise SettingsError(
                f"config key {key!r} must be a Go duration such as '0s', '500ms' or '10s', "
                f"got {value!r}"
            ) from None
        return
    bounds = _RANGES.get(key)
    if bounds is None:
        return
    low, high = bounds
    if (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
        raise SettingsError(
            f"config key {key!r} must be between {low:g} and {high:g}, got {value!r}"
        )


# RuntimeClass handler names are DNS labels (Kubernetes validates them so).
_HANDLER_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def _check_handlers(handlers: Mapping[str, RuntimeHandlerSettings]) -> None:
    for name, handler in handlers.items():
        key = f"runtime.handlers.{_toml_key(name)}"
        if name == "runc" or not _HANDLER_NAME.fullmatch(name):
            raise SettingsError(
                f"config key {key!r}: a handler name must be a DNS label other than 'runc' "
                "(lower-case letters, digits and '-', at most 63)"
            )
        if not handler.runc_binary:
            raise SettingsError(f"config key {key + '.runc_binary'!r} must not be empty")


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


def _table_map_type(annotation: Any) -> type | None:
    """The value class of a `Mapping[str, SomeDataclass]` field (tables keyed by name), or None."""
    if typing.get_origin(annotation) not in (dict, Mapping):
        return None
    key_type, value_type = typing.get_args(annotation)
    if key_type is str and dataclasses.is_dataclass(value_type) and isinstance(value_type, type):
        return value_type
    return None


def _toml_key(name: str) -> str:
    """`docker.io` -> `"docker.io"`: how the key is written in TOML (and in our errors)."""
    if name and all(c.isascii() and (c.isalnum() or c in "-_") for c in name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _build_table_map(cls: type, value: Any, key: str) -> dict[str, Any]:
    """Tables keyed by a free-form name, such as `[registry.mirrors."docker.io"]`."""
    if not isinstance(value, Mapping):
        raise SettingsError(f"config key {key!r} must be a table")
    built: dict[str, Any] = {}
    for name, entry in value.items():
        entry_key = f"{key}.{_toml_key(name)}"
        if isinstance(entry, cls):
            built[name] = entry
        elif isinstance(entry, Mapping):
            built[name] = _build(cls, entry, entry_key + ".")
        else:
            raise SettingsError(f"config key {entry_key!r} must be a table")
    return built


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
        elif (entry_cls := _table_map_type(annotation)) is not None:
            kwargs[f.name] = _build_table_map(entry_cls, value, key)
            if key == "runtime.handlers":
                _check_handlers(kwargs[f.name])
        else:
            converted = _convert(value, annotation, key)
            allowed = _CHOICES.get(key)
            if allowed is not None and converted not in allowed:
                raise SettingsError(f"config key {key!r} must be one of {', '.join(allowed)}")
            _check_range(key, converted)
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
            elif _table_map_type(hints[f.name]) is None:
                # Name-keyed tables (registry.mirrors...) only come from the file.
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


def _render_table(obj: Any, path: tuple[str, ...], lines: list[str]) -> None:
    """Scalars of one table, then its sub-tables (`[a.b]`, `[a.b."key"]`) recursively."""
    hints = _field_types(type(obj))
    tables: list[tuple[tuple[str, ...], Any]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            tables.append(((*path, f.name), value))
        elif _table_map_type(hints[f.name]) is not None:
            tables += [((*path, f.name, _toml_key(k)), v) for k, v in value.items()]
        else:
            lines.append(f"{f.name} = {_toml_value(value, octal=f.name.endswith('_mode'))}")
    for sub_path, table in tables:
        lines += ["", f"[{'.'.join(sub_path)}]"]
        _render_table(table, sub_path, lines)


def render_toml(settings: Settings) -> str:
    """The settings as a TOML document that `load` reads back unchanged."""
    lines: list[str] = []
    _render_table(settings, (), lines)
    return "\n".join(lines) + "\n"


_SECRET_KEYS = frozenset({"password", "auth", "identitytoken"})


def _redacted(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: "<redacted>" if k in _SECRET_KEYS and isinstance(v, str) and v else _redacted(v)
            for k, v in value.items()
        }
    return value


def as_dict(settings: Settings) -> dict[str, Any]:
    """The settings as plain data, registry secrets redacted (it is shown by `crictl info`)."""
    data: dict[str, Any] = _redacted(dataclasses.asdict(settings))
    return data


__all__ = [
    "CniSettings",
    "ContainerdSettings",
    "LogSettings",
    "MetricsSettings",
    "RegistryAuthSettings",
    "RegistryHostSettings",
    "RegistryMirrorSettings",
    "RegistrySettings",
    "RegistryTlsSettings",
    "RuntimeHandlerSettings",
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
