"""A fake NSX Manager for tests: the NSX-T Policy API over real HTTP, state in memory.

No NSX Manager runs here. This serves the part of VMware's published NSX-T
Policy API (``/policy/api/v1``) that vicd's ``nsx`` network plugin uses,
with requests and answers shaped as the API reference gives them:

- ``GET /infra/sites/default/enforcement-points/default/transport-zones[/<id>]``
- ``GET /infra/segments``; ``GET|PATCH|PUT|DELETE /infra/segments/<id>``
- ``GET /infra/segments/<id>/ports``; ``GET|PATCH|PUT|DELETE .../ports/<port>``
- ``GET|PATCH|PUT|DELETE /infra/domains/<d>/groups/<id>``, and
  ``GET .../groups/<id>/members/segment-ports`` (the ports its Tag conditions select)
- ``GET /infra/domains/<d>/security-policies``;
  ``GET|PATCH|PUT|DELETE .../security-policies/<id>`` (rules inline)

HTTP basic auth as NSX Manager takes it; a PATCH answers 200 with no body,
a PUT answers the object, a DELETE of a missing object answers 200; errors
carry NSX's error body (``policy.PolicyError``). With ``--vcenter`` a
segment is realized as an NSX-backed port group on the simulator's
distributed switch (``realize.py``), which is what NSX does in vCenter.

    python contrib/nsxfake/nsxfake.py --listen 127.0.0.1:0 --port-file /tmp/nsx.port \\
        --user admin --password-env NSXFAKE_PASSWORD \\
        --vcenter http://u:p@127.0.0.1:PORT/sdk --datacenter DC0 \\
        --transport-zone vicd-overlay-tz=DVS0
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from policy import TZ_BASE, PolicyError, PolicyStore, bad  # noqa: E402

log = logging.getLogger("nsxfake")
API = "/policy/api/v1"


class FakeNsxManager:
    def __init__(self, user: str, password: str, realizer: Any = None,
                 throttle: int = 0, realize_delay: float = 0.0) -> None:
        self.user, self.password = user, password
        # Every Nth request is refused with 429, as NSX's per-client rate limit does.
        self.throttle = throttle
        # Seconds between accepting a segment and its port group in vCenter (0: at once,
        # before the answer, and a failure is the answer).
        self.realize_delay = realize_delay
        self.store = PolicyStore(user=user)
        self.realizer = realizer
        self.tz_switch: dict[str, str] = {}  # transport zone path -> the VDS it spans
        self.requests = 0
        self._background: set[asyncio.Future[Any]] = set()
        self._lock = asyncio.Lock()  # one write at a time, as NSX serializes per object

    def add_transport_zone(self, tz_id: str, dvs: str) -> None:
        tz = self.store.add_transport_zone(tz_id)
        self.tz_switch[tz["path"]] = dvs

    # --- HTTP ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        tz = f"{API}{TZ_BASE}"
        r.add_get(tz, self.list_tz)
        r.add_get(f"{tz}/{{tz}}", self.get_tz)
        r.add_get(f"{API}/infra/segments", self.list_segments)
        r.add_route("*", f"{API}/infra/segments/{{seg}}", self.segment)
        r.add_get(f"{API}/infra/segments/{{seg}}/ports", self.list_ports)
        r.add_route("*", f"{API}/infra/segments/{{seg}}/ports/{{port}}", self.port)
        r.add_route("*", f"{API}/infra/domains/{{domain}}/groups/{{gid}}", self.group)
        r.add_get(f"{API}/infra/domains/{{domain}}/groups/{{gid}}/members/segment-ports",
                  self.group_ports)
        r.add_get(f"{API}/infra/domains/{{domain}}/security-policies", self.list_policies)
        r.add_route("*", f"{API}/infra/domains/{{domain}}/security-policies/{{pid}}",
                    self.policy)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests += 1
        if self.throttle and self.requests % self.throttle == 0:
            log.info("%s %s -> 429 (rate limit)", request.method, request.path)
            return web.json_response(
                {"httpStatus": "TOO_MANY_REQUESTS", "error_code": 102, "module_name": "common-"
                 "services", "error_message": f"Client '{self.user}' exceeded request rate of "
                 "100 per second"}, status=429, headers={"Retry-After": "0"})
        if not self._authorized(request.headers.get("Authorization", "")):
            return web.json_response(
                {"module_name": "common-services", "error_code": 403,
                 "error_message": "The credentials were incorrect or the account specified "
                                  "has been locked."}, status=403)
        try:
            resp = await handler(request)
        except PolicyError as e:
            log.info("%s %s -> %d %s", request.method, request.path, e.status, e.message)
            return web.json_response(e.body(), status=e.status)
        except web.HTTPException as e:
            if e.status == 404 or e.status == 405:
                err = PolicyError(e.status, 500090 if e.status == 404 else 500091,
                                  f"The requested URI: {request.path} could not be found."
                                  if e.status == 404 else
                                  f"Method {request.method} is not allowed on {request.path}.")
                return web.json_response(err.body(), status=e.status)
            raise
        log.info("%s %s -> %d", request.method, request.path, resp.status)
        return resp

    def _authorized(self, header: str) -> bool:
        kind, _, value = header.partition(" ")
        if kind.lower() != "basic":
            return False
        try:
            user, _, pwd = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(user, self.user) and hmac.compare_digest(pwd, self.password)

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad("The request body is not valid JSON.", 255) from None
        if not isinstance(body, dict):
            raise bad("The request body must be a JSON object.", 255)
        return body

    @staticmethod
    def _list(items: list[dict[str, Any]]) -> web.Response:
        return web.json_response({"results": items, "result_count": len(items),
                                  "sort_by": "display_name", "sort_ascending": True})

    async def _crud(self, request: web.Request, path: str, write: Any, delete: Any
                    ) -> web.Response:
        if request.method == "GET":
            return web.json_response(self.store.get(path))
        if request.method in ("PATCH", "PUT"):
            body = await self._body(request)
            async with self._lock:
                obj = await write(body, request.method == "PUT")
            return web.json_response(obj) if request.method == "PUT" else web.Response()
        if request.method == "DELETE":
            async with self._lock:
                await delete()
            return web.Response()
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "PATCH", "PUT", "DELETE"])

    def _realize_later(self, seg: dict[str, Any], dvs: str) -> None:
        task = asyncio.ensure_future(asyncio.to_thread(self.realizer.create, seg, dvs))
        self._background.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._background.discard)

    # --- handlers -----------------------------------------------------------------------

    async def list_tz(self, request: web.Request) -> web.Response:
        return self._list(self.store.children(TZ_BASE, "PolicyTransportZone"))

    async def get_tz(self, request: web.Request) -> web.Response:
        return web.json_response(self.store.get(f"{TZ_BASE}/{request.match_info['tz']}"))

    async def list_segments(self, request: web.Request) -> web.Response:
        return self._list(self.store.children("/infra/segments", "Segment"))

    async def segment(self, request: web.Request) -> web.Response:
        seg_id = request.match_info["seg"]

        async def write(body: dict[str, Any], replace: bool) -> dict[str, Any]:
            seg, old = self.store.write_segment(seg_id, body, replace)
            if old is None and self.realizer is not None:
                dvs = self.tz_switch.get(seg.get("transport_zone_path", ""))
                if dvs is None:
                    self.store.delete(seg["path"])
                    raise bad("A segment realized in vCenter needs a transport_zone_path.",
                              503040)
                if self.realize_delay:
                    # As NSX does: the intent is accepted, realization follows.
                    asyncio.get_running_loop().call_later(
                        self.realize_delay, self._realize_later, seg, dvs)
                    return seg
                try:
                    await asyncio.to_thread(self.realizer.create, seg, dvs)
                except Exception as e:  # noqa: BLE001 - reported as NSX's realization error
                    self.store.delete(seg["path"])
                    log.warning("realization of %s failed: %s", seg["path"], e)
                    raise PolicyError(500, 503200, f"Realization of segment {seg_id} in the "
                                      f"compute manager failed: {type(e).__name__}") from None
            return seg

        async def delete() -> None:
            seg = self.store.delete_segment(seg_id)
            if seg is not None and self.realizer is not None:
                await asyncio.to_thread(self.realizer.delete, seg)

        return await self._crud(request, f"/infra/segments/{seg_id}", write, delete)

    async def list_ports(self, request: web.Request) -> web.Response:
        seg = f"/infra/segments/{request.match_info['seg']}"
        self.store.get(seg)
        return self._list(self.store.children(f"{seg}/ports", "SegmentPort"))

    async def port(self, request: web.Request) -> web.Response:
        seg, port = request.match_info["seg"], request.match_info["port"]

        async def write(body: dict[str, Any], replace: bool) -> dict[str, Any]:
            return self.store.write_port(seg, port, body, replace)

        async def delete() -> None:
            self.store.delete(f"/infra/segments/{seg}/ports/{port}")

        return await self._crud(request, f"/infra/segments/{seg}/ports/{port}", write, delete)

    async def group(self, request: web.Request) -> web.Response:
        domain, gid = request.match_info["domain"], request.match_info["gid"]
        self._domain(domain)

        async def write(body: dict[str, Any], replace: bool) -> dict[str, Any]:
            return self.store.write_group(domain, gid, body, replace)

        async def delete() -> None:
            self.store.delete_group(domain, gid)

        return await self._crud(request, f"/infra/domains/{domain}/groups/{gid}", write, delete)

    async def group_ports(self, request: web.Request) -> web.Response:
        domain, gid = request.match_info["domain"], request.match_info["gid"]
        return self._list(self.store.group_members(domain, gid))

    async def list_policies(self, request: web.Request) -> web.Response:
        domain = request.match_info["domain"]
        self._domain(domain)
        return self._list(self.store.children(f"/infra/domains/{domain}/security-policies",
                                              "SecurityPolicy"))

    async def policy(self, request: web.Request) -> web.Response:
        domain, pid = request.match_info["domain"], request.match_info["pid"]
        self._domain(domain)

        async def write(body: dict[str, Any], replace: bool) -> dict[str, Any]:
            return self.store.write_policy(domain, pid, body, replace)

        async def delete() -> None:
            self.store.delete(f"/infra/domains/{domain}/security-policies/{pid}")

        return await self._crud(request, f"/infra/domains/{domain}/security-policies/{pid}",
                                write, delete)

    @staticmethod
    def _domain(domain: str) -> None:
        if domain != "default":  # the only domain an NSX Manager has unless one is made
            raise PolicyError(404, 500090, f"The path=[/infra/domains/{domain}] is invalid.")


async def serve(args: argparse.Namespace) -> None:
    password = os.environ.get(args.password_env, "") if args.password_env else args.password
    if not password:
        raise SystemExit("nsxfake: no password (--password or --password-env)")
    realizer = None
    if args.vcenter:
        from realize import Realizer

        from vicd.plugins.vsphere.client import VimClient
        from vicd.plugins.vsphere.settings import VSphereSettings

        settings = VSphereSettings(url=args.vcenter)
        settings._load_credentials()
        realizer = Realizer(VimClient(settings, "nsxfake"), args.datacenter)
        await asyncio.to_thread(realizer.connect)
    mgr = FakeNsxManager(args.user, password, realizer, args.throttle, args.realize_delay)
    for spec in args.transport_zone or ["vicd-overlay-tz=DVS0"]:
        tz_id, _, dvs = spec.partition("=")
        mgr.add_transport_zone(tz_id, dvs)
    runner = web.AppRunner(mgr.app(), access_log=None)
    await runner.setup()
    host, _, port = args.listen.rpartition(":")
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    site = web.TCPSite(runner, host or "127.0.0.1", int(port or 0), ssl_context=tls)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    log.info("fake NSX Manager on %s://%s:%d%s", "https" if tls else "http", host, bound, API)
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(f"{bound}\n")
        tmp.rename(args.port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--port-file", help="write the bound port here once serving")
    p.add_argument("--user", default="admin")
    p.add_argument("--password", default="")
    p.add_argument("--password-env", help="read the password from this environment variable")
    p.add_argument("--vcenter", help="realize segments as port groups in this vCenter (SDK URL "
                                     "with credentials)")
    p.add_argument("--datacenter", default="DC0")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM) ...")
    p.add_argument("--tls-key", help="... and key")
    p.add_argument("--throttle", type=int, default=0,
                   help="answer every Nth request with 429 (NSX's rate limit)")
    p.add_argument("--realize-delay", type=float, default=0.0,
                   help="realize segments in vCenter this many seconds after accepting them")
    p.add_argument("--transport-zone", action="append",
                   help="ID=DVS: a transport zone and the distributed switch it spans "
                        "(default vicd-overlay-tz=DVS0)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
