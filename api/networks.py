"""Routes under /networks: the built-in networks (user-defined ones are not there yet)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from vicd.api.app import add_route, json_response
from vicd.api.keys import ENGINE
from vicd.errors import InvalidParameter, NotFound
from vicd.filters import check_keys, parse_filters
from vicd.network import BUILTIN_NETWORKS, GATEWAY, SUBNET

NETWORK_FILTERS = {"driver", "id", "label", "name", "scope", "type", "dangling"}
DRIVERS = {"bridge": "vicd-slirp", "none": "null"}


def _network(name: str, containers: dict[str, Any]) -> dict[str, Any]:
    ipam = [{"Subnet": SUBNET, "Gateway": GATEWAY}] if name == "bridge" else []
    return {
        "Name": name, "Id": name, "Created": "0001-01-01T00:00:00Z", "Scope": "local",
        "Driver": DRIVERS[name], "EnableIPv6": False,
        "IPAM": {"Driver": "default", "Options": None, "Config": ipam},
        "Internal": False, "Attachable": False, "Ingress": False,
        "ConfigFrom": {"Network": ""}, "ConfigOnly": False, "Containers": containers,
        "Options": {}, "Labels": {},
    }


def _members(request: web.Request, name: str) -> dict[str, Any]:
    out = {}
    for c in request.app[ENGINE].containers.values():
        nic = c.nic
        if nic and nic.get("network") == name:
            out[c.id] = {"Name": c.name, "EndpointID": nic.get("mac", ""),
                         "MacAddress": nic.get("mac", ""), "IPv4Address": nic.get("address", ""),
                         "IPv6Address": ""}
    return out


async def list_networks(request: web.Request) -> web.Response:
    filters = parse_filters(request.query.get("filters"))
    check_keys(filters, NETWORK_FILTERS)
    out = []
    for name in BUILTIN_NETWORKS:
        if "name" in filters and not any(v in name for v in filters["name"]):
            continue
        if "driver" in filters and DRIVERS[name] not in filters["driver"]:
            continue
        if "type" in filters and "builtin" not in filters["type"]:
            continue
        out.append(_network(name, {}))
    return json_response(out)


async def inspect(request: web.Request) -> web.Response:
    name = request.match_info["id"]
    if name not in BUILTIN_NETWORKS:
        raise NotFound(f"network {name} not found")
    return json_response(_network(name, _members(request, name)))


async def not_yet(request: web.Request) -> web.Response:
    name = request.match_info.get("id")
    if name is not None and name not in BUILTIN_NETWORKS:
        raise NotFound(f"network {name} not found")
    if name in BUILTIN_NETWORKS and request.method == "DELETE":
        raise InvalidParameter(f"{name} is a pre-defined network and cannot be removed")
    raise InvalidParameter(
        "user-defined networks are not supported by vicd yet: every container VM is on the "
        "built-in 'bridge' network (egress and published ports) or 'none'"
    )


async def prune(request: web.Request) -> web.Response:
    return json_response({"NetworksDeleted": None})


def setup(app: web.Application) -> None:
    add_route(app, "GET", "/networks", list_networks)
    add_route(app, "POST", "/networks/create", not_yet)
    add_route(app, "POST", "/networks/prune", prune)
    add_route(app, "GET", "/networks/{id}", inspect)
    add_route(app, "DELETE", "/networks/{id}", not_yet)
    add_route(app, "POST", "/networks/{id}/connect", not_yet)
    add_route(app, "POST", "/networks/{id}/disconnect", not_yet)
