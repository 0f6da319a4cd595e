"""The aiohttp application: version prefixes, errors, headers, request ids."""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from vicd import __version__
from vicd.errors import InvalidParameter, VicdError

log = logging.getLogger("vicd.api")

API_VERSION = "1.47"
MIN_API_VERSION = "1.24"
SERVER = f"vicd/{__version__} (linux)"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = web.RequestKey("request_id", str)
REQUEST_API_VERSION = web.RequestKey("api_version", tuple)
_request_ids = itertools.count(1)


def version_tuple(v: str) -> tuple[int, int]:
    major, _, minor = v.partition(".")
    return int(major), int(minor or 0)


def api_version(request: web.Request) -> tuple[int, int]:
    """The API version the client named in the path (the newest when it named none)."""
    return request.get(REQUEST_API_VERSION, version_tuple(API_VERSION))


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(data).encode() + b"\n", status=status, content_type="application/json"
    )


def error_response(message: str, status: int) -> web.Response:
    return json_response({"message": message}, status)


@web.middleware
async def errors_and_versions(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = f"{next(_request_ids):06d}"
    request[REQUEST_ID] = rid
    t0 = time.monotonic()
    status = 500
    try:
        version = request.match_info.get("version")
        if version is not None:
            request[REQUEST_API_VERSION] = _check_version(version)
        resp = await handler(request)
        status = resp.status
        return resp
    except VicdError as e:
        status = e.status
        if status == 304:
            return web.Response(status=304)
        return error_response(e.message, status)
    except web.HTTPException as e:
        status = e.status
        if status == 404:
            return error_response("page not found", 404)
        if status == 405:
            return error_response("method not allowed", 405)
        return error_response(e.reason or str(e), status)
    except (ConnectionResetError, web.HTTPClientError):
        status = 499
        raise
    except Exception as e:
        log.exception("request_id=%s unhandled error", rid)
        return error_response(f"internal error (request {rid}): {type(e).__name__}", 500)
    finally:
        log.info(
            "request_id=%s method=%s path=%s status=%s ms=%.1f",
            rid, request.method, request.path, status, (time.monotonic() - t0) * 1000,
        )


def _check_version(v: str) -> tuple[int, int]:
    try:
        vt = version_tuple(v)
    except ValueError:
        raise web.HTTPNotFound() from None
    if vt > version_tuple(API_VERSION):
        raise InvalidParameter(
            f"client version {v} is too new. Maximum supported API version is {API_VERSION}"
        )
    if vt < version_tuple(MIN_API_VERSION):
        raise InvalidParameter(
            f"client version {v} is too old. Minimum supported API version is "
            f"{MIN_API_VERSION}, please upgrade your client to a newer version"
        )
    return vt


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    if response.status == 101 and "exec" not in request.path:
        return  # dockerd's attach 101 carries only the upgrade headers
    response.headers["Api-Version"] = API_VERSION
    response.headers["Docker-Experimental"] = "false"
    response.headers["Ostype"] = "linux"
    response.headers["Server"] = SERVER


def add_route(app: web.Application, method: str, path: str, handler: Handler) -> None:
    """Register ``path`` both bare and under ``/v{version}``, as dockerd serves it."""
    app.router.add_route(method, path, handler)
    app.router.add_route(method, "/v{version}" + path, handler)


def make_app(setup: Callable[[web.Application], None]) -> web.Application:
    app = web.Application(middlewares=[errors_and_versions], client_max_size=0)
    app.on_response_prepare.append(_add_headers)
    setup(app)
    return app


# --- query helpers shared by the route modules -------------------------------


def q_bool(request: web.Request, name: str, default: bool = False) -> bool:
    v = request.query.get(name)
    if v is None or v == "":
        return default
    return v.lower() not in ("0", "false", "no")


def q_int(request: web.Request, name: str, default: int | None = None) -> int | None:
    v = request.query.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise InvalidParameter(f"invalid value for {name}: {v!r}") from None


async def json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise InvalidParameter(f"invalid JSON: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidParameter("invalid JSON: expected an object")
    return data
