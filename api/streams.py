"""Docker's stream framing: stdcopy headers for multiplexed stdout/stderr."""

from __future__ import annotations

import struct

STDIN, STDOUT, STDERR = 0, 1, 2


def frame(stream: int, data: bytes) -> bytes:
    """One stdcopy frame: [stream, 0, 0, 0, length BE32] + data."""
    return struct.pack(">BxxxI", stream, len(data)) + data


def encode_output(stream: int, data: bytes, tty: bool) -> bytes:
    return data if tty else frame(stream, data)
