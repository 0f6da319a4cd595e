"""User-defined networks: records, IPAM, endpoints and their embedded DNS.

The engine's side of ``docker network``: names and ids, address pools,
which container has which address on which network, and the DNS that
resolves a network's containers by name. Making a network real where the
VMs are is a driver's job (vicd.network_driver, from plugins); plugging a
NIC into a VM is the compute backend's. A record per network lives under
``<data-root>/networks/<id>.json`` with its active endpoints, so a restarted
daemon keeps every address of the VMs it reattaches.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vicd.dns import DNSServer
from vicd.errors import Conflict, Forbidden, InvalidParameter, NotFound
from vicd.network import BUILTIN_NETWORKS, SUBNET
from vicd.network_driver import NetworkDriver, NetworkInfo, NicSpec
from vicd.store import write_json_atomic
from vicd.timefmt import rfc3339_now

log = logging.getLogger(__name__)

# dockerd's default address pools for user-defined networks (172.17 is its
# default bridge): 172.18-31.0.0/16, then 192.168.0.0/16 in /20s.
DEFAULT_POOLS = [ipaddress.ip_network(f"172.{i}.0.0/16") for i in range(18, 32)] + list(
    ipaddress.ip_network("192.168.0.0/16").subnets(new_prefix=20))
RESERVED = [ipaddress.ip_network(SUBNET)]  # every VM's eth0 (slirp)


def host_routes(path: Path = Path("/proc/net/route")) -> list[ipaddress.IPv4Network]:
    """Subnets the host routes to: default pools avoid them, as dockerd's do, so
    a container still reaches those hosts through its egress NIC."""
    out = []
    try:
        lines = path.read_text().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        f = line.split()
        if len(f) < 8 or f[7] == "00000000":
            continue
        dest = ipaddress.IPv4Address(int(f[1], 16).to_bytes(4, "little"))
        mask = ipaddress.IPv4Address(int(f[7], 16).to_bytes(4, "little"))
        out.append(ipaddress.IPv4Network(f"{dest}/{mask}", strict=False))
    return out


@dataclass
class Endpoint:
    """A container's NIC on a network while it runs (or its config while not)."""

    container_id: str
    endpoint_id: str
    address: str  # CIDR
    mac: str
    aliases: list[str] = field(default_factory=list)
    slot: int = 0


