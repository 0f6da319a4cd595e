"""Routes under /volumes: create, list, inspect, remove, prune."""

from __future__ import annotations

import asyncio

from aiohttp import web

from vicd.api.app import add_route, api_version, json_body, json_response, q_bool
from vicd.api.keys import ENGINE, EVENTS
from vicd.errors import InvalidParameter
from vicd.filters import parse_filters


async def create(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await json_body(request)
    for key in ("DriverOpts", "Labels"):
        if body.get(key) is not None and not isinstance(body[key], dict):
            raise InvalidParameter(f"invalid {key}: expected an object")
    v, created = await asyncio.to_thread(
        engine.volumes.create, body.get("Name") or None, body.get("Driver") or "local",
        body.get("DriverOpts"), body.get("Labels"))
    if created:
        request.app[EVENTS].publish("volume", "create", v.name, driver=v.driver)
    return json_response(engine.volumes.view(v), 201)


async def list_volumes(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    filters = parse_filters(request.query.get("filters"))
    # A shared driver (vmdk) lists from its storage: off the event loop.
    out = [engine.volumes.view(v) for v in await asyncio.to_thread(engine.volumes.list)
           if engine.volumes.matches(v, filters, bool(engine.volume_users(v.name)))]
    return json_response({"Volumes": out, "Warnings": None})


async def inspect(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    v = await asyncio.to_thread(engine.volumes.get, request.match_info["name"])
    return json_response(engine.volumes.view(v))


async def remove(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    name = request.match_info["name"]
    v = await asyncio.to_thread(engine.volumes.get, name)
    await asyncio.to_thread(engine.volumes.remove, name, engine.volume_users(name),
                            q_bool(request, "force"))
    request.app[EVENTS].publish("volume", "destroy", name, driver=v.driver)
    return web.Response(status=204)


async def prune(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    filters = parse_filters(request.query.get("filters"))
    # Since API 1.42 prune takes only anonymous volumes unless all=true.
    everything = filters.pop("all", ["false"])[0].lower() in ("1", "true") or \
        api_version(request) < (1, 42)
    deleted, reclaimed = [], 0
    for v in await asyncio.to_thread(engine.volumes.list):
        if engine.volume_users(v.name) or (not everything and not v.anonymous):
            continue
        if not engine.volumes.matches(v, {k: f for k, f in filters.items() if k != "until"},
                                      False):
            continue
        drv = engine.volumes.drivers.get(v.driver)
        size = max(drv.usage(v.name), 0) if drv else 0
        await asyncio.to_thread(engine.volumes.remove, v.name, [])
        request.app[EVENTS].publish("volume", "destroy", v.name, driver=v.driver)
        deleted.append(v.name)
        reclaimed += size
    return json_response({"VolumesDeleted": deleted or None, "SpaceReclaimed": reclaimed})


def setup(app: web.Application) -> None:
    add_route(app, "POST", "/volumes/create", create)
    add_route(app, "GET", "/volumes", list_volumes)
    add_route(app, "POST", "/volumes/prune", prune)
    add_route(app, "GET", "/volumes/{name}", inspect)
    add_route(app, "DELETE", "/volumes/{name}", remove)
