"""CNI's data: errors, what the sandbox code asks for (ports, bandwidth, DNS)
and what plugins answer (interfaces, IPs, routes), per the CNI spec."""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
