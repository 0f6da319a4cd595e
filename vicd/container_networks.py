"""Which networks a container is on, and its NICs on them while it runs.

Every container VM keeps its built-in egress NIC (eth0: egress and
published ports, vicd.network). A container on user-defined networks also
gets, while it runs, one NIC per network in a slot of its VM
(``ComputeBackend.nic_slots``): an endpoint from vicd.networks, plugged by
the backend. ``Container.networks`` holds the configured networks by name
(dockerd's EndpointSettings: Aliases, IPAMConfig, DriverOpts).
"""

from __future__ import annotations

from typing import Any

from vicd.backend import VM, ComputeBackend
from vicd.container import Container
from vicd.errors import Forbidden, InvalidParameter, NotFound
from vicd.network import BUILTIN_NETWORKS, GATEWAY, GUEST_IP, PREFIX, network_mode
from vicd.network_driver import NicSpec
from vicd.networks import Network, NetworkManager

PRIVATE = "container cannot be connected to multiple networks with one of the networks in " \
          "private (none) mode"


def _settings(raw: dict[str, Any] | None) -> dict[str, Any]:
    raw = raw or {}
    return {"Aliases": list(raw.get("Aliases") or []) or None,
            "IPAMConfig": raw.get("IPAMConfig") or None,
            "DriverOpts": raw.get("DriverOpts") or None}


def configured(c: Container) -> dict[str, dict[str, Any]]:
    """The container's networks by name (records from before networks: its mode)."""
    if c.networks is not None:
        return c.networks
    mode = c.host_config.get("NetworkMode") or "default"
    return {"bridge" if mode == "default" else mode: {}}


