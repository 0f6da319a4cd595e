"""Docker events: a bounded history plus live subscribers."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from vicd.errors import InvalidParameter

EVENT_FILTERS = {"container", "event", "image", "label", "type", "volume", "network", "daemon"}


def make_event(typ: str, action: str, actor_id: str, attributes: dict[str, str]) -> dict[str, Any]:
    now = time.time_ns()
    ev: dict[str, Any] = {
        "Type": typ,
        "Action": action,
        "Actor": {"ID": actor_id, "Attributes": attributes},
        "scope": "local",
        "time": now // 1_000_000_000,
        "timeNano": now,
    }
    if typ in ("container", "image"):
        # The pre-1.22 fields the CLI still prints for containers.
        ev["status"] = action
        ev["id"] = actor_id
        if "image" in attributes:
            ev["from"] = attributes["image"]
    return ev


def validate_filters(filters: dict[str, list[str]]) -> None:
    for key in filters:
        if key not in EVENT_FILTERS:
            raise InvalidParameter(f"Invalid filter '{key}'")


def matches(ev: dict[str, Any], filters: dict[str, list[str]]) -> bool:
    attrs = ev["Actor"]["Attributes"]
    for key, values in filters.items():
        if not values:
            continue
        if key == "type" and ev["Type"] not in values:
            return False
        if key == "event" and not any(
            ev["Action"] == v or ev["Action"].split(":")[0] == v for v in values
        ):
            return False
        if key in ("container", "image", "volume", "network"):
            if ev["Type"] != key and not (key == "image" and "image" in attrs):
                return False
            names = {ev["Actor"]["ID"], ev["Actor"]["ID"][:12], attrs.get("name", "")}
            if key == "image":
                names |= {attrs.get("image", "")}
            if not any(v in names or ev["Actor"]["ID"].startswith(v) for v in values):
                return False
        if key == "label" and not all(_label_match(attrs, v) for v in values):
            return False
    return True


def _label_match(attrs: dict[str, str], expr: str) -> bool:
    if "=" in expr:
        k, v = expr.split("=", 1)
        return attrs.get(k) == v
    return expr in attrs


class EventBus:
    def __init__(self, history: int = 1000) -> None:
        self.history: deque[dict[str, Any]] = deque(maxlen=history)
        self.subscribers: set[asyncio.Queue[dict[str, Any]]] = set()

    def publish(self, typ: str, action: str, actor_id: str, **attributes: str) -> None:
        ev = make_event(typ, action, actor_id, {k: str(v) for k, v in attributes.items()})
        self.history.append(ev)
        for q in self.subscribers:
            q.put_nowait(ev)

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self.subscribers.discard(q)

    def past(self, since_ns: int, until_ns: int | None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.history
            if e["timeNano"] >= since_ns and (until_ns is None or e["timeNano"] <= until_ns)
        ]
