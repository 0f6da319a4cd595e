"""Routes for the daemon itself: ping, version, info, events, df."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import time
from typing import Any

from aiohttp import web

from vicd import __version__
from vicd.api.app import API_VERSION, MIN_API_VERSION, add_route, json_response
from vicd.api.keys import DAEMON, ENGINE, EVENTS, IMAGES
from vicd.events import matches, validate_filters
from vicd.filters import parse_filters
from vicd.plugin_manager import plugin_list
from vicd.timefmt import parse_api_time, rfc3339_now

PING_HEADERS = {
    "Cache-Control": "no-cache, no-store, must-revalidate",
    "Pragma": "no-cache",
}


async def ping(request: web.Request) -> web.Response:
    if request.method == "HEAD":
        return web.Response(status=200, headers=PING_HEADERS, content_type="text/plain")
    return web.Response(text="OK", headers=PING_HEADERS, content_type="text/plain")


async def version(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    binfo = daemon.backend.info()
    return json_response({
        "Platform": {"Name": "vicd"},
        "Components": [
            {"Name": "Engine", "Version": __version__,
             "Details": {"ApiVersion": API_VERSION, "MinAPIVersion": MIN_API_VERSION,
                         "Os": "linux", "Arch": "amd64", "KernelVersion": platform.release()}},
            {"Name": "vicd-backend", "Version": binfo.get("backend", ""),
             "Details": {k: str(v) for k, v in binfo.items()}},
        ],
        "Version": __version__,
        "ApiVersion": API_VERSION,
        "MinAPIVersion": MIN_API_VERSION,
        "GitCommit": "",
        "GoVersion": "",
        "Os": "linux",
        "Arch": "amd64",
        "KernelVersion": platform.release(),
        "BuildTime": "",
    })


def _mem_total() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


async def info(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    engine = request.app[ENGINE]
    binfo = daemon.backend.info()
    plugins = plugin_list(daemon.pm)
    guest_kernel = binfo.get("guest_kernel", "")
    data: dict[str, Any] = {
        "ID": daemon.daemon_id,
        **engine.counts(),
        "Images": len(request.app[IMAGES].list()),
        "Driver": "vicd-qcow2",
        "DriverStatus": [
            ["Backend", binfo.get("backend", "")],
            ["Accelerator", binfo.get("accelerator", "")],
            ["Guest kernel", guest_kernel],
            ["QEMU", binfo.get("qemu", "")],
            ["Templates", binfo.get("templates", "")],
            *[["Plugin", f"{p['name']} {p['version']}"] for p in plugins],
        ],
        "Plugins": {
            "Volume": sorted(engine.volumes.drivers),
            "Network": sorted({"bridge", "null", *engine.networks.drivers}),
            "Authorization": None,
            "Log": ["json-file"],
        },
        "MemoryLimit": True, "SwapLimit": False, "KernelMemory": False,
        "KernelMemoryTCP": False, "CpuCfsPeriod": True, "CpuCfsQuota": True,
        "CPUShares": True, "CPUSet": False, "PidsLimit": False, "IPv4Forwarding": False,
        "BridgeNfIptables": False, "BridgeNfIp6tables": False,
        "Debug": daemon.config.debug, "NFd": len(os.listdir("/proc/self/fd")),
        "OomKillDisable": False, "NGoroutines": len(asyncio.all_tasks()),
        "SystemTime": rfc3339_now(), "LoggingDriver": "json-file", "CgroupDriver": "none",
        "CgroupVersion": "", "NEventsListener": len(request.app[EVENTS].subscribers),
        # The kernel containers see is the guest's: that is what `docker info` reports.
        "KernelVersion": guest_kernel or platform.release(),
        "OperatingSystem": f"vicd {binfo.get('backend', '')} ({binfo.get('accelerator', '')})",
        "OSVersion": "", "OSType": "linux", "Architecture": platform.machine(),
        "IndexServerAddress": "https://index.docker.io/v1/",
        "RegistryConfig": {"AllowNondistributableArtifactsCIDRs": None,
                           "AllowNondistributableArtifactsHostnames": None,
                           "InsecureRegistryCIDRs": ["127.0.0.0/8"], "IndexConfigs": {},
                           "Mirrors": None},
        "NCPU": os.cpu_count() or 1, "MemTotal": _mem_total(), "GenericResources": None,
        "DockerRootDir": str(daemon.config.data_root), "HttpProxy": "", "HttpsProxy": "",
        "NoProxy": "", "Name": daemon.config.name or platform.node(),
        "Labels": daemon.config.labels, "ExperimentalBuild": False,
        "ServerVersion": __version__,
        "Runtimes": {"vicd": {"path": f"vicd-{binfo.get('backend', '')}"}},
        "DefaultRuntime": "vicd",
        "Swarm": {"NodeID": "", "NodeAddr": "", "LocalNodeState": "inactive",
                  "ControlAvailable": False, "Error": "", "RemoteManagers": None},
        "LiveRestoreEnabled": True, "Isolation": "", "InitBinary": "",
        "ContainerdCommit": {"ID": "", "Expected": ""}, "RuncCommit": {"ID": "", "Expected": ""},
        "InitCommit": {"ID": "", "Expected": ""}, "SecurityOptions": ["name=vm-isolation"],
        "Warnings": None,
    }
    return json_response(data)


async def events(request: web.Request) -> web.StreamResponse:
    bus = request.app[EVENTS]
    filters = parse_filters(request.query.get("filters"))
    validate_filters(filters)
    now = time.time()
    since = parse_api_time(request.query.get("since"), now)
    until_q = request.query.get("until")
    until = parse_api_time(until_q) if until_q else None
    q = bus.subscribe()
    try:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        until_ns = int(until * 1e9) if until is not None else None
        sent = 0
        with contextlib.suppress(ConnectionError):
            if request.query.get("since"):
                for ev in bus.past(int(since * 1e9), until_ns):
                    if matches(ev, filters):
                        await resp.write(json.dumps(ev).encode() + b"\n")
                        sent += 1
            while True:
                timeout = None if until is None else max(until - time.time(), 0)
                try:
                    ev = await asyncio.wait_for(q.get(), timeout)
                except TimeoutError:
                    break
                if until_ns is not None and ev["timeNano"] > until_ns:
                    break
                if matches(ev, filters):
                    await resp.write(json.dumps(ev).encode() + b"\n")
            await resp.write_eof()
        return resp
    finally:
        bus.unsubscribe(q)


async def system_df(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    images = request.app[IMAGES].list()
    from vicd.api.views import container_summary

    img_rows = []
    for img in images:
        row = img.summary()
        row["Containers"] = sum(1 for c in engine.containers.values() if c.image_id == img.id)
        row["SharedSize"] = 0
        img_rows.append(row)
    containers = []
    for c in engine.containers.values():
        row = container_summary(engine, c)
        row["SizeRw"] = _disk_usage(engine.store.dir_for(c.id))
        row["SizeRootFs"] = row["SizeRw"]
        containers.append(row)
    return json_response({
        "LayersSize": sum(i.size for i in images),
        "Images": img_rows,
        "Containers": containers,
        "Volumes": _volumes_df(engine),
        "BuildCache": [],
        "BuilderSize": 0,
    })


def _volumes_df(engine: Any) -> list[dict[str, Any]]:
    out = []
    for v in engine.volumes.list():
        row = engine.volumes.view(v)
        drv = engine.volumes.drivers.get(v.driver)
        row["UsageData"] = {"Size": drv.usage(v.name) if drv else -1,
                            "RefCount": len(engine.volume_users(v.name))}
        out.append(row)
    return out


def _disk_usage(path: Any) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for root, _, files in os.walk(path):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


def setup(app: web.Application) -> None:
    add_route(app, "GET", "/_ping", ping)
    add_route(app, "HEAD", "/_ping", ping)
    add_route(app, "GET", "/version", version)
    add_route(app, "GET", "/info", info)
    add_route(app, "GET", "/events", events)
    add_route(app, "GET", "/system/df", system_df)
