"""Routes under /networks: the built-in networks and user-defined ones."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from vicd.api.app import add_route, json_body, json_response
from vicd.api.keys import ENGINE
from vicd.engine import Engine
from vicd.errors import Forbidden, InvalidParameter, NotFound
from vicd.filters import check_keys, label_matches, parse_filters
from vicd.network import BUILTIN_NETWORKS, GATEWAY, SUBNET
from vicd.networks import Network
from vicd.timefmt import parse_api_time, parse_rfc3339

NETWORK_FILTERS = {"driver", "id", "label", "name", "scope", "type", "dangling"}
PRUNE_FILTERS = {"until", "label", "label!"}
BUILTIN_DRIVERS = {"bridge": "bridge", "none": "null"}


def _engine(request: web.Request) -> Engine:
    return request.app[ENGINE]


def _view(engine: Engine, name: str, n: Network | None) -> dict[str, Any]:
    """dockerd's network inspect shape, for a built-in (``n`` None) or user network."""
    if n is None:
        ipam = [{"Subnet": SUBNET, "Gateway": GATEWAY}] if name == "bridge" else []
        base = {"Name": name, "Id": name, "Created": "0001-01-01T00:00:00Z",
                "Driver": BUILTIN_DRIVERS[name], "Internal": False, "Attachable": False,
                "Options": {}, "Labels": {}}
    else:
        cfg: dict[str, Any] = {"Subnet": n.subnet, "Gateway": n.gateway}
        if n.ip_range:
            cfg["IPRange"] = n.ip_range
        ipam = [cfg]
        base = {"Name": n.name, "Id": n.id, "Created": n.created, "Driver": n.driver,
                "Internal": n.internal, "Attachable": n.attachable, "Options": n.options,
                "Labels": n.labels}
    scope = "local"
    if n is not None and n.driver in engine.networks.drivers:
        scope = engine.networks.drivers[n.driver].capabilities().get("Scope") or "local"
    return {
        **base, "Scope": scope, "EnableIPv6": False,
        "IPAM": {"Driver": "default", "Options": None, "Config": ipam},
        "Ingress": False, "ConfigFrom": {"Network": ""}, "ConfigOnly": False,
        "Containers": _members(engine, name, n), "Peers": None,
    }


def _members(engine: Engine, name: str, n: Network | None) -> dict[str, Any]:
    out = {}
    for c in engine.containers.values():
        if not c.state.running:
            continue
        if n is not None:
            ep = n.endpoints.get(c.id)
            if ep is None:
                continue
            out[c.id] = {"Name": c.name, "EndpointID": ep.endpoint_id, "MacAddress": ep.mac,
                         "IPv4Address": ep.address, "IPv6Address": ""}
        elif (entry := engine.nets.settings_view(c).get(name)) is not None:
            if entry["IPAddress"]:
                out[c.id] = {"Name": c.name, "EndpointID": entry["EndpointID"],
                             "MacAddress": entry["MacAddress"],
                             "IPv4Address": f"{entry['IPAddress']}/{entry['IPPrefixLen']}",
                             "IPv6Address": ""}
    return out


def _all(engine: Engine) -> list[tuple[str, Network | None]]:
    return [(name, None) for name in BUILTIN_NETWORKS] + [
        (n.name, n) for n in sorted(engine.networks.networks.values(), key=lambda x: x.created)]


def _matches(engine: Engine, name: str, n: Network | None, f: dict[str, list[str]]) -> bool:
    nid = n.id if n else name
    driver = n.driver if n else BUILTIN_DRIVERS[name]
    if "name" in f and not any(re.search(p, name) for p in f["name"]):
        return False
    if "id" in f and not any(nid.startswith(v) for v in f["id"]):
        return False
    if "driver" in f and driver not in f["driver"]:
        return False
    if "label" in f and not label_matches(n.labels if n else {}, f["label"]):
        return False
    if "type" in f:
        for t in f["type"]:
            if t not in ("custom", "builtin"):
                raise InvalidParameter(f"invalid filter: 'type'='{t}'")
        if ("builtin" if n is None else "custom") not in f["type"]:
            return False
    if "scope" in f and _view(engine, name, n)["Scope"] not in f["scope"]:
        return False
    if "dangling" in f:
        want = f["dangling"][0].lower() in ("1", "true")
        used = any(name in engine.nets.settings_view(c) for c in engine.containers.values())
        if n is None or want == used:
            return False
    return True


