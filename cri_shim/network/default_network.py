"""A default pod network for the private containerd, as kind and k3s ship one.

A fresh machine has no CNI config, so a shim started there could run no pod
(NetworkReady=false). When the shim runs its own containerd and the
configured conf dir holds no usable network, it writes a bridge + host-local +
portmap + loopback network into its own state dir and reads configs from
there. Nothing is written outside the state dir: the node's /etc/cni/net.d
stays the operator's.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cri_shim.checkpoint import write_atomic
from cri_shim.logs import log_event
from cri_shim.network.cni_config import CniConfigError, load_network_config
from cri_shim.settings import CniSettings, SettingsError

log = logging.getLogger(__name__)

NETWORK_NAME = "cri-shim-default"
CONFLIST_NAME = "10-cri-shim-default.conflist"
REQUIRED_PLUGINS = ("bridge", "host-local", "portmap", "loopback")
# Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
MAX_BRIDGE_NAME = 15


def validate(cni: CniSettings) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The default subnet, or SettingsError naming the bad key."""
    bridge = cni.default_bridge
    if not bridge or len(bridge.encode()) > MAX_BRIDGE_NAME or "/" in bridge or " " in bridge:
        raise SettingsError(
            f"config key 'cni.default_bridge' must be an interface name of 1-15 characters, "
            f"got {bridge!r}"
        )
    try:
        subnet = ipaddress.ip_network(cni.default_subnet, strict=True)
    except ValueError as err:
        raise SettingsError(
            f"config key 'cni.default_subnet' must be a CIDR such as 10.209.0.0/16: {err}"
        ) from err
    if subnet.num_addresses < 4:
        raise SettingsError("config key 'cni.default_subnet' leaves no room for pods")
    return subnet


def default_conflist(bridge: str, subnet: str, ipam_dir: Path) -> dict[str, Any]:
    """The network: pods on one bridge with the gateway on the host, masqueraded
    outbound, host ports through portmap. hairpinMode alone (the bridge plugin
    refuses it together with promiscMode); ipRanges lets kubelet's pod CIDR
    (UpdateRuntimeConfig) replace the default subnet."""
    return {
        "cniVersion": "1.0.0",
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "capabilities": {"ipRanges": True},
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0" if ":" not in subnet else "::/0"}],
                    "dataDir": str(ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
            {"type": "loopback"},
        ],
    }


def missing_plugins(bin_dirs: Sequence[str]) -> list[str]:
    return [
        name for name in REQUIRED_PLUGINS if not any((Path(d) / name).is_file() for d in bin_dirs)
    ]


def ensure_default_network(cni: CniSettings, state_dir: Path) -> Path | None:
    """Blocking (run it in a thread). The conf dir to read configs from: None when
    the configured one has a usable network (or the default is switched off or
    cannot work), else `<state_dir>/cni/net.d` with the default network in it."""
    if not cni.default_network:
        return None
    configured = Path(cni.conf_dir)
    try:
        load_network_config(configured, cni.bin_dirs)
        return None
    except CniConfigError as err:
        reason = str(err)
    subnet = validate(cni)
    missing = missing_plugins(cni.bin_dirs)
    if missing:
        log_event(
            log,
            "no CNI config and no default network: plugins missing",
            level=logging.WARNING,
            missing=",".join(missing),
            bin_dirs=",".join(cni.bin_dirs),
            reason=reason,
        )
        return None
    conf_dir = state_dir / "cni" / "net.d"
    conf_dir.mkdir(parents=True, exist_ok=True)
    conflist = default_conflist(cni.default_bridge, str(subnet), state_dir / "cni" / "networks")
    write_atomic(conf_dir / CONFLIST_NAME, json.dumps(conflist, indent=2).encode() + b"\n")
    log_event(
        log,
        "no CNI config found; wrote a default network",
        configured_conf_dir=configured,
        conf_dir=conf_dir,
        network=NETWORK_NAME,
        bridge=cni.default_bridge,
        subnet=subnet,
        reason=reason,
    )
    return conf_dir
