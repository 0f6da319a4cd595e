"""Routes for exec: create, start (hijacked), resize, inspect."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from vicd.api.app import add_route, json_body, json_response, q_int
from vicd.api.hijack import RAW_STREAM, hijack, wants_upgrade
from vicd.api.keys import ENGINE
from vicd.api.streams import encode_output
from vicd.api.views import inspect_exec
from vicd.errors import InvalidParameter


async def exec_create(request: web.Request) -> web.Response:
    body = await json_body(request)
    cmd = body.get("Cmd")
    if isinstance(cmd, str):
        body["Cmd"] = [cmd]
    e = request.app[ENGINE].exec_create(request.match_info["id"], body)
    return json_response({"Id": e.id}, 201)


async def exec_start(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    body = await json_body(request)
    e = engine.exec_get(request.match_info["id"])
    detach = bool(body.get("Detach"))
    tty = body.get("Tty")
    if detach:
        await engine.exec_start(e.id, tty)
        return web.Response(status=200)
    stream = None
    if wants_upgrade(request):
        stream = await hijack(request, RAW_STREAM, {"Api-Version": "1.47"})
    else:
        resp = web.StreamResponse(status=200, headers={"Content-Type": RAW_STREAM})
        await resp.prepare(request)
    e = await engine.exec_start(e.id, tty)
    use_tty = bool(e.config.get("Tty")) or bool(tty)
    att = e.attachment
    assert att is not None

    async def stdin_loop() -> None:
        if stream is None:
            return
        while (data := await stream.read()) is not None:
            if e.process and e.config.get("AttachStdin"):
                e.process.write_stdin(data)
        if e.process and e.config.get("AttachStdin"):
            e.process.close_stdin()

    reader = asyncio.create_task(stdin_loop())
    try:
        while (item := await att.queue.get()) is not None:
            data = encode_output(item[0], item[1], use_tty)
            if stream is not None:
                await stream.write(data)
                if stream.lost.is_set():
                    break
            else:
                await resp.write(data)
    finally:
        reader.cancel()
        if stream is not None:
            stream.close()
    if stream is not None:
        return stream.response
    with contextlib.suppress(ConnectionError):
        await resp.write_eof()
    return resp


async def exec_resize(request: web.Request) -> web.Response:
    rows, cols = q_int(request, "h", 0) or 0, q_int(request, "w", 0) or 0
    if rows < 0 or cols < 0:
        raise InvalidParameter("invalid height or width")
    await request.app[ENGINE].exec_resize(request.match_info["id"], rows, cols)
    return web.Response(status=200)


async def exec_inspect(request: web.Request) -> web.Response:
    return json_response(inspect_exec(request.app[ENGINE].exec_get(request.match_info["id"])))


def setup(app: web.Application) -> None:
    add_route(app, "POST", "/containers/{id}/exec", exec_create)
    add_route(app, "POST", "/exec/{id}/start", exec_start)
    add_route(app, "POST", "/exec/{id}/resize", exec_resize)
    add_route(app, "GET", "/exec/{id}/json", exec_inspect)