@dataclass
class Network:
    id: str
    name: str
    driver: str
    created: str
    subnet: str
    gateway: str
    ip_range: str = ""
    internal: bool = False
    attachable: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)

    def info(self) -> NetworkInfo:
        return NetworkInfo(self.id, self.name, self.subnet, self.gateway, self.internal,
                           dict(self.options), dict(self.labels))

    @property
    def prefix(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Network:
        data = dict(data)
        data["endpoints"] = {k: Endpoint(**v) for k, v in data.get("endpoints", {}).items()}
        return cls(**data)


def mac_for_ip(ip: str) -> str:
    """dockerd's MAC for an address: 02:42 and the IPv4 bytes."""
    return "02:42:" + ":".join(f"{int(b):02x}" for b in ip.split("."))


class NetworkManager:
    def __init__(self, root: Path, drivers: dict[str, NetworkDriver]) -> None:
        self.root = root
        self.drivers = drivers
        self.networks: dict[str, Network] = {}
        self._dns: dict[str, DNSServer] = {}
        self._lock = asyncio.Lock()
        # container id -> its names on networks (name, short id); set by the engine.
        self.names_of: Callable[[str], list[str]] = lambda cid: []

    # --- records ---------------------------------------------------------------

    def load(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.root.glob("*.json")):
            try:
                n = Network.from_dict(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as e:
                log.error("network record %s unreadable, skipped: %s", path.name, e)
                continue
            self.networks[n.id] = n

    def _save(self, n: Network) -> None:
        write_json_atomic(self.root / f"{n.id}.json", asdict(n))

    def find(self, ref: str) -> Network | None:
        """By name, full id, or unique id prefix (dockerd's order); None if unknown."""
        for n in self.networks.values():
            if n.name == ref:
                return n
        if ref in self.networks:
            return self.networks[ref]
        hits = [n for n in self.networks.values() if ref and n.id.startswith(ref)]
        return hits[0] if len(hits) == 1 else None

    def get(self, ref: str) -> Network:
        n = self.find(ref)
        if n is None:
            raise NotFound(f"network {ref} not found")
        return n

    def driver(self, name: str) -> NetworkDriver:
        d = self.drivers.get(name)
        if d is None:
            raise NotFound(f'plugin "{name}" not found')
        return d

    async def restore(self) -> None:
        """At daemon start: every network real again, and its DNS served."""
        by_driver: dict[str, list[Network]] = {}
        for n in self.networks.values():
            by_driver.setdefault(n.driver, []).append(n)
        for name, nets in by_driver.items():
            d = self.drivers.get(name)
            if d is None:
                log.error("networks %s: driver %r is not loaded", [n.name for n in nets], name)
                continue
            try:
                await asyncio.to_thread(d.restore, [n.info() for n in nets])
            except Exception as e:
                log.error("driver %s cannot restore its networks: %s", name, e)
                continue
            for n in nets:
                await self._serve_dns(n)

    # --- create / remove -------------------------------------------------------

    async def create(self, name: str, driver: str = "bridge", ipam: dict[str, Any] | None = None,
                     internal: bool = False, attachable: bool = False,
                     labels: dict[str, str] | None = None,
                     options: dict[str, str] | None = None) -> Network:
        if not name:
            raise InvalidParameter("network name is required")
        drv = self.driver(driver or "bridge")
        async with self._lock:
            if name in BUILTIN_NETWORKS or name == "host" or any(
                    n.name == name for n in self.networks.values()):
                raise Conflict(f"network with name {name} already exists")
            subnet, gateway, ip_range = self._plan_ipam(ipam or {})
            n = Network(id=secrets.token_hex(32), name=name, driver=driver or "bridge",
                        created=rfc3339_now(), subnet=str(subnet), gateway=gateway,
                        ip_range=ip_range, internal=internal, attachable=attachable,
                        labels=dict(labels or {}), options=dict(options or {}))
            await asyncio.to_thread(drv.create_network, n.info())
            try:
                self._save(n)
            except BaseException:
                await asyncio.to_thread(drv.delete_network, n.id)
                raise
            self.networks[n.id] = n
        await self._serve_dns(n)
        return n

    def _plan_ipam(self, ipam: dict[str, Any]) -> tuple[ipaddress.IPv4Network, str, str]:
        if (ipam.get("Driver") or "default") != "default":
            raise NotFound(f'plugin "{ipam["Driver"]}" not found')
        configs = ipam.get("Config") or []
        if len(configs) > 1:
            raise InvalidParameter("vicd networks take one IPv4 subnet")
        cfg = configs[0] if configs else {}
        taken = [ipaddress.ip_network(n.subnet) for n in self.networks.values()]
        if cfg.get("Subnet"):
            try:
                subnet = ipaddress.ip_network(cfg["Subnet"], strict=False)
            except ValueError:
                raise InvalidParameter(f"invalid CIDR address: {cfg['Subnet']}") from None
            if subnet.version != 4:
                raise InvalidParameter("vicd networks are IPv4 only")
            if any(subnet.overlaps(t) for t in taken + RESERVED):
                raise Forbidden("Pool overlaps with other one on this address space")
        else:
            avoid = taken + RESERVED + host_routes()
            free = [p for p in DEFAULT_POOLS if not any(p.overlaps(t) for t in avoid)]
            if not free:
                raise Forbidden("could not find an available, non-overlapping IPv4 address "
                                "pool among the defaults to assign to the network")
            subnet = free[0]
        ip_range = ""
        if cfg.get("IPRange"):
            try:
                rng = ipaddress.ip_network(cfg["IPRange"], strict=False)
            except ValueError:
                raise InvalidParameter(f"invalid CIDR address: {cfg['IPRange']}") from None
            if not rng.subnet_of(subnet):  # type: ignore[arg-type]
                raise InvalidParameter(f"ip-range {rng} is not in subnet {subnet}")
            ip_range = str(rng)
        if cfg.get("Gateway"):
            try:
                gw = ipaddress.ip_address(cfg["Gateway"])
            except ValueError:
                raise InvalidParameter(f"invalid gateway address {cfg['Gateway']}") from None
            if gw not in subnet:
                raise InvalidParameter(f"no matching subnet for gateway {gw}")
        else:
            gw = next(subnet.hosts())
        return subnet, str(gw), ip_range  # type: ignore[return-value]

    async def remove(self, ref: str, running: set[str]) -> Network:
        if ref in BUILTIN_NETWORKS or ref == "host":
            raise Forbidden(f"{ref} is a pre-defined network and cannot be removed")
        n = self.get(ref)
        async with self._lock:
            if any(cid in running for cid in n.endpoints):
                raise Forbidden(f"error while removing network: network {n.name} id {n.id} "
                                "has active endpoints")
            self._stop_dns(n)
            await asyncio.to_thread(self.driver(n.driver).delete_network, n.id)
            (self.root / f"{n.id}.json").unlink(missing_ok=True)
            self.networks.pop(n.id, None)
        return n

    # --- endpoints -------------------------------------------------------------

    def _allocate(self, n: Network, want: str | None) -> str:
        subnet = ipaddress.ip_network(n.subnet)
        used = {e.address.split("/")[0] for e in n.endpoints.values()} | {n.gateway}
        if want:
            try:
                ip = ipaddress.ip_address(want)
            except ValueError:
                raise InvalidParameter(f"invalid IPv4 address: {want}") from None
            if ip not in subnet:
                raise InvalidParameter(f"no matching subnet for address {want} "
                                       f"in network {n.name}")
            if str(ip) in used:
                raise Forbidden(f"Address already in use: {want}")  # dockerd's words
            return f"{ip}/{subnet.prefixlen}"
        pool = ipaddress.ip_network(n.ip_range) if n.ip_range else subnet
        for ip in pool.hosts():
            if str(ip) not in used:
                return f"{ip}/{subnet.prefixlen}"
        raise Forbidden(f"no available IPv4 addresses on network {n.name}")

    async def join(self, n: Network, cid: str, slot: int, settings: dict[str, Any]) -> NicSpec:
        """Give a starting or running container its endpoint on ``n``: address,
        driver endpoint, backing. Stored before the VM sees it."""
        drv = self.driver(n.driver)
        async with self._lock:
            want = ((settings.get("IPAMConfig") or {}).get("IPv4Address") or None)
            old = n.endpoints.get(cid)
            address = old.address if old else self._allocate(n, want)
            ip = address.split("/")[0]
            ep = Endpoint(cid, old.endpoint_id if old else secrets.token_hex(32), address,
                          mac_for_ip(ip), list(settings.get("Aliases") or []), slot)
            n.endpoints[cid] = ep
            self._save(n)
        try:
            await asyncio.to_thread(drv.create_endpoint, n.id, ep.endpoint_id, address,
                                    ep.mac, dict(settings.get("DriverOpts") or {}))
            backing = await asyncio.to_thread(drv.join, n.id, ep.endpoint_id, cid)
        except BaseException:
            await self.leave(n, cid)
            raise
        return NicSpec(network_id=n.id, network=n.name, endpoint_id=ep.endpoint_id, mac=ep.mac,
                       address=address, gateway=n.gateway, backing=backing, slot=slot)

    async def leave(self, n: Network, cid: str) -> None:
        """The container's endpoint on ``n`` is gone (stop, disconnect): its address is free."""
        ep = n.endpoints.get(cid)
        if ep is None:
            return
        drv = self.drivers.get(n.driver)
        if drv is not None:
            try:
                await asyncio.to_thread(drv.leave, n.id, ep.endpoint_id)
                await asyncio.to_thread(drv.delete_endpoint, n.id, ep.endpoint_id)
            except Exception as e:  # the address is released all the same
                log.warning("network %s: driver could not remove endpoint of %s: %s",
                            n.name, cid[:12], e)
        async with self._lock:
            n.endpoints.pop(cid, None)
            if n.id in self.networks:
                self._save(n)

    def endpoints_of(self, cid: str) -> list[tuple[Network, Endpoint]]:
        return [(n, n.endpoints[cid]) for n in self.networks.values() if cid in n.endpoints]

    # --- embedded DNS ----------------------------------------------------------

    def dns_names(self, n: Network, client_ip: str) -> dict[str, str]:
        """Names the container asking (by its address on ``n``) resolves: those
        of every network it is on, as dockerd's embedded DNS answers; ``n``'s first."""
        asking = next((cid for cid, ep in n.endpoints.items()
                       if ep.address.split("/")[0] == client_ip), None)
        nets = [n] + [m for m, _ in self.endpoints_of(asking) if m is not n] if asking else [n]
        table: dict[str, str] = {}
        for net in nets:
            for cid, ep in net.endpoints.items():
                ip = ep.address.split("/")[0]
                for name in [*self.names_of(cid), *ep.aliases]:
                    if name:
                        table.setdefault(name.lower(), ip)
        return table

    async def _serve_dns(self, n: Network) -> None:
        drv = self.drivers.get(n.driver)
        if drv is None or n.id in self._dns:
            return
        try:
            sock = await asyncio.to_thread(drv.dns_socket, n.id, n.gateway)
        except OSError as e:
            log.warning("network %s: no embedded DNS: %s", n.name, e)
            return
        if sock is None:
            return
        server = DNSServer(lambda client: self.dns_names(n, client), forward=not n.internal)
        await server.serve(sock)
        self._dns[n.id] = server

    def has_dns(self, n: Network) -> bool:
        return n.id in self._dns

    def _stop_dns(self, n: Network) -> None:
        server = self._dns.pop(n.id, None)
        if server is not None:
            server.close()

    def close(self) -> None:
        for server in self._dns.values():
            server.close()
        self._dns.clear()
