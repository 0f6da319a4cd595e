"""Routes under /images: list, inspect, import, load, save, tag, remove, prune, pull, push;
and POST /auth (docker login), which talks to registries too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from vicd.api.app import add_route, json_body, json_response, q_bool
from vicd.api.keys import DAEMON, ENGINE, EVENTS, IMAGES
from vicd.api.streams import stream_chunks
from vicd.errors import InvalidParameter, NotFound, VicdError
from vicd.filters import parse_filters
from vicd.image_store import apply_changes
from vicd.progress import error_line
from vicd.push import Pusher
from vicd.references import parse_normalized
from vicd.registry import (
    AuthConfig,
    Puller,
    TransferOptions,
    download_url,
    pull_reference,
)
from vicd.registry import login as registry_login

log = logging.getLogger(__name__)


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


class _ProgressStream:
    """A chunked JSON-lines response fed from any thread; a vanished client is ignored
    (the operation finishes anyway, like a pull dockerd has started)."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        self.resp.enable_chunked_encoding()
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.writer: asyncio.Task[None] | None = None

    def emit(self, item: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def __aenter__(self) -> _ProgressStream:
        await self.resp.prepare(self.request)
        self.writer = asyncio.create_task(self._write())
        return self

    async def _write(self) -> None:
        alive = True
        while (item := await self.queue.get()) is not None:
            if alive:
                try:
                    await self.resp.write(json.dumps(item).encode() + b"\n")
                except (ConnectionError, RuntimeError):
                    alive = False

    async def __aexit__(self, typ: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, Exception):  # the stream has begun: errors go inside it
            msg = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            if not isinstance(exc, VicdError):
                log.warning("stream %s failed: %s", self.request.path, msg)
            self.emit(error_line(msg))
        self.emit(None)  # type: ignore[arg-type]
        if self.writer is not None:
            await self.writer
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.resp.write_eof()
        return isinstance(exc, Exception)


async def _pull(request: web.Request) -> web.StreamResponse:
    """docker pull: the manifest is fetched before the stream starts, so a bad name, an
    unknown host, refused credentials or an unknown manifest are plain HTTP errors."""
    daemon = request.app[DAEMON]
    ref = pull_reference(request.query.get("fromImage", ""), request.query.get("tag", ""))
    auth = AuthConfig.from_header(request.headers.get("X-Registry-Auth"))
    opts = TransferOptions.from_config(daemon.config)
    puller = Puller(request.app[IMAGES], ref, auth, opts, request.query.get("platform", ""))
    async with puller:
        await puller.resolve()
        stream = _ProgressStream(request)
        image = None
        async with stream:
            image, _ = await puller.run(stream.emit)
    if image is not None:
        request.app[EVENTS].publish("image", "pull", ref.familiar(), name=ref.familiar())
    return stream.resp


async def _import_url(request: web.Request, src: str, repo: str | None, changes: list[str],
                      message: str) -> web.StreamResponse:
    """docker import http://...: download, then import; progress as dockerd streams it."""
    store = request.app[IMAGES]
    url = src if "://" in src else f"http://{src}"
    if not url.startswith(("http://", "https://")):
        raise InvalidParameter(f"unsupported URL scheme in {src!r}")
    store._import_ref(repo)  # a bad repo is a 400 before anything is fetched
    apply_changes(changes)
    fd, name = tempfile.mkstemp(dir=_tmpdir(request), suffix=".tar")
    os.close(fd)
    path = Path(name)
    img = None
    try:
        stream = _ProgressStream(request)
        async with stream:
            stream.emit({"status": f"Downloading from {url}"})
            await download_url(url, path, stream.emit)
            img = await asyncio.to_thread(
                store.import_tar, path, repo, changes, message or f"Imported from {url}")
            stream.emit({"status": img.id})
    finally:
        path.unlink(missing_ok=True)
    if img is not None:
        request.app[EVENTS].publish("image", "import", img.id, name=repo or img.id)
    return stream.resp


async def create(request: web.Request) -> web.StreamResponse:
    """``docker import`` (fromSrc) and ``docker pull`` (fromImage)."""
    store = request.app[IMAGES]
    src = request.query.get("fromSrc")
    if src is None:
        return await _pull(request)
    repo = request.query.get("repo") or None
    tag_ = request.query.get("tag")
    if repo and tag_:
        repo = f"{repo}:{tag_}"
    changes = request.query.getall("changes", [])
    message = request.query.get("message", "")
    if src != "-":
        return await _import_url(request, src, repo, changes, message)
    path = await _body_to_file(request)
    try:
        img = await asyncio.to_thread(store.import_tar, path, repo, changes, message)
    finally:
        path.unlink(missing_ok=True)
    request.app[EVENTS].publish("image", "import", img.id, name=repo or img.id)
    return json_response({"status": img.id})


async def push(request: web.Request) -> web.StreamResponse:
    """docker push: one tag, or every tag of the repository when none is given."""
    store = request.app[IMAGES]
    daemon = request.app[DAEMON]
    name = request.match_info["name"]
    repo = parse_normalized(name)
    tag_ = request.query.get("tag", "")
    if repo.digest is not None:
        raise InvalidParameter("cannot push a digest reference")
    if repo.tag is not None and not tag_:
        tag_ = repo.tag
    repo = repo.repository()
    if tag_:
        tags = [tag_] if _has_ref(store, repo.with_tag(tag_)) else []
    else:
        tags = store.repository_tags(repo)
    auth = AuthConfig.from_header(request.headers.get("X-Registry-Auth"))
    pushed: list[tuple[str, str, int]] = []
    opts = TransferOptions.from_config(daemon.config)
    async with Pusher(store, repo, tags, auth, opts) as pusher:
        stream = _ProgressStream(request)
        async with stream:
            pushed = await pusher.run(stream.emit)
    for t, _digest, _size in pushed:
        ref = repo.with_tag(t).familiar()
        request.app[EVENTS].publish("image", "push", ref, name=ref)
    return stream.resp


def _has_ref(store: Any, ref: Any) -> bool:
    try:
        img = store.get(str(ref))
    except NotFound:
        return False
    return ref.familiar() in img.repo_tags


async def auth(request: web.Request) -> web.Response:
    """POST /auth (docker login): check the credentials against the registry."""
    daemon = request.app[DAEMON]
    creds = AuthConfig.from_json(await json_body(request))
    insecure = list(getattr(daemon.config, "insecure_registries", []) or [])
    status, token = await registry_login(creds, insecure)
    return json_response({"IdentityToken": token, "Status": status})


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


async def _file_chunks(path: str) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while chunk := await asyncio.to_thread(f.read, 1 << 20):
            yield chunk


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
        resp = await stream_chunks(request, _file_chunks(tmp),
                                   {"Content-Type": "application/x-tar"})
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
    add_route(app, "POST", f"{n}/push", push)
    add_route(app, "POST", "/auth", auth)
    add_route(app, "DELETE", n, remove)
