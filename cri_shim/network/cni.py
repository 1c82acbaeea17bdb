"""Pod networking through CNI plugins, following the CNI spec (0.3.x, 0.4.0, 1.0.0).

`PodNetwork` is what the sandbox code calls: `setup` runs the network's plugin
chain for ADD inside the pod's namespace and returns the pod's IPs, `teardown`
runs it in reverse for DEL. The ADD result and the exact configuration used
are cached as a JSON file per (network, sandbox, interface), like libcni's
/var/lib/cni/results, because DEL must hand plugins the `prevResult` of the
ADD and must still work after the shim restarted, after the config on disk
changed or vanished, and after the namespace is gone.

A failed ADD leaves nothing behind: the whole chain is DELeted (best effort)
before the error is raised, so no IP allocation, veth or iptables rule leaks
into the next attempt. ADD and DEL for one sandbox never overlap; different
sandboxes run in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cri_shim.checkpoint import read_json, write_atomic, write_json
from cri_shim.keyed_locks import KeyedLocks
from cri_shim.logs import log_event
from cri_shim.network.cni_config import NetworkConfig
from cri_shim.network.command import CommandTimeout, run_command
from cri_shim.network.netns import (
    create_pod_netns,
    netns_exists,
    new_pin_name,
    remove_pod_netns,
)
from cri_shim.network.pod_cidr import PodCidrStore
from cri_shim.network.readiness import NetworkReadiness
from cri_shim.settings import Settings

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
DEFAULT_IFNAME = "eth0"
CACHE_KIND = "cri-shim/cni-attachment"
CACHE_FORMAT = 1

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class CniError(Exception):
    """A plugin (or the chain around it) failed; the message is fit for kubelet's events."""

    def __init__(
        self,
        message: str,
        *,
        plugin: str = "",
        command: str = "",
        code: int | None = None,
        msg: str = "",
        details: str = "",
    ) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.command = command
        self.code = code
        self.msg = msg
        self.details = details
        # ADD only: the last result the chain produced before failing, for the rollback DEL.
        self.partial_result: dict[str, Any] | None = None


class CniNotReady(CniError):
    """No usable network configuration; NetworkReady is false for the same reason."""


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _passes_prev_result_on_del(version: str) -> bool:
    """prevResult on DEL and CHECK arrived with spec 0.4.0."""
    return _version_tuple(version) >= (0, 4, 0)


# ----------------------------------------------------------------------------
# What the sandbox code passes in


@dataclass(frozen=True)
class PortMapping:
    protocol: str
    container_port: int
    host_port: int
    host_ip: str = ""

    def to_cni(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "hostPort": self.host_port,
            "containerPort": self.container_port,
            "protocol": (self.protocol or "tcp").lower(),
        }
        if self.host_ip:
            entry["hostIP"] = self.host_ip
        return entry


@dataclass(frozen=True)
class Bandwidth:
    """Traffic shaping for the `bandwidth` capability: rates in bit/s, bursts in bits."""

    ingress_rate: int = 0
    ingress_burst: int = 0
    egress_rate: int = 0
    egress_burst: int = 0

    def to_cni(self) -> dict[str, int]:
        values = {
            "ingressRate": self.ingress_rate,
            "ingressBurst": self.ingress_burst,
            "egressRate": self.egress_rate,
            "egressBurst": self.egress_burst,
        }
        return {key: value for key, value in values.items() if value > 0}


@dataclass(frozen=True)
class DnsConfig:
    """The pod's DNS settings for the `dns` capability."""

    servers: Sequence[str] = ()
    searches: Sequence[str] = ()
    options: Sequence[str] = ()

    def to_cni(self) -> dict[str, list[str]]:
        return {
            "servers": list(self.servers),
            "searches": list(self.searches),
            "options": list(self.options),
        }


@dataclass(frozen=True)
class PodNetworkRequest:
    sandbox_id: str
    name: str
    namespace: str
    uid: str
    netns_path: str
    port_mappings: Sequence[PortMapping] = ()
    bandwidth: Bandwidth | None = None
    dns: DnsConfig | None = None

    @property
    def pod(self) -> str:
        return f"{self.namespace}/{self.name}"


