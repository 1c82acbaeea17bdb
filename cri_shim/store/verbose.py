"""The verbose `info` of ContainerStatus and PodSandboxStatus, in containerd 2.x's shape.

crictl inspect / inspectp print this JSON, and operators and scripts read it by
containerd's keys (`.info.runtimeSpec`, `.info.config`, `.info.cniResult`...).
It is built here as containerd 2.4's CRI builds it (internal/cri/server
container_status.go `ContainerInfo`, podsandbox/types `SandboxInfo`), encoded as
Go's encoding/json encodes those structs: CRI messages by their protoc-gen-go
json tags (proto field names, omitempty, enums as numbers, env values as text),
compact output with Go's HTML escaping.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, cast

import betterproto2

from cri_shim.gen.runtime import v1 as cri

if TYPE_CHECKING:  # types only: the store does not depend on the domain code
    from cri_shim.store.containers import Container
    from cri_shim.store.sandboxes import Sandbox

# go-cni names the pod's interface with this prefix and index 0.
DEFAULT_INTERFACE = "eth0"
_DNS_KEYS = ("nameservers", "domain", "search", "options")  # CNI types.DNS, omitempty
_GO_ESCAPES = {c: f"\\u{ord(c):04x}" for c in "<>&\u2028\u2029"}


def go_json(value: Any) -> str:
    """`value` as Go's json.Marshal writes it: compact, UTF-8 kept, HTML characters
    escaped (these can only occur inside strings, so replacing them is safe)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if any(c in text for c in _GO_ESCAPES):
        for char, escaped in _GO_ESCAPES.items():
            text = text.replace(char, escaped)
    return text


def _empty(value: Any) -> bool:
    """Go's omitempty for the kinds a protoc-gen-go struct has (a set message is kept)."""
    return value is None or (not isinstance(value, betterproto2.Message) and not value)


