"""The network-driver shape: Docker's remote network-driver API as Python.

A driver comes from a plugin's ``register_network_drivers`` hook, so a
third party can add one (the local ``bridge`` driver of the microvm backend
and the ``nsx`` driver of the vSphere backend are plugins too). The engine
owns names, IPAM, endpoints and the embedded DNS; a driver only makes the
network real where the VMs are. Methods are called from a worker thread
(they may block on subprocesses or HTTP) and mirror libnetwork's remote
driver calls: CreateNetwork, DeleteNetwork, CreateEndpoint, DeleteEndpoint,
Join, Leave.

What ``join`` returns is the *backing* of the VM's NIC: an opaque dict the
compute backend understands (``{"kind": "linux-bridge", "bridge": ...}``
on microvm, ``{"kind": "portgroup", ...}`` on vSphere). The engine passes
it through unread in ``NicSpec.backing``.
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass
class NetworkInfo:
    """What a driver learns about a network at CreateNetwork."""

    id: str
    name: str
    subnet: str  # CIDR, e.g. 172.18.0.0/16
    gateway: str  # e.g. 172.18.0.1
    internal: bool = False
    options: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class NicSpec:
    """One NIC of a container VM on a driver's network (a spare slot on microvm)."""

    network_id: str
    network: str  # the network's name
    endpoint_id: str
    mac: str
    address: str  # CIDR
    gateway: str
    backing: dict[str, Any] = field(default_factory=dict)
    slot: int = 0  # which NIC of the VM: 1.. (0 is the built-in egress NIC)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class NetworkDriver(Protocol):
    """Docker's network-driver shape."""

    name: str

    def capabilities(self) -> dict[str, Any]:
        """``{"Scope": "local"|"global", "ConnectivityScope": ...}``."""
        ...

    def create_network(self, network: NetworkInfo) -> None:
        """Make the network real (a bridge, a segment). Raise InvalidParameter
        for options the driver does not take; nothing is kept on failure."""
        ...

    def delete_network(self, network_id: str) -> None: ...

    def create_endpoint(self, network_id: str, endpoint_id: str, address: str, mac: str,
                        options: dict[str, Any]) -> None:
        """An endpoint (a future NIC) with the address the engine's IPAM chose."""
        ...

    def delete_endpoint(self, network_id: str, endpoint_id: str) -> None: ...

    def join(self, network_id: str, endpoint_id: str, container_id: str) -> dict[str, Any]:
        """The endpoint joins the container's VM: returns the NIC's backing."""
        ...

    def leave(self, network_id: str, endpoint_id: str) -> None: ...

    def restore(self, networks: list[NetworkInfo]) -> None:
        """At daemon start: make sure every stored network is real again
        (after a host reboot); idempotent."""
        ...

    def dns_socket(self, network_id: str, gateway: str) -> socket.socket | None:
        """A UDP socket the containers on this network reach as their resolver
        (bound to the gateway, port 53), or None when the driver cannot offer
        one: the engine serves names of the network's endpoints on it."""
        ...