def cni_args(pod: PodNetworkRequest) -> tuple[tuple[str, str], ...]:
    """The CNI_ARGS kubelet's runtimes pass, in containerd's order."""
    return (
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", pod.namespace),
        ("K8S_POD_NAME", pod.name),
        ("K8S_POD_INFRA_CONTAINER_ID", pod.sandbox_id),
        ("K8S_POD_UID", pod.uid),
    )


def capability_args(pod: PodNetworkRequest, pod_cidrs: Sequence[str]) -> dict[str, Any]:
    """Values for the well-known capabilities; each reaches only plugins that declare it."""
    args: dict[str, Any] = {}
    mappings = [m.to_cni() for m in pod.port_mappings if m.host_port > 0]
    if mappings:
        args["portMappings"] = mappings
    if pod_cidrs:
        # One range set per CIDR: a dual-stack node gets an address from each family.
        args["ipRanges"] = [[{"subnet": cidr}] for cidr in pod_cidrs]
    if pod.bandwidth is not None and pod.bandwidth.to_cni():
        args["bandwidth"] = pod.bandwidth.to_cni()
    if pod.dns is not None:
        args["dns"] = pod.dns.to_cni()
    return args


# ----------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""


@dataclass(frozen=True)
class IPConfig:
    address: IPInterface
    gateway: IPAddress | None = None
    interface: int | None = None

    @property
    def ip(self) -> str:
        return str(self.address.ip)


@dataclass(frozen=True)
class Route:
    dst: IPNetwork
    gw: IPAddress | None = None


@dataclass(frozen=True)
class DnsResult:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


@dataclass(frozen=True)
class CniResult:
    cni_version: str
    interfaces: tuple[Interface, ...]
    ips: tuple[IPConfig, ...]
    routes: tuple[Route, ...]
    dns: DnsResult | None
    raw: dict[str, Any] = field(compare=False, repr=False)

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> CniResult:
        """Read a 0.3.x/0.4.0/1.0.0 result (the `version` field of 0.x ips is ignored)."""
        try:
            interfaces = tuple(
                Interface(
                    name=str(entry["name"]),
                    mac=str(entry.get("mac", "")),
                    sandbox=str(entry.get("sandbox", "")),
                )
                for entry in raw.get("interfaces") or []
            )
            ips = tuple(
                IPConfig(
                    address=ipaddress.ip_interface(entry["address"]),
                    gateway=ipaddress.ip_address(entry["gateway"])
                    if entry.get("gateway")
                    else None,
                    interface=int(entry["interface"])
                    if entry.get("interface") is not None
                    else None,
                )
                for entry in raw.get("ips") or []
            )
            routes = tuple(
                Route(
                    dst=ipaddress.ip_network(entry["dst"], strict=False),
                    gw=ipaddress.ip_address(entry["gw"]) if entry.get("gw") else None,
                )
                for entry in raw.get("routes") or []
            )
            dns_raw = raw.get("dns")
            dns = None
            if isinstance(dns_raw, dict) and dns_raw:
                dns = DnsResult(
                    nameservers=_strings(dns_raw.get("nameservers")),
                    domain=str(dns_raw.get("domain", "")),
                    search=_strings(dns_raw.get("search")),
                    options=_strings(dns_raw.get("options")),
                )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CniError(f"malformed CNI result ({type(err).__name__}: {err})") from err
        return cls(str(raw.get("cniVersion", "")), interfaces, ips, routes, dns, dict(raw))

    def pod_ips(self, ifname: str = DEFAULT_IFNAME) -> list[IPConfig]:
        """The IPs on `ifname` inside the sandbox, in the order the plugins gave them.

        Results without interface indexes (IPAM-style) fall back to every
        non-loopback IP.
        """
        on_interface = [
            ip
            for ip in self.ips
            if ip.interface is not None
            and 0 <= ip.interface < len(self.interfaces)
            and self.interfaces[ip.interface].name == ifname
            and self.interfaces[ip.interface].sandbox
        ]
        if on_interface:
            return on_interface
        return [ip for ip in self.ips if ip.interface is None and not ip.address.ip.is_loopback]


