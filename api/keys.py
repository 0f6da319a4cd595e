"""Typed application keys: the services the route modules use."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from vicd.engine import Engine
from vicd.events import EventBus
from vicd.image_store import ImageStore

ENGINE = web.AppKey("engine", Engine)
IMAGES = web.AppKey("images", ImageStore)
EVENTS = web.AppKey("events", EventBus)
DAEMON = web.AppKey("daemon", Any)
