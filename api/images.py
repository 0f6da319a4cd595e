"""Routes under /images: list, inspect, import, load, save, tag, remove, prune."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web
from vicd.api.app import add_route, json_response, q_bool
from vicd.api.keys import DAEMON, ENGINE, EVENTS, IMAGES

from vicd.errors import InvalidParameter, NotFound
from vicd.filters import parse_filters


def _tmpdir(request: web.Request) -> Path:
    d = request.app[DAEMON].config.data_root / "tmp"
    d.mkdir(parents=True, exist_ok=True)
    return d


async def _body_to_file(request: web.Request) -> Path:
    """Spool the upload to disk: archives can be far larger than memory allows."""
    fd, name = tempfile.mkstemp(dir=_tmpdir(request), suffix=".tar")
    with os.fdopen(fd, "wb") as f:
        async for chunk in request.content.iter_chunked(1 << 20):
            await asyncio.to_thread(f.write, chunk)
    return Path(name)


async def list_images(request: web.Request) -> web.Response:
    store = request.app[IMAGES]
    filters = parse_filters(request.query.get("filters"))
    images = await asyncio.to_thread(store.list, filters)
    out = [img.summary() for img in images]
    engine = request.app[ENGINE]
    for s in out:
        s["Containers"] = -1 if not q_bool(request, "shared-size") else sum(
            1 for c in engine.containers.values() if c.image_id == s["Id"])
    out.sort(key=lambda s: s["Created"], reverse=True)
    return json_response(out)


async def inspect_image(request: web.Request) -> web.Response:
    img = request.app[IMAGES].get(request.match_info["name"])
    return json_response(img.inspect())


async def history(request: web.Request) -> web.Response:
    return json_response(request.app[IMAGES].history(request.match_info["name"]))


async def tag(request: web.Request) -> web.Response:
    store = request.app[IMAGES]
    name = request.match_info["name"]
    repo = request.query.get("repo", "")
    tag_ = request.query.get("tag", "") or "latest"
    if not repo:
        raise InvalidParameter("repository name must have at least one component")
    img = store.get(name)
    await asyncio.to_thread(store.tag, name, repo, tag_)
    request.app[EVENTS].publish("image", "tag", img.id, name=f"{repo}:{tag_}")
    return web.Response(status=201)


async def remove(request: web.Request) -> web.Response:
    store = request.app[IMAGES]
    engine = request.app[ENGINE]
    name = request.match_info["name"]
    img = store.get(name)
    result = await asyncio.to_thread(
        store.remove, name, q_bool(request, "force"), engine.image_user,
        engine.image_running_user,
    )
    for item in result:
        if "Untagged" in item:
            request.app[EVENTS].publish("image", "untag", img.id, name=item["Untagged"])
        if "Deleted" in item:
            request.app[EVENTS].publish("image", "delete", item["Deleted"], name=name)
    return json_response(result)


async def prune(request: web.Request) -> web.Response:
    store = request.app[IMAGES]
    engine = request.app[ENGINE]
    filters = parse_filters(request.query.get("filters"))
    dangling = filters.pop("dangling", ["true"])
    dangling_only = not dangling or dangling[0].lower() in ("1", "true")
    result = await asyncio.to_thread(store.prune, dangling_only, engine.image_user, filters)
    for item in result.get("ImagesDeleted") or []:
        if "Deleted" in item:
            request.app[EVENTS].publish("image", "delete", item["Deleted"])
    return json_response(result)


async def create(request: web.Request) -> web.StreamResponse:
    """``docker import`` (fromSrc) and ``docker pull`` (fromImage)."""
    store = request.app[IMAGES]
    src = request.query.get("fromSrc")
    if src is None:
        image = request.query.get("fromImage", "")
        raise NotFound(
            f"pull access denied for {image}: pulling from registries is not supported yet"
        )
    repo = request.query.get("repo") or None
    tag_ = request.query.get("tag")
    if repo and tag_:
        repo = f"{repo}:{tag_}"
    changes = request.query.getall("changes", [])
    message = request.query.get("message", "")
    if src != "-":
        raise InvalidParameter("importing from a URL is not supported yet; use '-'")
    path = await _body_to_file(request)
    try:
        img = await asyncio.to_thread(store.import_tar, path, repo, changes, message)
    finally:
        path.unlink(missing_ok=True)
    request.app[EVENTS].publish("image", "import", img.id, name=repo or img.id)
    return json_response({"status": img.id})


async def load(request: web.Request) -> web.StreamResponse:
    store = request.app[IMAGES]
    quiet = q_bool(request, "quiet", False)
    path = await _body_to_file(request)
    resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    resp.enable_chunked_encoding()
    loop = asyncio.get_running_loop()
    progress: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def on_progress(item: dict[str, Any]) -> None:
        if not quiet:
            loop.call_soon_threadsafe(progress.put_nowait, item)

    async def run() -> list[str]:
        try:
            return await asyncio.to_thread(store.load, path, on_progress)
        finally:
            loop.call_soon_threadsafe(progress.put_nowait, None)
            path.unlink(missing_ok=True)

    task = asyncio.create_task(run())
    await resp.prepare(request)
    while (item := await progress.get()) is not None:
        with contextlib.suppress(ConnectionError):
            await resp.write(json.dumps(item).encode() + b"\n")
    try:
        lines = await task
    except Exception as e:  # the stream has begun: errors go inside it, as dockerd does
        msg = getattr(e, "message", str(e))
        await resp.write(json.dumps({"errorDetail": {"message": msg}, "error": msg}).encode()
                         + b"\n")
        await resp.write_eof()
        return resp
    for line in lines:
        await resp.write(json.dumps({"stream": line + "\n"}).encode() + b"\n")
        ref = line.split(": ", 1)[-1]
        request.app[EVENTS].publish("image", "load", ref, name=ref)
    await resp.write_eof()
    return resp


async def save(request: web.Request) -> web.StreamResponse:
    store = request.app[IMAGES]
    names = request.query.getall("names", [])
    if "name" in request.match_info:
        names = [request.match_info["name"]]
    if not names:
        raise InvalidParameter("no images given")
    for n in names:
        store.get(n)  # 404 before the stream starts
    fd, tmp = tempfile.mkstemp(dir=_tmpdir(request), suffix=".tar")
    try:
        with os.fdopen(fd, "wb") as f:
            await asyncio.to_thread(store.save, names, f)
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/x-tar"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        with open(tmp, "rb") as f:
            while chunk := await asyncio.to_thread(f.read, 1 << 20):
                await resp.write(chunk)
        await resp.write_eof()
        for n in names:
            request.app[EVENTS].publish("image", "save", store.get(n).id, name=n)
        return resp
    finally:
        os.unlink(tmp)


def setup(app: web.Application) -> None:
    n = "/images/{name:.+}"
    add_route(app, "GET", "/images/json", list_images)
    add_route(app, "POST", "/images/create", create)
    add_route(app, "POST", "/images/load", load)
    add_route(app, "GET", "/images/get", save)
    add_route(app, "POST", "/images/prune", prune)
    add_route(app, "GET", f"{n}/json", inspect_image)
    add_route(app, "GET", f"{n}/history", history)
    add_route(app, "GET", f"{n}/get", save)
    add_route(app, "POST", f"{n}/tag", tag)
    add_route(app, "DELETE", n, remove)
