"""Docker's ``filters`` query: parsing and container matching."""

from __future__ import annotations

import fnmatch
import json
import re
from typing import TYPE_CHECKING

from vicd.errors import InvalidParameter, NotFound
from vicd.timefmt import parse_api_time, parse_rfc3339

if TYPE_CHECKING:
    from vicd.container import Container
    from vicd.engine import Engine

PS_FILTERS = {"name", "id", "label", "status", "ancestor", "exited", "before", "since",
              "health", "is-task", "volume", "network", "publish", "expose", "isolation"}
PRUNE_FILTERS = {"until", "label", "label!"}
STATUSES = {"created", "restarting", "running", "removing", "paused", "exited", "dead"}


def parse_filters(raw: str | None) -> dict[str, list[str]]:
    """``{"key":{"value":true}}`` (or the old ``{"key":["value"]}``) into key -> values."""
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise InvalidParameter(f"invalid filter: {e}") from None
    if not isinstance(data, dict):
        raise InvalidParameter("invalid filter: expected an object")
    out: dict[str, list[str]] = {}
    for key, val in data.items():
        if isinstance(val, dict):
            out[key] = [k for k, v in val.items() if v]
        elif isinstance(val, list):
            out[key] = [str(v) for v in val]
        else:
            raise InvalidParameter(f"invalid filter value for {key!r}")
    return out


def check_keys(filters: dict[str, list[str]], allowed: set[str]) -> None:
    for key in filters:
        if key not in allowed:
            raise InvalidParameter(f"Invalid filter '{key}'")


def label_matches(labels: dict[str, str], exprs: list[str]) -> bool:
    for expr in exprs:
        if "=" in expr:
            k, v = expr.split("=", 1)
            if labels.get(k) != v:
                return False
        elif expr not in labels:
            return False
    return True


def container_matches(c: Container, f: dict[str, list[str]], engine: Engine,
                      prune: bool = False) -> bool:
    labels = c.config.get("Labels") or {}
    if prune:
        check_keys(f, PRUNE_FILTERS)
        if "until" in f:
            until = min(parse_api_time(v) for v in f["until"])
            if parse_rfc3339(c.created).timestamp() >= until:
                return False
        if "label!" in f and any(label_matches(labels, [e]) for e in f["label!"]):
            return False
        return label_matches(labels, f.get("label", []))
    # Like dockerd: a pattern may match the name with or without its slash.
    if "name" in f and not any(re.search(p, "/" + c.name) or re.search(p, c.name)
                               for p in f["name"]):
        return False
    if "id" in f and not any(c.id.startswith(v) for v in f["id"]):
        return False
    if "label" in f and not label_matches(labels, f["label"]):
        return False
    if "status" in f:
        for s in f["status"]:
            if s not in STATUSES:
                raise InvalidParameter(
                    f"Invalid filter 'status={s}'"
                )
        if c.state.status not in f["status"]:
            return False
    if "exited" in f:
        if c.state.status != "exited":
            return False
        try:
            codes = {int(v) for v in f["exited"]}
        except ValueError:
            raise InvalidParameter("invalid filter 'exited'") from None
        if c.state.exit_code not in codes:
            return False
    if "ancestor" in f and not any(_ancestor(c, v, engine) for v in f["ancestor"]):
        return False
    if "before" in f or "since" in f:
        created = parse_rfc3339(c.created)
        for key, newer in (("before", False), ("since", True)):
            for ref in f.get(key, []):
                try:
                    other = engine.get(ref)
                except NotFound:
                    raise InvalidParameter(f"No such container: {ref}") from None
                oc = parse_rfc3339(other.created)
                if (created <= oc) if newer else (created >= oc):
                    return False
    if "health" in f:
        for v in f["health"]:
            if v not in ("starting", "healthy", "unhealthy", "none"):
                raise InvalidParameter(f"Unrecognised filter value for health: {v}")
        if ((c.state.health or {}).get("Status") or "none") not in f["health"]:
            return False
    return True


def _ancestor(c: Container, ref: str, engine: Engine) -> bool:
    try:
        img = engine.images.get(ref)
    except (NotFound, InvalidParameter):
        return fnmatch.fnmatch(c.image_ref, ref)
    return img.id == c.image_id
