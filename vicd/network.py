"""The container's network as the engine decides it: NICs, addresses, /etc files.

The built-in network is ``bridge`` (Docker's default name): every container
VM gets one NIC with egress to whatever the host reaches and published
ports on the host. The microvm backend realises it with QEMU's user-mode
network (slirp): each VM has its own private 10.0.2.0/24, the host is
10.0.2.2, DNS 10.0.2.3 (see docs/networking.md). ``none`` keeps the NIC
down.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from vicd.errors import InvalidParameter
from vicd.ports import PortMapping

SUBNET = "10.0.2.0/24"
GUEST_IP = "10.0.2.15"
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
PREFIX = 24
BUILTIN_NETWORKS = ("bridge", "none")

HOSTS_HEADER = (
    "127.0.0.1\tlocalhost\n"
    "::1\tlocalhost ip6-localhost ip6-loopback\n"
    "fe00::0\tip6-localnet\n"
    "ff00::0\tip6-mcastprefix\n"
    "ff02::1\tip6-allnodes\n"
    "ff02::2\tip6-allrouters\n"
)


@dataclass
class NIC:
    network: str  # bridge | none
    mac: str
    address: str  # CIDR, "" when down
    gateway: str
    ports: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def network_mode(host_config: dict[str, Any]) -> str:
    mode = host_config.get("NetworkMode") or "default"
    if mode == "default":
        return "bridge"
    if mode in BUILTIN_NETWORKS:
        return mode
    if mode == "host":
        raise InvalidParameter(
            "network mode \"host\" is not supported: every vicd container is a VM with its "
            "own network stack; publish ports with -p instead"
        )
    if mode.startswith("container:"):
        raise InvalidParameter("network mode \"container:\" is not supported by vicd")
    return mode  # a user-defined network: the caller checks that it exists


def mac_for(container_id: str) -> str:
    # Locally administered, like dockerd's 02:42:..., unique per container.
    tail = container_id[:8]
    return "02:42:" + ":".join(tail[i : i + 2] for i in range(0, 8, 2))


def make_nic(container_id: str, mode: str, ports: list[PortMapping]) -> NIC:
    if mode == "none":
        return NIC("none", mac_for(container_id), "", "")
    return NIC(
        network=mode,
        mac=mac_for(container_id),
        address=f"{GUEST_IP}/{PREFIX}",
        gateway=GATEWAY,
        ports=[asdict(p) for p in ports],
    )


def hosts_file(hostname: str, mode: str, extra_hosts: list[str] | None,
               own_ip: str = GUEST_IP) -> str:
    text = HOSTS_HEADER
    for entry in extra_hosts or []:
        name, sep, ip = entry.partition(":")
        if not sep or not name or not ip:
            raise InvalidParameter(f"invalid IP address in add-host: {entry!r}")
        if ip == "host-gateway":
            ip = GATEWAY
        text += f"{ip}\t{name}\n"
    if mode != "none":
        text += f"{own_ip}\t{hostname}\n"
    return text


def resolv_file(host_config: dict[str, Any], mode: str, embedded_dns: str = "") -> str:
    """dockerd's resolv.conf; on a user-defined network the embedded DNS
    (``embedded_dns``: its address) resolves the network's containers."""
    default = [embedded_dns or DNS] if mode != "none" else []
    servers = host_config.get("Dns") or default
    lines = [f"nameserver {s}" for s in servers]
    if host_config.get("DnsSearch"):
        lines.append("search " + " ".join(host_config["DnsSearch"]))
    options = list(host_config.get("DnsOptions") or [])
    if embedded_dns and not host_config.get("Dns") and not any(
            o.startswith("ndots:") for o in options):
        options.append("ndots:0")
    if options:
        lines.append("options " + " ".join(options))
    return "\n".join(lines) + "\n" if lines else ""
