"""The local ``bridge`` network driver: a Linux bridge per network in vicd's namespace.

Each user-defined network is a bridge ``br-<id12>`` inside the daemon's own
network namespace (plugins/microvm/netns.py) with the network's gateway
address on it; a container VM joins through one of its NIC slot taps. The
namespace does not route between bridges, so networks are isolated from each
other and from the host; egress and published ports stay on each VM's eth0.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from vicd.config import Config
from vicd.errors import InvalidParameter
from vicd.network_driver import NetworkInfo
from vicd.plugins.microvm.netns import NetNS, NetNSError, namespace_for

DNS_PORT = 53
# Options dockerd's bridge driver takes that mean nothing for VMs on a bridge
# in vicd's namespace (accepted so compose files and scripts work unchanged).
IGNORED_OPTIONS = {
    "com.docker.network.bridge.name", "com.docker.network.bridge.enable_icc",
    "com.docker.network.bridge.enable_ip_masquerade", "com.docker.network.bridge.host_binding_ipv4",
    "com.docker.network.driver.mtu", "com.docker.network.bridge.default_bridge",
}


def bridge_name(network_id: str) -> str:
    return f"br-{network_id[:12]}"


class LocalBridgeDriver:
    name = "bridge"

    def __init__(self, config: Config) -> None:
        self.ns: NetNS | None = namespace_for(config.data_root) if NetNS.usable() else None

    def _netns(self) -> NetNS:
        if self.ns is None:
            raise InvalidParameter("user-defined networks need vicd to run as root "
                                   "(CAP_NET_ADMIN) with iproute2")
        self.ns.ensure()
        return self.ns

    def capabilities(self) -> dict[str, Any]:
        return {"Scope": "local", "ConnectivityScope": "local"}

    def create_network(self, network: NetworkInfo) -> None:
        unknown = set(network.options) - IGNORED_OPTIONS
        if unknown:
            raise InvalidParameter(f"bridge driver: unknown option {sorted(unknown)[0]!r}")
        ns = self._netns()
        br = bridge_name(network.id)
        prefix = ipaddress.ip_network(network.subnet).prefixlen
        try:
            if not ns.ip("link", "show", br, check=False):
                ns.ip("link", "add", br, "type", "bridge")
            ns.ip("addr", "replace", f"{network.gateway}/{prefix}", "dev", br)
            ns.ip("link", "set", br, "up")
        except NetNSError:
            ns.ip("link", "del", br, check=False)
            raise

    def delete_network(self, network_id: str) -> None:
        if self.ns is not None:
            self.ns.ip("link", "del", bridge_name(network_id), check=False)

    def create_endpoint(self, network_id: str, endpoint_id: str, address: str, mac: str,
                        options: dict[str, Any]) -> None:
        pass  # the VM's tap is the endpoint; it exists as long as the VM runs

    def delete_endpoint(self, network_id: str, endpoint_id: str) -> None:
        pass

    def join(self, network_id: str, endpoint_id: str, container_id: str) -> dict[str, Any]:
        return {"kind": "linux-bridge", "bridge": bridge_name(network_id)}

    def leave(self, network_id: str, endpoint_id: str) -> None:
        pass  # the backend takes the tap off the bridge

    def restore(self, networks: list[NetworkInfo]) -> None:
        for n in networks:
            self.create_network(n)

    def dns_socket(self, network_id: str, gateway: str) -> socket.socket | None:
        if self.ns is None:
            return None
        return self.ns.udp_socket(gateway, DNS_PORT)
