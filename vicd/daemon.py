"""Assembles the daemon: plugins, backend, stores, engine, API listeners."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import signal
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from vicd.api import archive as archive_routes
from vicd.api import containers, system
from vicd.api import exec as exec_routes
from vicd.api import images as image_routes
from vicd.api import networks as network_routes
from vicd.api import update as update_routes
from vicd.api import volumes as volume_routes
from vicd.api.app import make_app
from vicd.api.keys import DAEMON, ENGINE, EVENTS, IMAGES
from vicd.backend import ComputeBackend
from vicd.config import Config
from vicd.engine import Engine
from vicd.errors import InvalidParameter, VicdError
from vicd.events import EventBus
from vicd.image_store import ImageStore
from vicd.networks import NetworkManager
from vicd.plugin_manager import make_plugin_manager
from vicd.volumes import VolumeManager

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.pm = make_plugin_manager()
        self.backends = self._collect_backends()
        if config.backend not in self.backends:
            raise InvalidParameter(
                f"unknown backend {config.backend!r}; available: {', '.join(sorted(self.backends))}"
            )
        self.backend: ComputeBackend = self.backends[config.backend](config)
        self.events = EventBus()
        self.images = ImageStore(config.data_root / "images")
        self.volumes = VolumeManager(
            config.data_root / "volumes",
            self._collect_drivers(self.pm.hook.register_volume_drivers))
        self.networks = NetworkManager(
            config.data_root / "networks",
            self._collect_drivers(self.pm.hook.register_network_drivers))
        self.engine = Engine(config, self.pm, self.backend, self.images, self.events,
                             self.volumes, self.networks)
        self.daemon_id = self._daemon_id()
        self.runners: list[web.AppRunner] = []

    def _collect_backends(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for result in self.pm.hook.register_compute_backends(config=self.config):
            for name, factory in (result or {}).items():
                out.setdefault(name, factory)
        return out

    def _collect_drivers(self, hook: Any) -> dict[str, Any]:
        """Volume or network drivers by name: the first plugin to offer a name wins."""
        out: dict[str, Any] = {}
        for result in hook(config=self.config):
            for name, factory in (result or {}).items():
                if name not in out:
                    out[name] = factory(self.config)
        return out

    def _daemon_id(self) -> str:
        path = self.config.data_root / "engine-id"
        try:
            return path.read_text().strip()
        except OSError:
            value = str(uuid.uuid4()).upper()
            path.write_text(value)
            return value

    def app(self) -> web.Application:
        def setup(app: web.Application) -> None:
            app[DAEMON] = self
            app[ENGINE] = self.engine
            app[IMAGES] = self.images
            app[EVENTS] = self.events
            for module in (system, containers, exec_routes, image_routes, volume_routes,
                           archive_routes, update_routes, network_routes):
                module.setup(app)

        return make_app(setup)

    async def start(self) -> None:
        self.config.data_root.mkdir(parents=True, exist_ok=True)
        await self.backend.setup()
        self.pm.hook.backend_selected(config=self.config, backend=self.backend)
        await self.engine.load()
        app = self.app()
        # Clients often leave a `wait` pending (`docker run -d` does): do not let
        # them hold a shutdown for aiohttp's default minute.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=3.0)
        await runner.setup()
        self.runners.append(runner)
        for host in self.config.hosts:
            await self._listen(runner, host)

    async def _listen(self, runner: web.AppRunner, host: str) -> None:
        if host.startswith("unix://"):
            path = Path(host[len("unix://"):])
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            site = web.UnixSite(runner, str(path))
            await site.start()
            os.chmod(path, self.config.socket_mode)
            if self.config.socket_group:
                with contextlib.suppress(KeyError):
                    os.chown(path, -1, grp.getgrnam(self.config.socket_group).gr_gid)
            log.info("API listening on %s", host)
        elif host.startswith("tcp://"):
            hostport = host[len("tcp://"):]
            h, _, p = hostport.rpartition(":")
            if h not in ("127.0.0.1", "localhost", "[::1]"):
                raise InvalidParameter("tcp:// is only allowed on loopback until TLS exists")
            site = web.TCPSite(runner, h.strip("[]"), int(p))
            await site.start()
            log.info("API listening on %s", host)
        else:
            raise InvalidParameter(f"unsupported host {host!r}: use unix:// or tcp://")

    async def stop(self) -> None:
        await self.engine.shutdown()
        for runner in self.runners:
            await runner.cleanup()
        close = getattr(self.backend, "close", None)
        if close is not None:  # optional: host resources no running VM needs
            await close(bool(self.networks.networks))


async def serve(config: Config) -> None:
    daemon = Daemon(config)
    try:
        await daemon.start()
    except VicdError as e:
        log.error("cannot start: %s", e.message)
        raise SystemExit(1) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("vicd ready (backend %s)", config.backend)
    await stop.wait()
    log.info("shutting down; container VMs keep running")
    await daemon.stop()