@dataclass(frozen=True)
class PodNetworkStatus:
    ip: str
    additional_ips: tuple[str, ...]
    interfaces: tuple[Interface, ...]
    result: CniResult

    @property
    def dns(self) -> DnsResult | None:
        return self.result.dns

    @classmethod
    def from_result(cls, result: CniResult, ifname: str = DEFAULT_IFNAME) -> PodNetworkStatus:
        ips = result.pod_ips(ifname)
        if not ips:
            raise CniError(f"the network returned no IP address for {ifname}")
        return cls(ips[0].ip, tuple(ip.ip for ip in ips[1:]), result.interfaces, result)


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


# ----------------------------------------------------------------------------
# The result cache


@dataclass(frozen=True)
class CachedAttachment:
    chain: NetworkChain
    container_id: str
    ifname: str
    netns: str
    cni_args: tuple[tuple[str, str], ...]
    capability_args: dict[str, Any]
    result: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": CACHE_KIND,
            "format": CACHE_FORMAT,
            "network": self.chain.to_json(),
            "containerId": self.container_id,
            "ifName": self.ifname,
            "netns": self.netns,
            "cniArgs": [list(pair) for pair in self.cni_args],
            "capabilityArgs": self.capability_args,
            "result": self.result,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CachedAttachment:
        if data.get("kind") != CACHE_KIND:
            raise ValueError(f"not a {CACHE_KIND} record")
        return cls(
            chain=NetworkChain.from_json(data["network"]),
            container_id=str(data["containerId"]),
            ifname=str(data["ifName"]),
            netns=str(data.get("netns", "")),
            cni_args=tuple((str(k), str(v)) for k, v in data.get("cniArgs", [])),
            capability_args=dict(data.get("capabilityArgs", {})),
            result=dict(data["result"]),
        )