async def list_networks(request: web.Request) -> web.Response:
    engine = _engine(request)
    filters = parse_filters(request.query.get("filters"))
    check_keys(filters, NETWORK_FILTERS)
    return json_response([_view(engine, name, n) for name, n in _all(engine)
                          if _matches(engine, name, n, filters)])


def _lookup(engine: Engine, ref: str) -> tuple[str, Network | None]:
    if ref in BUILTIN_NETWORKS:
        return ref, None
    n = engine.networks.get(ref)
    return n.name, n


async def inspect(request: web.Request) -> web.Response:
    engine = _engine(request)
    name, n = _lookup(engine, request.match_info["id"])
    return json_response(_view(engine, name, n))


async def create(request: web.Request) -> web.Response:
    engine = _engine(request)
    body = await json_body(request)
    name = body.get("Name")
    if not isinstance(name, str) or not name:
        raise InvalidParameter("network name is required")
    if body.get("EnableIPv6"):
        raise InvalidParameter("vicd networks are IPv4 only: EnableIPv6 is not supported")
    if body.get("Ingress") or body.get("Scope") in ("swarm", "global"):
        raise Forbidden("swarm-scoped networks need a swarm manager; vicd is not one")
    driver = body.get("Driver") or "bridge"
    n = await engine.create_network(
        name, driver, ipam=body.get("IPAM"), internal=bool(body.get("Internal")),
        attachable=bool(body.get("Attachable")), labels=body.get("Labels") or {},
        options=body.get("Options") or {})
    return json_response({"Id": n.id, "Warning": ""}, 201)


async def remove(request: web.Request) -> web.Response:
    await _engine(request).remove_network(request.match_info["id"])
    return web.Response(status=204)


async def prune(request: web.Request) -> web.Response:
    engine = _engine(request)
    f = parse_filters(request.query.get("filters"))
    check_keys(f, PRUNE_FILTERS)
    until = min((parse_api_time(v) for v in f.get("until", [])), default=None)

    def keep(n: Network) -> bool:
        if until is not None and parse_rfc3339(n.created).timestamp() >= until:
            return True
        if "label!" in f and any(label_matches(n.labels, [e]) for e in f["label!"]):
            return True
        return not label_matches(n.labels, f.get("label", []))

    deleted = await engine.prune_networks(keep)
    return json_response({"NetworksDeleted": deleted or None})


async def connect(request: web.Request) -> web.Response:
    engine = _engine(request)
    body = await json_body(request)
    ref = request.match_info["id"]
    if ref not in BUILTIN_NETWORKS and engine.networks.find(ref) is None:
        raise NotFound(f"network {ref} not found")
    await engine.connect_network(ref, str(body.get("Container") or ""),
                                 body.get("EndpointConfig"))
    return web.Response(status=200)


async def disconnect(request: web.Request) -> web.Response:
    engine = _engine(request)
    body = await json_body(request)
    await engine.disconnect_network(request.match_info["id"], str(body.get("Container") or ""),
                                    bool(body.get("Force")))
    return web.Response(status=200)


def setup(app: web.Application) -> None:
    add_route(app, "GET", "/networks", list_networks)
    add_route(app, "POST", "/networks/create", create)
    add_route(app, "POST", "/networks/prune", prune)
    add_route(app, "GET", "/networks/{id}", inspect)
    add_route(app, "DELETE", "/networks/{id}", remove)
    add_route(app, "POST", "/networks/{id}/connect", connect)
    add_route(app, "POST", "/networks/{id}/disconnect", disconnect)
