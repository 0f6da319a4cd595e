"""Routes for a container's files: /containers/{id}/archive (docker cp) and /export."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from vicd import archive, changes
from vicd.api.app import add_route, json_body, json_response, q_bool
from vicd.api.keys import ENGINE
from vicd.api.streams import stream_chunks
from vicd.errors import InvalidParameter

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
        return await stream_chunks(request, data, {
            STAT_HEADER: _stat_header(st), "Content-Type": "application/x-tar"})


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(1 << 20):
        yield chunk


async def put_archive(request: web.Request) -> web.Response:
    path = archive.check_path(request.query.get("path"))
    await archive.put(request.app[ENGINE], request.match_info["id"], path, _body(request),
                      q_bool(request, "noOverwriteDirNonDir"), q_bool(request, "copyUIDGID"))
    return web.Response(status=200)


async def export(request: web.Request) -> web.StreamResponse:
    async with archive.export(request.app[ENGINE], request.match_info["id"]) as data:
        return await stream_chunks(request, data, {"Content-Type": "application/x-tar"})


async def container_changes(request: web.Request) -> web.Response:
    out = await changes.diff(request.app[ENGINE], request.match_info["id"])
    return json_response(out or None)


async def commit(request: web.Request) -> web.Response:
    q = request.query
    container = q.get("container", "")
    if not container:
        raise InvalidParameter("No container specified")
    body = await json_body(request)
    image_id = await changes.commit(
        request.app[ENGINE], container, q.get("repo", ""), q.get("tag", ""),
        q.get("comment", ""), q.get("author", ""), q_bool(request, "pause", True),
        q.getall("changes", []), body or None)
    return json_response({"Id": image_id}, 201)


def setup(app: web.Application) -> None:
    r = "/containers/{id}"
    add_route(app, "HEAD", f"{r}/archive", head_archive)
    add_route(app, "GET", f"{r}/archive", get_archive)
    add_route(app, "PUT", f"{r}/archive", put_archive)
    add_route(app, "GET", f"{r}/export", export)
    add_route(app, "GET", f"{r}/changes", container_changes)
    add_route(app, "POST", "/commit", commit)
