"""Docker's connection hijack (``Upgrade: tcp``) on aiohttp.

aiohttp has no public API for this (see docs/api.md): we answer ``101
UPGRADED`` through a normal StreamResponse, then move the transport to a
protocol of our own. Ours returns True from ``eof_received`` so a client's
half-close (the CLI half-closes at once when it sends no stdin) leaves our
write side open until the process ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from aiohttp import http_parser, web, web_protocol

# aiohttp's C parser (llhttp) does not treat `Upgrade: tcp` as an upgrade:
# bytes the client sends right behind the request (stdin before `start`)
# would be parsed as a next request and lost. The pure-Python parser hands
# them over as the upgrade tail, so the server uses that one. (Checked on
# aiohttp 3.14; tests/test_api_layer.py fails if this stops holding.)
web_protocol.HttpRequestParser = http_parser.HttpRequestParserPy  # type: ignore[misc]

RAW_STREAM = "application/vnd.docker.raw-stream"
MULTIPLEXED_STREAM = "application/vnd.docker.multiplexed-stream"


class HijackedStream(asyncio.Protocol):
    """Both directions of a hijacked connection as plain async calls."""

    def __init__(self, transport: asyncio.Transport, tail: bytes,
                 response: web.StreamResponse) -> None:
        self.transport = transport
        # What the handler returns to aiohttp once the stream is done.
        self.response = response
        self.incoming: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.lost = asyncio.Event()
        self._can_write = asyncio.Event()
        self._can_write.set()
        if tail:
            self.incoming.put_nowait(tail)

    # asyncio.Protocol
    def data_received(self, data: bytes) -> None:
        self.incoming.put_nowait(data)

    def eof_received(self) -> bool:
        self.incoming.put_nowait(None)
        return True  # keep our write side open

    def connection_lost(self, exc: BaseException | None) -> None:
        self.incoming.put_nowait(None)
        self.lost.set()
        self._can_write.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # ours
    async def read(self) -> bytes | None:
        """The next bytes from the client, or None at its EOF."""
        return await self.incoming.get()

    async def write(self, data: bytes) -> None:
        if self.lost.is_set():
            return
        self.transport.write(data)
        await self._can_write.wait()

    def close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()


def wants_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "tcp"


async def hijack(
    request: web.Request, content_type: str, extra_headers: Mapping[str, str] | None = None
) -> HijackedStream:
    resp = web.StreamResponse(
        status=101,
        reason="UPGRADED",
        headers={"Content-Type": content_type, "Connection": "Upgrade", "Upgrade": "tcp",
                 **(extra_headers or {})},
    )
    resp.force_close()
    await resp.prepare(request)
    proto = request.protocol
    transport = request.transport
    assert transport is not None and isinstance(transport, asyncio.Transport)
    # Bytes the client sent after the request (stdin before start) wait in
    # aiohttp's upgrade tail; take them along.
    tail = getattr(proto, "_message_tail", b"") or b""
    if tail:
        proto._message_tail = b""  # type: ignore[union-attr]
    stream = HijackedStream(transport, tail, resp)
    transport.set_protocol(stream)
    transport.resume_reading()
    return stream