class ResultCache:
    """One JSON file per attachment: `<network>-<container id>-<ifname>.json`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, network: str, container_id: str, ifname: str) -> Path:
        return self.directory / f"{network}-{container_id}-{ifname}.json"

    async def save(self, record: CachedAttachment) -> None:
        path = self.path(record.chain.name, record.container_id, record.ifname)
        await asyncio.to_thread(write_json, path, record.to_json())

    def _read_sync(self, suffix: str, *, warn: bool) -> list[tuple[Path, CachedAttachment]]:
        """Entries whose file name ends with `suffix`; unreadable ones skipped
        (with a warning where they should have been ours)."""
        try:
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(suffix))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            path = self.directory / name
            try:
                data = read_json(path)
                if data is not None:
                    found.append((path, CachedAttachment.from_json(data)))
            except (OSError, ValueError, KeyError, TypeError) as err:
                if warn:
                    log_event(
                        log,
                        "unreadable cni cache entry ignored",
                        level=logging.WARNING,
                        path=path,
                        error=str(err),
                    )
        return found

    def _load_sync(self, container_id: str, ifname: str) -> list[tuple[Path, CachedAttachment]]:
        entries = self._read_sync(f"-{container_id}-{ifname}.json", warn=True)
        return [
            (path, record)
            for path, record in entries
            if record.container_id == container_id and record.ifname == ifname
        ]

    async def load(self, container_id: str, ifname: str) -> list[tuple[Path, CachedAttachment]]:
        return await asyncio.to_thread(self._load_sync, container_id, ifname)

    async def remove(self, path: Path) -> None:
        await asyncio.to_thread(path.unlink, missing_ok=True)

    def _all_sync(self) -> list[tuple[Path, CachedAttachment]]:
        # Not ours (a shared dir) or unreadable: left alone, quietly.
        return self._read_sync(".json", warn=False)

    async def all(self) -> list[tuple[Path, CachedAttachment]]:
        """Every record of ours in the directory."""
        return await asyncio.to_thread(self._all_sync)


@dataclass
class SweepReport:
    """What a start-up sweep released (for the log and the tests)."""

    cached: int = 0
    pending: int = 0
    pins: int = 0


# ----------------------------------------------------------------------------
# The API the sandbox code uses


class PodNetwork:
    """Sets up and tears down pod networks with the node's current CNI config."""

    def __init__(
        self,
        settings: Settings,
        readiness: NetworkReadiness,
        pod_cidrs: PodCidrStore | None = None,
        *,
        ifname: str = DEFAULT_IFNAME,
    ) -> None:
        self.settings = settings
        self.readiness = readiness
        self.pod_cidrs = pod_cidrs
        self.ifname = ifname
        cache_dir = settings.cni.cache_dir or str(settings.state_path / "cni-cache")
        self.cache = ResultCache(Path(cache_dir))
        # Written before an ADD and dropped once its result is cached or undone:
        # what a shim killed mid-ADD leaves here is DELeted by the next start.
        self.pending = ResultCache(settings.state_path / "cni-pending")
        # One file per namespace pin we made, so a start-up sweep removes only
        # our own orphans from a pin directory other runtimes may share.
        self.pins_dir = settings.state_path / "netns-pins"
        self.runner = CniRunner(settings.cni.bin_dirs, settings.cni.plugin_timeout)
        self._locks = KeyedLocks()

    # namespaces, with the configured pin directory

    async def create_netns(self) -> str:
        name = new_pin_name()
        path = os.path.join(self.settings.cni.netns_dir, name)
        await asyncio.to_thread(write_atomic, self.pins_dir / name, path.encode())
        try:
            return await create_pod_netns(self.settings.cni.netns_dir, name)
        except BaseException:
            await asyncio.to_thread((self.pins_dir / name).unlink, missing_ok=True)
            raise

    async def remove_netns(self, path: str) -> None:
        await remove_pod_netns(path)
        if path:
            await asyncio.to_thread((self.pins_dir / os.path.basename(path)).unlink, True)

    def _pins_sync(self) -> list[str]:
        try:
            names = os.listdir(self.pins_dir)
        except FileNotFoundError:
            return []
        paths = []
        for name in names:
            if name.startswith("."):
                continue  # a temp file of a write the kill cut short
            with contextlib.suppress(OSError):
                paths.append((self.pins_dir / name).read_text())
        return paths

    async def sweep(self, known_sandboxes: set[str], known_netns: set[str]) -> SweepReport:
        """Release what RunPodSandbox calls cut off by a kill left behind: cached
        and in-flight CNI attachments and namespace pins of no known sandbox.

        Only safe before the CRI socket serves (no RunPodSandbox in flight)."""
        report = SweepReport()
        for path, record in await self.cache.all():
            if record.container_id in known_sandboxes:
                continue
            request = PodNetworkRequest(record.container_id, "", "", "", record.netns)
            await self._delete_cached(request, path, record, best_effort=True)
            report.cached += 1
            log_event(
                log,
                "orphaned cni attachment released",
                level=logging.WARNING,
                pod=record.container_id,
                network=record.chain.name,
            )
        for path, record in await self.pending.all():
            if record.container_id not in known_sandboxes:
                netns = await self._usable_netns(record.netns)
                attachment = self._attachment(
                    PodNetworkRequest(record.container_id, "", "", "", netns),
                    netns,
                    record.cni_args,
                    record.capability_args,
                )
                await self.runner.delete(record.chain, attachment, None, best_effort=True)
                report.pending += 1
                log_event(
                    log,
                    "cni add cut off by a kill released",
                    level=logging.WARNING,
                    pod=record.container_id,
                    network=record.chain.name,
                )
            await self.pending.remove(path)
        for pin in await asyncio.to_thread(self._pins_sync):
            if pin in known_netns:
                continue
            await self.remove_netns(pin)
            report.pins += 1
            log_event(log, "orphaned netns pin removed", level=logging.WARNING, netns=pin)
        return report

    # helpers

    async def _current_chain(self) -> NetworkChain:
        if self.readiness.config is None:
            await self.readiness.refresh()  # a config written a moment ago
        config = self.readiness.config
        if config is None:
            raise CniNotReady(f"network plugin is not ready: {self.readiness.error}")
        chain = NetworkChain.from_config(config)
        chain.validate()
        return chain

    async def _usable_netns(self, *paths: str) -> str:
        """The first path that is still a live namespace; "" tells DEL it is gone."""
        for path in paths:
            if path and await netns_exists(path):
                return path
        return ""

    def _attachment(
        self,
        pod: PodNetworkRequest,
        netns: str,
        args: tuple[tuple[str, str], ...] | None = None,
        capabilities: Mapping[str, Any] | None = None,
    ) -> Attachment:
        return Attachment(
            container_id=pod.sandbox_id,
            netns=netns,
            ifname=self.ifname,
            cni_args=cni_args(pod) if args is None else args,
            capability_args=(
                capability_args(pod, self.pod_cidrs.cidrs if self.pod_cidrs else ())
                if capabilities is None
                else capabilities
            ),
            pod=pod.pod,
        )

    async def _delete_cached(
        self, pod: PodNetworkRequest, path: Path, record: CachedAttachment, *, best_effort: bool
    ) -> None:
        netns = await self._usable_netns(pod.netns_path, record.netns)
        attachment = self._attachment(pod, netns, record.cni_args, record.capability_args)
        await self.runner.delete(record.chain, attachment, record.result, best_effort=best_effort)
        await self.cache.remove(path)

    # setup / teardown

    async def setup(self, pod: PodNetworkRequest) -> PodNetworkStatus:
        """ADD the pod to the network; on any failure nothing is left behind."""
        _check_id(pod.sandbox_id)
        async with self._locks.hold(pod.sandbox_id):
            chain = await self._current_chain()
            if not await netns_exists(pod.netns_path):
                raise CniError(f"network namespace {pod.netns_path!r} does not exist")
            for path, stale in await self.cache.load(pod.sandbox_id, self.ifname):
                log_event(
                    log,
                    "stale cni attachment removed before add",
                    level=logging.WARNING,
                    pod=pod.sandbox_id,
                    network=stale.chain.name,
                )
                await self._delete_cached(pod, path, stale, best_effort=True)
            attachment = self._attachment(pod, pod.netns_path)
            started = time.monotonic()
            result: dict[str, Any] | None = None
            intent = CachedAttachment(
                chain=chain,
                container_id=pod.sandbox_id,
                ifname=self.ifname,
                netns=pod.netns_path,
                cni_args=attachment.cni_args,
                capability_args=dict(attachment.capability_args),
                result={},
            )
            await self.pending.save(intent)
            try:
                result = await self.runner.add(chain, attachment)
                status = PodNetworkStatus.from_result(CniResult.parse(result), self.ifname)
                await self.cache.save(
                    CachedAttachment(
                        chain=chain,
                        container_id=pod.sandbox_id,
                        ifname=self.ifname,
                        netns=pod.netns_path,
                        cni_args=attachment.cni_args,
                        capability_args=dict(attachment.capability_args),
                        result=result,
                    )
                )
            except BaseException as err:
                prev = result if result is not None else getattr(err, "partial_result", None)
                await asyncio.shield(self._rollback(chain, attachment, prev, err))
                if isinstance(err, CniError):
                    raise _in_network(err, chain.name) from err
                raise
            finally:
                await asyncio.shield(
                    self.pending.remove(self.pending.path(chain.name, pod.sandbox_id, self.ifname))
                )
            log_event(
                log,
                "pod network set up",
                pod=pod.sandbox_id,
                name=pod.pod,
                network=chain.name,
                ip=status.ip,
                additional_ips=",".join(status.additional_ips),
                duration_ms=round((time.monotonic() - started) * 1000, 1),
            )
            return status

    async def _rollback(
        self,
        chain: NetworkChain,
        attachment: Attachment,
        prev_result: Mapping[str, Any] | None,
        cause: BaseException,
    ) -> None:
        log_event(
            log,
            "cni add failed, rolling back",
            level=logging.WARNING,
            pod=attachment.container_id,
            name=attachment.pod,
            network=chain.name,
            error=str(cause) or type(cause).__name__,
        )
        try:
            await self.runner.delete(chain, attachment, prev_result, best_effort=True)
            await self.cache.remove(
                self.cache.path(chain.name, attachment.container_id, attachment.ifname)
            )
        except Exception:  # the original error is what the caller must see
            log.exception("cni rollback failed")

    async def teardown(self, pod: PodNetworkRequest) -> None:
        """DEL the pod from the network. Idempotent; works from the cache after a
        restart, with the config gone, and with the namespace already removed."""
        _check_id(pod.sandbox_id)
        async with self._locks.hold(pod.sandbox_id):
            cached = await self.cache.load(pod.sandbox_id, self.ifname)
            for path, record in cached:
                try:
                    await self._delete_cached(pod, path, record, best_effort=False)
                except CniError as err:
                    raise _in_network(err, record.chain.name) from err
                log_event(
                    log,
                    "pod network torn down",
                    pod=pod.sandbox_id,
                    name=pod.pod,
                    network=record.chain.name,
                )
            if cached:
                return
            # No ADD result on record (a crash mid-ADD, or a cache from elsewhere):
            # plugins are built to release whatever they hold on DEL without one.
            try:
                chain = await self._current_chain()
            except CniError as err:
                log_event(
                    log,
                    "no cni result cached and no usable config; nothing to tear down",
                    level=logging.DEBUG,
                    pod=pod.sandbox_id,
                    reason=str(err),
                )
                return
            netns = await self._usable_netns(pod.netns_path)
            try:
                await self.runner.delete(chain, self._attachment(pod, netns), None)
            except CniError as err:
                raise _in_network(err, chain.name) from err
            log_event(
                log,
                "pod network torn down without cached result",
                pod=pod.sandbox_id,
                name=pod.pod,
                network=chain.name,
            )

    async def status(self, pod: PodNetworkRequest) -> PodNetworkStatus | None:
        """The pod's network as the last ADD returned it (from the cache; no plugin runs)."""
        _check_id(pod.sandbox_id)
        for _path, record in await self.cache.load(pod.sandbox_id, self.ifname):
            return PodNetworkStatus.from_result(CniResult.parse(record.result), self.ifname)
        return None

    async def check(self, pod: PodNetworkRequest) -> None:
        """CHECK the pod's attachment with its plugins; raises CniError if they object."""
        _check_id(pod.sandbox_id)
        async with self._locks.hold(pod.sandbox_id):
            cached = await self.cache.load(pod.sandbox_id, self.ifname)
            if not cached:
                raise CniError(f"pod sandbox {pod.sandbox_id} has no network attachment")
            for _path, record in cached:
                netns = await self._usable_netns(pod.netns_path, record.netns)
                if not netns:
                    raise CniError(f"network namespace of sandbox {pod.sandbox_id} is gone")
                attachment = self._attachment(pod, netns, record.cni_args, record.capability_args)
                await self.runner.check(record.chain, attachment, record.result)


def _in_network(err: CniError, network: str) -> CniError:
    """The same error, its message prefixed with the network it happened in."""
    return CniError(
        f"network {network}: {err}",
        plugin=err.plugin,
        command=err.command,
        code=err.code,
        msg=err.msg,
        details=err.details,
    )


def _check_id(sandbox_id: str) -> None:
    """Sandbox ids become file names in the cache; refuse anything path-like."""
    if not _SAFE_NAME.match(sandbox_id):
        raise CniError(f"sandbox id {sandbox_id!r} is not usable as a CNI container id")


__all__ = [
    "Bandwidth",
    "CniError",
    "CniNotReady",
    "CniResult",
    "CniRunner",
    "DnsConfig",
    "IPConfig",
    "Interface",
    "NetworkChain",
    "PodNetwork",
    "PodNetworkRequest",
    "PodNetworkStatus",
    "PortMapping",
    "Route",
    "capability_args",
    "cni_args",
    "plugin_stdin",
]
