"""Routes: POST /containers/{id}/update (docker update)."""

from __future__ import annotations

from aiohttp import web

from vicd import update as upd
from vicd.api.app import add_route, json_body, json_response
from vicd.api.keys import ENGINE


async def update(request: web.Request) -> web.Response:
    body = await json_body(request)
    warnings = await upd.update(request.app[ENGINE], request.match_info["id"], body)
    return json_response({"Warnings": warnings or None})


def setup(app: web.Application) -> None:
    add_route(app, "POST", "/containers/{id}/update", update)
