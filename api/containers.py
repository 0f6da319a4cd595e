"""Routes under /containers: create, lifecycle, inspect, logs, attach, wait, stats."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from aiohttp import web

from vicd.api.app import add_route, api_version, json_body, json_response, q_bool, q_int
from vicd.api.hijack import MULTIPLEXED_STREAM, RAW_STREAM, hijack, wants_upgrade
from vicd.api.keys import ENGINE
from vicd.api.streams import encode_output
from vicd.api.views import container_summary, inspect_container, stats_view, top_view
from vicd.container import Container
from vicd.engine import Attachment, Engine
from vicd.errors import InvalidParameter
from vicd.filters import PS_FILTERS, check_keys, container_matches, parse_filters
from vicd.logs import follow_logs, read_logs
from vicd.timefmt import parse_api_time, rfc3339, rfc3339_now
from vicd.update import top_with_args

CONFIG_KEYS = (
    "Hostname", "Domainname", "User", "AttachStdin", "AttachStdout", "AttachStderr", "Tty",
    "OpenStdin", "StdinOnce", "Env", "Cmd", "Image", "Volumes", "WorkingDir", "Entrypoint",
    "OnBuild", "Labels", "ExposedPorts", "StopSignal", "StopTimeout", "Healthcheck",
    "ArgsEscaped", "NetworkDisabled", "MacAddress", "Shell",
)


def engine_of(request: web.Request) -> Engine:
    return request.app[ENGINE]


def stream_content_type(request: web.Request, tty: bool) -> str:
    # API 1.42 introduced the multiplexed type; older clients always got raw-stream.
    if tty or api_version(request) < (1, 42):
        return RAW_STREAM
    return MULTIPLEXED_STREAM


# --- list, create, inspect -------------------------------------------------------


async def list_containers(request: web.Request) -> web.Response:
    engine = engine_of(request)
    filters = parse_filters(request.query.get("filters"))
    check_keys(filters, PS_FILTERS)
    show_all = q_bool(request, "all")
    limit = q_int(request, "limit", -1) or -1
    items = sorted(engine.containers.values(), key=lambda c: c.created, reverse=True)
    if limit > 0:
        show_all = True
    out = []
    for c in items:
        if not show_all and not c.state.running:
            continue
        if not container_matches(c, filters, engine):
            continue
        row = container_summary(engine, c)
        if q_bool(request, "size"):
            row["SizeRw"], row["SizeRootFs"] = engine.sizes(c)
        out.append(row)
        if 0 < limit <= len(out):
            break
    return json_response(out)


async def create_container(request: web.Request) -> web.Response:
    engine = engine_of(request)
    body = await json_body(request)
    cfg = {k: body[k] for k in CONFIG_KEYS if k in body}
    host_config = body.get("HostConfig") or {}
    if not isinstance(host_config, dict):
        raise InvalidParameter("HostConfig must be an object")
    for key in ("Env", "Cmd", "Entrypoint"):
        val = cfg.get(key)
        if isinstance(val, str):
            cfg[key] = [val]
        elif val is not None and not isinstance(val, list):
            raise InvalidParameter(f"invalid {key}: expected a list of strings")
    name = request.query.get("name") or None
    networking = body.get("NetworkingConfig") or None
    if networking is not None and not isinstance(networking, dict):
        raise InvalidParameter("NetworkingConfig must be an object")
    c, warnings = await engine.create(name, cfg, host_config, networking)
    return json_response({"Id": c.id, "Warnings": warnings}, 201)


async def inspect(request: web.Request) -> web.Response:
    engine = engine_of(request)
    c = engine.get(request.match_info["id"])
    return json_response(inspect_container(engine, c))


# --- lifecycle ----------------------------------------------------------------------


async def start(request: web.Request) -> web.Response:
    await engine_of(request).start(request.match_info["id"])
    return web.Response(status=204)


def _timeout(request: web.Request) -> int | None:
    return q_int(request, "t", q_int(request, "timeout"))


async def stop(request: web.Request) -> web.Response:
    await engine_of(request).stop(request.match_info["id"], _timeout(request),
                                  request.query.get("signal"))
    return web.Response(status=204)


async def restart(request: web.Request) -> web.Response:
    await engine_of(request).restart(request.match_info["id"], _timeout(request))
    return web.Response(status=204)


async def kill(request: web.Request) -> web.Response:
    await engine_of(request).kill(request.match_info["id"], request.query.get("signal"))
    return web.Response(status=204)


async def pause(request: web.Request) -> web.Response:
    await engine_of(request).pause(request.match_info["id"])
    return web.Response(status=204)


async def unpause(request: web.Request) -> web.Response:
    await engine_of(request).unpause(request.match_info["id"])
    return web.Response(status=204)


async def rename(request: web.Request) -> web.Response:
    await engine_of(request).rename(request.match_info["id"], request.query.get("name", ""))
    return web.Response(status=204)


async def remove(request: web.Request) -> web.Response:
    await engine_of(request).remove(
        request.match_info["id"], force=q_bool(request, "force"), volumes=q_bool(request, "v")
    )
    return web.Response(status=204)


async def prune(request: web.Request) -> web.Response:
    filters = parse_filters(request.query.get("filters"))
    removed = await engine_of(request).prune(filters)
    return json_response({"ContainersDeleted": removed or None, "SpaceReclaimed": 0})


async def resize(request: web.Request) -> web.Response:
    rows, cols = q_int(request, "h", 0), q_int(request, "w", 0)
    await engine_of(request).resize(request.match_info["id"], rows or 0, cols or 0)
    return web.Response(status=200)


# --- wait ---------------------------------------------------------------------------


async def wait(request: web.Request) -> web.StreamResponse:
    engine = engine_of(request)
    fut = await engine.wait(request.match_info["id"], request.query.get("condition", ""))
    resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    # The headers go out at once; the body only at exit (the CLI relies on it).
    try:
        code = await fut
        body = {"Error": None, "StatusCode": code}
    except asyncio.CancelledError:
        raise
    with contextlib.suppress(ConnectionError):
        await resp.write(json.dumps(body).encode() + b"\n")
        await resp.write_eof()
    return resp


# --- attach -------------------------------------------------------------------------


async def attach(request: web.Request) -> web.StreamResponse:
    engine = engine_of(request)
    c = engine.get(request.match_info["id"])
    want_stdin = q_bool(request, "stdin")
    c, att = engine.attach(c.id, q_bool(request, "stdout"), q_bool(request, "stderr"))
    tty = bool(c.config.get("Tty"))
    try:
        if q_bool(request, "logs"):
            records, _ = read_logs(engine.log_path(c), None, 0, None)
            backlog = [(s, d) for s, d, _ in records if s in att.streams]
        else:
            backlog = []
        ctype = stream_content_type(request, tty)
        if wants_upgrade(request):
            stream = await hijack(request, ctype)
            for s, d in backlog:
                await stream.write(encode_output(s, d, tty))
            if not q_bool(request, "stream", True):
                stream.close()
                return stream.response
            await _pump(engine, c, att, stream, want_stdin, tty)
            return stream.response
        resp = web.StreamResponse(status=200, headers={"Content-Type": ctype})
        await resp.prepare(request)
        for s, d in backlog:
            await resp.write(encode_output(s, d, tty))
        if q_bool(request, "stream", True):
            while (item := await att.queue.get()) is not None:
                await resp.write(encode_output(item[0], item[1], tty))
        await resp.write_eof()
        return resp
    finally:
        engine.detach(c, att)


async def _pump(engine: Engine, c: Container, att: Attachment, stream: Any,
                want_stdin: bool, tty: bool) -> None:
    """Output to the client until the container ends; stdin to the container meanwhile."""

    async def stdin_loop() -> None:
        while (data := await stream.read()) is not None:
            if want_stdin:
                engine.write_stdin(c, data)
        if want_stdin:
            engine.close_stdin(c)

    reader = asyncio.create_task(stdin_loop())
    lost = asyncio.create_task(stream.lost.wait())
    try:
        while True:
            get = asyncio.create_task(att.queue.get())
            done, _ = await asyncio.wait([get, lost], return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                break
            item = get.result()
            if item is None:
                break
            await stream.write(encode_output(item[0], item[1], tty))
    finally:
        lost.cancel()
        # Give stdin that already arrived a moment to be handed on, then end.
        if reader.done() or not want_stdin:
            reader.cancel()
        else:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(reader, 0.05)
        stream.close()


# --- logs ---------------------------------------------------------------------------


async def logs(request: web.Request) -> web.StreamResponse:
    engine = engine_of(request)
    c = engine.get(request.match_info["id"])
    want = set()
    if q_bool(request, "stdout"):
        want.add(1)
    if q_bool(request, "stderr"):
        want.add(2)
    if not want:
        raise InvalidParameter("Bad parameters: you must choose at least one stream")
    tail_q = request.query.get("tail", "all")
    tail = None if tail_q in ("", "all") else q_int(request, "tail")
    if tail is not None and tail < 0:
        tail = None
    since = parse_api_time(request.query.get("since"), 0.0)
    until_raw = parse_api_time(request.query.get("until"), 0.0)
    until = until_raw or None
    stamps = q_bool(request, "timestamps")
    follow = q_bool(request, "follow")
    tty = bool(c.config.get("Tty"))
    path = engine.log_path(c)
    records, offset = read_logs(path, tail, since, until)
    resp = web.StreamResponse(status=200)
    if api_version(request) >= (1, 42):
        resp.content_type = stream_content_type(request, tty)
    resp.enable_chunked_encoding()
    await resp.prepare(request)

    async def emit(stream: int, data: bytes, ts: str) -> None:
        if stream in want:
            if stamps:
                data = ts.encode() + b" " + data
            await resp.write(encode_output(stream, data, tty))

    with contextlib.suppress(ConnectionError):
        for s, d, ts in records:
            await emit(s, d, ts)
        if follow and c.state.running:
            rt = engine.rt(c)
            async for s, d, ts in follow_logs(path, offset, until, rt.running):
                await emit(s, d, ts)
        await resp.write_eof()
    return resp


# --- top and stats --------------------------------------------------------------------


async def top(request: web.Request) -> web.Response:
    engine = engine_of(request)
    procs = await engine.top(request.match_info["id"])
    boot = time.time() - _uptime_hint(procs)
    if request.query.get("ps_args"):
        return json_response(await top_with_args(engine, request.match_info["id"], procs,
                                                 request.query["ps_args"], boot))
    return json_response(top_view(procs, boot))


def _uptime_hint(procs: list[dict[str, Any]]) -> float:
    # The guest reports start times in ticks since its boot; its own PID 1 started at ~0.
    return max((int(p.get("uptime_ticks", 0)) for p in procs), default=0) / 100


async def stats(request: web.Request) -> web.StreamResponse:
    engine = engine_of(request)
    c = engine.get(request.match_info["id"])
    stream = q_bool(request, "stream", True)
    one_shot = q_bool(request, "one-shot")
    resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    pre, pre_t = None, "0001-01-01T00:00:00Z"
    if not stream and not one_shot:
        # Like dockerd: two samples a second apart so the CLI can compute CPU %.
        pre, pre_t = await engine.stats_sample(c), rfc3339_now()
        await asyncio.sleep(1)
    with contextlib.suppress(ConnectionError):
        loop = asyncio.get_running_loop()
        tick = loop.time()
        while True:
            cur = await engine.stats_sample(c)
            now = rfc3339(time.time_ns())
            await resp.write(json.dumps(stats_view(c, cur, pre, now, pre_t)).encode() + b"\n")
            if not stream:
                break
            pre, pre_t = cur, now
            if not c.state.running:
                break
            # One sample a second however long the guest takes to answer, as dockerd's
            # collector: the CLI blanks a row that had no update for 2 s.
            tick = max(tick + 1, loop.time())
            await asyncio.sleep(tick - loop.time())
        await resp.write_eof()
    return resp


def setup(app: web.Application) -> None:
    r = "/containers/{id}"
    for method, path, handler in (
        ("GET", "/containers/json", list_containers),
        ("POST", "/containers/create", create_container),
        ("POST", "/containers/prune", prune),
        ("GET", f"{r}/json", inspect),
        ("POST", f"{r}/start", start),
        ("POST", f"{r}/stop", stop),
        ("POST", f"{r}/restart", restart),
        ("POST", f"{r}/kill", kill),
        ("POST", f"{r}/pause", pause),
        ("POST", f"{r}/unpause", unpause),
        ("POST", f"{r}/rename", rename),
        ("POST", f"{r}/resize", resize),
        ("POST", f"{r}/wait", wait),
        ("POST", f"{r}/attach", attach),
        ("GET", f"{r}/logs", logs),
        ("GET", f"{r}/top", top),
        ("GET", f"{r}/stats", stats),
        ("DELETE", r, remove),
    ):
        add_route(app, method, path, handler)
