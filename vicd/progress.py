"""dockerd's JSON progress stream (pkg/jsonmessage, pkg/progress): the lines that pull, push
and load send and the CLI draws as progress bars."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

PROGRESS_EVERY = 0.1  # seconds between two progress lines of one item (dockerd's rate limit)

Progress = Callable[[dict[str, Any]], None]


def human_size(n: float) -> str:
    """go-units HumanSize (decimal units, 4 significant digits)."""
    units = ["B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"]
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n /= 1000.0
        i += 1
    return f"{n:.4g}{units[i]}"


def progress_bar(current: int, total: int, start: float | None = None) -> str:
    """dockerd's JSONProgress.String() for a 200-column server-side width."""
    if current <= 0 and total <= 0:
        return ""
    if total <= 0:
        return f"{human_size(current):>8}"
    pct = min(int(current / total * 100) // 2, 50)
    bar = f"[{'=' * pct}>{' ' * max(50 - pct, 0)}] "
    numbers = f"{human_size(current):>8}/{human_size(total)}"
    if current > total:
        numbers = f"{human_size(current):>8}"
    left = ""
    if start is not None and current > 0 and pct < 50:
        secs = int((time.time() - start) / current * (total - current))
        left = " " + _go_duration(secs)
    return bar + numbers + left


def _go_duration(secs: int) -> str:
    h, rest = divmod(secs, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def status(msg: str, id_: str | None = None) -> dict[str, Any]:
    """A progress update (dockerd's progress.Update): has an empty progressDetail."""
    if id_ is None:
        return {"status": msg}
    return {"status": msg, "progressDetail": {}, "id": id_}


def message(msg: str, id_: str = "") -> dict[str, Any]:
    """A progress message (dockerd's progress.Message): no progressDetail."""
    return {"status": msg, "id": id_} if id_ else {"status": msg}


def progress_line(
    msg: str, id_: str, current: int, total: int, start: float | None = None
) -> dict[str, Any]:
    detail = {"current": current, "total": total} if total > 0 else {"current": current}
    out = {"status": msg, "progressDetail": detail, "progress": progress_bar(current, total, start)}
    if id_:
        out["id"] = id_
    return out


def error_line(message: str) -> dict[str, Any]:
    return {"errorDetail": {"message": message}, "error": message}


class Throttle:
    """At most one progress line per PROGRESS_EVERY for one layer (the last always)."""

    def __init__(self) -> None:
        self.last = 0.0

    def ready(self, final: bool = False) -> bool:
        now = time.monotonic()
        if final or now - self.last >= PROGRESS_EVERY:
            self.last = now
            return True
        return False
