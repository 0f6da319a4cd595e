"""The HTTP layer alone (pytest-aiohttp): versions, error mapping, headers, the hijack."""

from __future__ import annotations

import asyncio

from aiohttp import web

from vicd.api.app import add_route, api_version, json_response, make_app
from vicd.api.hijack import RAW_STREAM, hijack
from vicd.api.streams import frame
from vicd.errors import Conflict, NotFound


async def version_of(request: web.Request) -> web.Response:
    return json_response({"v": list(api_version(request))})


async def conflict(request: web.Request) -> web.Response:
    raise Conflict("busy")


async def missing(request: web.Request) -> web.Response:
    raise NotFound("No such container: x")


async def crash(request: web.Request) -> web.Response:
    raise RuntimeError("secret detail")


async def echo(request: web.Request) -> web.StreamResponse:
    """Hijacks, then frames back everything the client sends until it half-closes."""
    stream = await hijack(request, RAW_STREAM)
    while (data := await stream.read()) is not None:
        await stream.write(frame(1, data))
    await stream.write(frame(2, b"bye"))  # still writable after the client's EOF
    stream.close()
    return stream.response


def make() -> web.Application:
    def setup(app: web.Application) -> None:
        for path, h in (("/v", version_of), ("/conflict", conflict), ("/missing", missing),
                        ("/crash", crash), ("/echo", echo)):
            add_route(app, "POST" if path == "/echo" else "GET", path, h)

    return make_app(setup)


async def test_versions_and_errors(aiohttp_client):
    client = await aiohttp_client(make())
    r = await client.get("/v1.41/v")
    assert (await r.json()) == {"v": [1, 41]}
    assert r.headers["Api-Version"] == "1.47" and r.headers["Ostype"] == "linux"
    r = await client.get("/v")
    assert (await r.json()) == {"v": [1, 47]}
    r = await client.get("/v1.48/v")
    assert r.status == 400 and "too new" in (await r.json())["message"]
    r = await client.get("/conflict")
    assert r.status == 409 and (await r.json()) == {"message": "busy"}
    r = await client.get("/missing")
    assert r.status == 404 and (await r.json()) == {"message": "No such container: x"}
    r = await client.get("/crash")
    body = await r.json()
    assert r.status == 500 and "secret detail" not in body["message"]
    r = await client.get("/v1.47/no/such/route")
    assert r.status == 404 and (await r.json()) == {"message": "page not found"}


async def test_hijack_survives_half_close(aiohttp_server):
    server = await aiohttp_server(make())
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"POST /v1.41/echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                 b"Upgrade: tcp\r\nContent-Length: 0\r\n\r\nearly-bytes")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 UPGRADED")
    assert b"application/vnd.docker.raw-stream" in head
    writer.write(b"more")
    await writer.drain()
    writer.write_eof()  # the CLI half-closes when stdin ends
    data = await asyncio.wait_for(reader.read(), 10)
    assert frame(1, b"early-bytes") in data or data.startswith(frame(1, b"early-bytesmore"))
    assert data.endswith(frame(2, b"bye"))
    writer.close()
