"""Container logs on disk in json-file format, one JSON object a line.

The same format as dockerd's json-file driver, so ``docker logs`` works after
the container exited and after a daemon restart.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

from vicd.timefmt import parse_rfc3339, rfc3339_now

STREAMS = {1: "stdout", 2: "stderr"}


class LogWriter:
    """Appends output to a container's log, splitting on newlines like json-file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = open(path, "ab")  # noqa: SIM115 - kept open for the container's life
        self.partial: dict[int, bytes] = {1: b"", 2: b""}

    def write(self, stream: int, data: bytes) -> None:
        buf = self.partial.get(stream, b"") + data
        *lines, rest = buf.split(b"\n")
        for line in lines:
            self._emit(stream, line + b"\n")
        # Keep an unterminated tail, but never hold more than 16 KiB of it
        # (json-file splits long lines the same way).
        if len(rest) > 16384:
            self._emit(stream, rest)
            rest = b""
        self.partial[stream] = rest

    def flush_partial(self) -> None:
        for stream, rest in self.partial.items():
            if rest:
                self._emit(stream, rest)
                self.partial[stream] = b""

    def _emit(self, stream: int, data: bytes) -> None:
        try:
            text = data.decode()
            rec = {"log": text, "stream": STREAMS[stream], "time": rfc3339_now()}
        except UnicodeDecodeError:
            # Not UTF-8: keep the bytes exactly (an extension of json-file).
            rec = {
                "log": data.decode("utf-8", "replace"),
                "raw": base64.b64encode(data).decode(),
                "stream": STREAMS[stream],
                "time": rfc3339_now(),
            }
        self.f.write(json.dumps(rec).encode() + b"\n")
        self.f.flush()

    def close(self) -> None:
        self.flush_partial()
        self.f.close()


def _decode(line: bytes) -> tuple[int, bytes, str] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    data = base64.b64decode(rec["raw"]) if "raw" in rec else rec["log"].encode()
    return (2 if rec.get("stream") == "stderr" else 1), data, rec["time"]


def _ts(s: str) -> float:
    return parse_rfc3339(s).timestamp()


def read_logs(
    path: Path, tail: int | None, since: float, until: float | None
) -> tuple[list[tuple[int, bytes, str]], int]:
    """Records already on disk (after filtering) and the file offset they end at."""
    if not path.exists():
        return [], 0
    with open(path, "rb") as f:
        raw = f.read()
    end = raw.rfind(b"\n") + 1
    out = []
    for line in raw[:end].splitlines():
        rec = _decode(line)
        if rec is None:
            continue
        t = _ts(rec[2])
        if t < since or (until is not None and t > until):
            continue
        out.append(rec)
    if tail is not None:
        out = out[-tail:] if tail > 0 else []
    return out, end


async def follow_logs(
    path: Path, offset: int, until: float | None, alive: asyncio.Event
) -> AsyncIterator[tuple[int, bytes, str]]:
    """New records appended after ``offset``, until the container stops (``alive`` cleared)."""
    pos = offset
    buf = b""
    while True:
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
        except FileNotFoundError:
            return
        pos += len(chunk)
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            rec = _decode(line)
            if rec is None:
                continue
            if until is not None and _ts(rec[2]) > until:
                return
            yield rec
        if not alive.is_set() and not chunk:
            return
        if until is not None and datetime.now(UTC).timestamp() > until:
            return
        await asyncio.sleep(0.05)


def log_size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
