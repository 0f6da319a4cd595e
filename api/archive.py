"""Routes for a container's files: /containers/{id}/archive (docker cp) and /export."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from vicd.api.app import add_route, q_bool
from vicd.api.keys import ENGINE

from vicd import archive

STAT_HEADER = "X-Docker-Container-Path-Stat"


def _stat_header(st: dict[str, Any]) -> str:
    body = {k: st.get(k) for k in ("name", "size", "mode", "mtime", "linkTarget")}
    return base64.b64encode(json.dumps(body).encode()).decode()


async def head_archive(request: web.Request) -> web.Response:
    path = archive.check_path(request.query.get("path"))
    st = await archive.stat(request.app[ENGINE], request.match_info["id"], path)
    return web.Response(status=200, headers={STAT_HEADER: _stat_header(st),
                                             "Content-Type": "application/json"})


async def get_archive(request: web.Request) -> web.StreamResponse:
    path = archive.check_path(request.query.get("path"))
    async with archive.get(request.app[ENGINE], request.match_info["id"], path) as (st, data):
        resp = web.StreamResponse(status=200, headers={
            STAT_HEADER: _stat_header(st), "Content-Type": "application/x-tar"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            async for chunk in data:
                await resp.write(chunk)
            await resp.write_eof()
    return resp


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(1 << 20):
        yield chunk


async def put_archive(request: web.Request) -> web.Response:
    path = archive.check_path(request.query.get("path"))
    await archive.put(request.app[ENGINE], request.match_info["id"], path, _body(request),
                      q_bool(request, "noOverwriteDirNonDir"))
    return web.Response(status=200)


async def export(request: web.Request) -> web.StreamResponse:
    async with archive.export(request.app[ENGINE], request.match_info["id"]) as data:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/x-tar"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            async for chunk in data:
                await resp.write(chunk)
            await resp.write_eof()
    return resp


def setup(app: web.Application) -> None:
    r = "/containers/{id}"
    add_route(app, "HEAD", f"{r}/archive", head_archive)
    add_route(app, "GET", f"{r}/archive", get_archive)
    add_route(app, "PUT", f"{r}/archive", put_archive)
    add_route(app, "GET", f"{r}/export", export)
