"""Docker's stream framing: stdcopy headers for multiplexed stdout/stderr."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import AsyncIterator, Mapping

from aiohttp import web

STDIN, STDOUT, STDERR = 0, 1, 2


def frame(stream: int, data: bytes) -> bytes:
    """One stdcopy frame: [stream, 0, 0, 0, length BE32] + data."""
    return struct.pack(">BxxxI", stream, len(data)) + data


def encode_output(stream: int, data: bytes, tty: bool) -> bytes:
    return data if tty else frame(stream, data)


async def stream_chunks(request: web.Request, chunks: AsyncIterator[bytes],
                        headers: Mapping[str, str]) -> web.StreamResponse:
    """A chunked 200 response carrying ``chunks`` (tar archives and the like)."""
    resp = web.StreamResponse(status=200, headers=headers)
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    with contextlib.suppress(ConnectionError):
        async for chunk in chunks:
            await resp.write(chunk)
        await resp.write_eof()
    return resp
