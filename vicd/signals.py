"""Signal names and numbers as Docker accepts them (``KILL``, ``SIGKILL``, ``9``)."""

from __future__ import annotations

import signal

from vicd.errors import InvalidParameter

_BY_NAME = {s.name[3:]: int(s) for s in signal.Signals if s.name.startswith("SIG")}
_BY_NAME.update({"IOT": 6, "POLL": 29, "CLD": 17})


def parse_signal(value: str | int | None, default: int = signal.SIGKILL) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, int):
        return value
    s = value.strip().upper()
    if s.isdigit():
        n = int(s)
        if 0 < n < 65:
            return n
    else:
        name = s[3:] if s.startswith("SIG") else s
        if name in _BY_NAME:
            return _BY_NAME[name]
        if name.startswith("RTMIN+") and name[6:].isdigit():
            return 34 + int(name[6:])
    raise InvalidParameter(f"Invalid signal: {value}")