def _go_value(value: Any) -> Any:
    if isinstance(value, betterproto2.Message):
        return go_message(value)
    if isinstance(value, IntEnum):
        return int(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, list):
        return [_go_value(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _go_value(value[key]) for key in sorted(value)}
    return value


def go_message(message: betterproto2.Message) -> dict[str, Any]:
    """A CRI (or containerd) message as encoding/json writes its protoc-gen-go struct."""
    if isinstance(message, cri.KeyValue):
        # cri-api's KeyValue.MarshalJSON: the value as text (invalid UTF-8 replaced).
        pair = {"key": message.key, "value": message.value.decode(errors="replace")}
        return {k: v for k, v in pair.items() if v}
    out: dict[str, Any] = {}
    for field in dataclasses.fields(cast(Any, message)):
        value = getattr(message, field.name)
        if not _empty(value):
            out[field.name] = _go_value(value)
    return out


# specs-go booleans tagged omitempty that cri-shim's specs write even when false.
_OMITTED_WHEN_FALSE = (
    ("process", "noNewPrivileges"),
    ("process", "terminal"),
    ("root", "readonly"),
)


def go_spec(spec: Mapping[str, Any] | None) -> Any:
    """The stored OCI spec as containerd prints it: decoded into specs-go's Spec and
    encoded again, which drops the false booleans tagged omitempty."""
    if spec is None:
        return None
    out = dict(spec)
    for section, key in _OMITTED_WHEN_FALSE:
        part = out.get(section)
        if isinstance(part, dict) and part.get(key) is False:
            out[section] = {k: v for k, v in part.items() if k != key}
    return out


@dataclass(frozen=True)
class RuntimeIdentity:
    """What containerd's container record says of how a container runs: the same
    for every container and pod cri-shim creates."""

    runtime_type: str
    runtime_options: Any  # as containerd prints them; None when none are set
    snapshotter: str

    @classmethod
    def of(
        cls, runtime_type: str, options: betterproto2.Message | None, snapshotter: str
    ) -> RuntimeIdentity:
        """containerd's getRuntimeOptions: no options (or an empty encoding) → null."""
        printed = go_message(options) if options is not None and bytes(options) else None
        return cls(runtime_type, printed, snapshotter)


# What cri-shim gives containerd for every container: runc v2, no runc options set
# (the server passes its own when options are set, e.g. SystemdCgroup), overlayfs.
RUNC_IDENTITY = RuntimeIdentity("io.containerd.runc.v2", None, "overlayfs")


def container_info(
    container: Container, spec: Mapping[str, Any] | None, runtime: RuntimeIdentity
) -> dict[str, Any]:
    """containerd's ContainerInfo, key for key."""
    return {
        "sandboxID": container.sandbox_id,
        "pid": container.pid,
        "removing": container.removing,
        "snapshotKey": container.id,
        "snapshotter": runtime.snapshotter,
        "runtimeType": runtime.runtime_type,
        "runtimeOptions": runtime.runtime_options,
        "config": go_message(container.config),
        "runtimeSpec": go_spec(spec),
    }


def cni_result(results: list[Mapping[str, Any]]) -> dict[str, Any]:
    """go-cni's Result for the CNI results of a pod's networks, as containerd keeps it:
    interfaces by name (eth0 always present), each IP on its interface (eth0 when
    the result names none), one DNS entry per network, all routes."""
    interfaces: dict[str, dict[str, Any]] = {DEFAULT_INTERFACE: _interface({})}
    dns: list[dict[str, Any]] = []
    routes: list[Any] = []
    for result in results:
        listed = [i for i in result.get("interfaces") or [] if isinstance(i, Mapping)]
        for entry in listed:
            interfaces[str(entry.get("name", ""))] = _interface(entry)
        for ip in result.get("ips") or []:
            index = ip.get("interface")
            name = DEFAULT_INTERFACE
            if isinstance(index, int) and 0 <= index < len(listed):
                name = str(listed[index].get("name", ""))
            configs = interfaces.setdefault(name, _interface({}))
            if configs["IPConfigs"] is None:
                configs["IPConfigs"] = []
            configs["IPConfigs"].append(
                {
                    "IP": str(ip.get("address", "")).split("/")[0],
                    "Gateway": str(ip.get("gateway") or ""),
                }
            )
        raw_dns = result.get("dns")
        raw_dns = raw_dns if isinstance(raw_dns, Mapping) else {}
        dns.append({k: raw_dns[k] for k in _DNS_KEYS if raw_dns.get(k)})
        routes.extend(result.get("routes") or [])
    return {
        "Interfaces": {name: interfaces[name] for name in sorted(interfaces)},
        "DNS": dns or None,
        "Routes": routes or None,
    }


def _interface(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "IPConfigs": None,
        "Mac": str(entry.get("mac", "")),
        "Sandbox": str(entry.get("sandbox", "")),
        "PciID": str(entry.get("pciID", "")),
        "SocketPath": str(entry.get("socketPath", "")),
    }


def sandbox_info(sandbox: Sandbox, runtime: RuntimeIdentity) -> dict[str, Any]:
    """containerd's SandboxInfo, key for key (overhead/resources only come from
    UpdatePodSandboxResources, which cri-shim does not implement)."""
    config = go_message(sandbox.config)
    result = cni_result([sandbox.cni_result]) if sandbox.cni_result else None
    return {
        "pid": sandbox.pid,
        "processStatus": sandbox.process_status(),
        "netNamespaceClosed": sandbox.netns_closed(),
        "image": sandbox.image,
        "snapshotKey": sandbox.id,
        "snapshotter": runtime.snapshotter,
        "runtimeType": runtime.runtime_type,
        "runtimeOptions": runtime.runtime_options,
        "config": config,
        "runtimeSpec": go_spec(sandbox.spec),
        "cniResult": result,
        "sandboxMetadata": {
            "Version": "v1",
            "Metadata": {
                "ID": sandbox.id,
                "Name": sandbox.name,
                "Config": config,
                "NetNSPath": sandbox.netns_path,
                "IP": sandbox.ip,
                "AdditionalIPs": list(sandbox.additional_ips) or None,
                "RuntimeHandler": sandbox.runtime_handler,
                "CNIResult": result,
                "ProcessLabel": "",
            },
        },
    }