class ContainerNetworks:
    def __init__(self, manager: NetworkManager, backend: ComputeBackend) -> None:
        self.manager = manager
        self.backend = backend

    @property
    def slots(self) -> int:
        return getattr(self.backend, "nic_slots", 0)

    def plan(self, host_config: dict[str, Any], networking: dict[str, Any] | None
             ) -> dict[str, dict[str, Any]]:
        """Networks of a new container from NetworkMode and NetworkingConfig."""
        mode = network_mode(host_config)
        endpoints = {("bridge" if k == "default" else k): v for k, v in
                     ((networking or {}).get("EndpointsConfig") or {}).items()}
        out: dict[str, dict[str, Any]] = {}
        for ref in [mode, *[k for k in endpoints if k != mode]]:
            settings = _settings(endpoints.get(ref))
            if ref in BUILTIN_NETWORKS:
                if settings["Aliases"]:
                    raise InvalidParameter("network-scoped alias is supported only for "
                                           "containers in user defined networks")
                out[ref] = settings
            else:
                # dockerd creates the container and fails its start (404) when the
                # network does not exist (a 404 at create makes the CLI pull the image).
                n = self.manager.find(ref)
                out[n.name if n else ref] = settings
        if "none" in out and len(out) > 1:
            raise InvalidParameter(PRIVATE)
        return out

    def user_networks(self, c: Container) -> list[tuple[Network, dict[str, Any]]]:
        return [(self.manager.get(name), s) for name, s in configured(c).items()
                if name not in BUILTIN_NETWORKS]

    def egress_mode(self, c: Container) -> str:
        """eth0's mode: down for ``none`` and for containers only on internal networks."""
        nets = configured(c)
        if "none" in nets:
            return "none"
        user = self.user_networks(c)
        if user and "bridge" not in nets and all(n.internal for n, _ in user):
            return "none"
        return "bridge"

    async def plug(self, c: Container) -> list[NicSpec]:
        """Endpoints for a starting container, one NIC slot per user network."""
        user = self.user_networks(c)
        if len(user) > self.slots:
            raise InvalidParameter(
                f"a {self.backend.name} container VM has {self.slots} NIC slots "
                f"for user-defined networks; {c.name} is on {len(user)}")
        nics: list[NicSpec] = []
        try:
            for slot, (n, settings) in enumerate(user, start=1):
                nics.append(await self.manager.join(n, c.id, slot, settings))
        except BaseException:
            await self.release(c)
            raise
        return nics

    async def release(self, c: Container) -> None:
        for n, _ in self.manager.endpoints_of(c.id):
            await self.manager.leave(n, c.id)

    def resolver(self, nics: list[NicSpec]) -> str:
        """The embedded DNS address for the container's resolv.conf, if any."""
        for nic in nics:
            n = self.manager.networks.get(nic.network_id)
            if n is not None and self.manager.has_dns(n):
                return n.gateway
        return ""

    # --- docker network connect / disconnect ---------------------------------------

    async def connect(self, c: Container, vm: VM | None, ref: str,
                      raw: dict[str, Any] | None) -> str:
        """Returns the network's name; the caller stores the container."""
        nets = configured(c)
        settings = _settings(raw)
        if ref in ("host",) or ref.startswith("container:"):
            raise Forbidden("container cannot be disconnected from host network or connected "
                            "to host network")
        if ref in BUILTIN_NETWORKS:
            name, n = ref, None
            if (ref == "none" and nets) or "none" in nets:
                raise Forbidden(PRIVATE)
        else:
            n = self.manager.get(ref)
            name = n.name
            if "none" in nets:
                raise Forbidden(PRIVATE)
        if name in nets:
            raise Forbidden(f"endpoint with name {c.name} already exists in network {name}")
        if n is not None and vm is not None:
            used = {ep.slot for _, ep in self.manager.endpoints_of(c.id)}
            free = [s for s in range(1, self.slots + 1) if s not in used]
            if not free:
                raise Forbidden(f"{c.name} is on {len(used)} user-defined networks: every NIC "
                                "slot of its VM is taken")
            nic = await self.manager.join(n, c.id, free[0], settings)
            try:
                await vm.connect_nic(nic.to_dict())
            except BaseException:
                await self.manager.leave(n, c.id)
                raise
        c.networks = {**nets, name: settings}
        return name

    async def disconnect(self, c: Container, vm: VM | None, ref: str) -> str:
        nets = configured(c)
        n = None if ref in BUILTIN_NETWORKS else self.manager.find(ref)
        if n is None and ref not in BUILTIN_NETWORKS:
            raise NotFound(f"network {ref} not found")
        name = n.name if n else ref
        if name not in nets:
            raise Forbidden(f"container {c.id} is not connected to network {name}")
        if n is not None and c.id in n.endpoints:
            if vm is not None:
                await vm.disconnect_nic(n.endpoints[c.id].slot)
            await self.manager.leave(n, c.id)
        c.networks = {k: v for k, v in nets.items() if k != name}
        return name

    # --- inspect ----------------------------------------------------------------

    def settings_view(self, c: Container) -> dict[str, Any]:
        """NetworkSettings.Networks as dockerd shows it."""
        running = c.state.running
        out: dict[str, Any] = {}
        for name, settings in configured(c).items():
            entry: dict[str, Any] = {
                "IPAMConfig": settings.get("IPAMConfig"), "Links": None,
                "Aliases": settings.get("Aliases"), "MacAddress": "", "DriverOpts":
                settings.get("DriverOpts"), "NetworkID": name, "EndpointID": "", "Gateway": "",
                "IPAddress": "", "IPPrefixLen": 0, "IPv6Gateway": "", "GlobalIPv6Address": "",
                "GlobalIPv6PrefixLen": 0, "DNSNames": None,
            }
            n = self.manager.find(name) if name not in BUILTIN_NETWORKS else None
            if n is not None:
                entry["NetworkID"] = n.id
                ep = n.endpoints.get(c.id)
                if ep is not None and running:
                    entry.update(EndpointID=ep.endpoint_id, Gateway=n.gateway,
                                 IPAddress=ep.address.split("/")[0], IPPrefixLen=n.prefix,
                                 MacAddress=ep.mac,
                                 DNSNames=[c.name, c.short_id, *(ep.aliases or [])])
            elif name == "bridge" and c.nic and running and c.nic.get("address"):
                entry.update(EndpointID=c.nic.get("mac", ""), Gateway=GATEWAY,
                             IPAddress=GUEST_IP, IPPrefixLen=PREFIX,
                             MacAddress=c.nic.get("mac", ""))
            out[name] = entry
        return out
