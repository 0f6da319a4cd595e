"""Published ports: Docker's PortBindings/ExposedPorts turned into host sockets."""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from typing import Any

from vicd.errors import InvalidParameter, VicdError


@dataclass(frozen=True)
class PortMapping:
    proto: str  # tcp | udp
    container_port: int
    host_ip: str
    host_port: int

    @property
    def key(self) -> str:
        return f"{self.container_port}/{self.proto}"


class PortAllocated(VicdError):
    """The host port is taken; dockerd answers 500 with this wording."""


def _split_key(key: str) -> tuple[int, str]:
    port, _, proto = key.partition("/")
    proto = proto or "tcp"
    if proto not in ("tcp", "udp"):
        raise InvalidParameter(f"invalid proto: {proto}")
    try:
        n = int(port)
    except ValueError:
        raise InvalidParameter(f"invalid port specification: {key!r}") from None
    if not 0 < n < 65536:
        raise InvalidParameter(f"invalid port specification: {key!r}")
    return n, proto


def _free(proto: str, host_ip: str, port: int) -> int:
    """Bind to check (or, with port 0, to pick) a host port; returns it."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        if proto == "tcp":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host_ip, port))
        return s.getsockname()[1]


def plan_ports(config: dict[str, Any], host_config: dict[str, Any]) -> list[PortMapping]:
    """The mappings a start must make: -p bindings, and -P for every exposed port."""
    bindings: dict[str, list[dict[str, Any]]] = dict(host_config.get("PortBindings") or {})
    if host_config.get("PublishAllPorts"):
        for key in config.get("ExposedPorts") or {}:
            bindings.setdefault(key, [{"HostIp": "", "HostPort": ""}])
    out = []
    for key, items in bindings.items():
        cport, proto = _split_key(key)
        for b in items or [{}]:
            host_ip = (b or {}).get("HostIp") or "0.0.0.0"
            host_port = str((b or {}).get("HostPort") or "0")
            if "-" in host_port:  # a range: the first free port in it
                lo, hi = (int(x) for x in host_port.split("-", 1))
                port = _first_free(proto, host_ip, lo, hi)
            else:
                try:
                    port = int(host_port)
                except ValueError:
                    raise InvalidParameter(f"invalid host port: {host_port!r}") from None
            out.append(PortMapping(proto, cport, host_ip, port))
    return out


def _first_free(proto: str, host_ip: str, lo: int, hi: int) -> int:
    for port in range(lo, hi + 1):
        with contextlib.suppress(OSError):
            return _free(proto, host_ip, port)
    raise PortAllocated(f"Bind for {host_ip}:{lo}-{hi} failed: port is already allocated")


def allocate(mappings: list[PortMapping], endpoint: str) -> list[PortMapping]:
    """Check fixed ports are free and pick random ones, before the VM starts."""
    out = []
    for m in mappings:
        try:
            port = _free(m.proto, m.host_ip, m.host_port)
        except OSError as e:
            if m.host_port == 0:
                raise VicdError(f"cannot allocate a host port: {e}") from None
            raise PortAllocated(
                f"driver failed programming external connectivity on endpoint {endpoint}: "
                f"Bind for {m.host_ip}:{m.host_port} failed: port is already allocated"
            ) from None
        out.append(PortMapping(m.proto, m.container_port, m.host_ip, port))
    return out


def ports_view(mappings: list[dict[str, Any]], exposed: dict[str, Any] | None
               ) -> dict[str, Any]:
    """NetworkSettings.Ports: every exposed port, with its host bindings or null."""
    view: dict[str, Any] = {key if "/" in key else f"{key}/tcp": None for key in exposed or {}}
    for m in mappings:
        key = f"{m['container_port']}/{m['proto']}"
        view.setdefault(key, None)
        view[key] = (view[key] or []) + [{"HostIp": m["host_ip"], "HostPort": str(m["host_port"])}]
    return view
