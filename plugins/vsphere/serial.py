"""The daemon end of the VMs' network serial ports: one TCP listener for all.

Each VM's VirtualSerialPort has a URI backing ``tcp://HOST:PORT``, direction
client: the VM side connects here. Instant clones share their parent's
serial-port URI, so a connection is matched to its container by the ``id``
the tether reports in its ``hello`` reply (from guestinfo.vicd.id). The byte
stream is the tether protocol (docs/tether.md), as over virtio-serial.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from vicd.plugins.microvm.tether import (
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    Channel,
    TetherConnection,
    TetherError,
)

log = logging.getLogger(__name__)


class Arrival:
    """A guest that connected and said hello: its connection and main channel."""

    def __init__(self, conn: TetherConnection, hello: dict[str, Any], channel: Channel,
                 buffered: list[tuple[int, bytes]]) -> None:
        self.conn = conn
        self.hello = hello
        self.channel = channel
        self._buffered = buffered

    def attach(self, sink: Callable[[int, bytes], None]) -> Channel:
        """Route the main process's output to ``sink`` (output that came before goes first)."""
        for stream, data in self._buffered:
            sink(stream, data)
        self._buffered.clear()
        self.channel.sink = sink
        return self.channel


class SerialListener:
    def __init__(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        self.host = host or "127.0.0.1"
        self.port = int(port or 0)
        self.server: asyncio.base_events.Server | None = None
        self.waiting: dict[str, asyncio.Future[Arrival]] = {}
        self.arrived: dict[str, Arrival] = {}

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, self.host, self.port,
                                                 limit=MAX_PAYLOAD * 2)
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("vsphere: serial-port listener on %s:%d", self.host, self.port)

    async def close(self) -> None:
        if self.server:
            self.server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = TetherConnection(reader, writer)
        buffered: list[tuple[int, bytes]] = []
        # Channel 1 exists before hello: a running guest may flush output at once.
        channel = conn.open_channel(1, lambda s, d: buffered.append((s, d)))
        try:
            hello = await conn.request("hello", version=PROTOCOL_VERSION, timeout=None)
        except TetherError as e:
            log.warning("vsphere: serial connection without a tether hello: %s", e.message)
            await conn.close()
            return
        cid = str(hello.get("id") or "")
        if not cid:
            log.warning("vsphere: a guest connected without an id (old tether?); dropping it")
            await conn.close()
            return
        if hello.get("state") == "exited" and not channel.exit.done():
            channel.exit.set_result(int(hello.get("exit_code") or 0))
        arrival = Arrival(conn, hello, channel, buffered)
        old = self.arrived.pop(cid, None)
        if old is not None:
            with contextlib.suppress(Exception):
                await old.conn.close()
        fut = self.waiting.pop(cid, None)
        if fut is not None and not fut.done():
            fut.set_result(arrival)
        else:
            self.arrived[cid] = arrival  # picked up by the next wait_for

    def forget(self, cid: str) -> None:
        arrival = self.arrived.pop(cid, None)
        if arrival is not None:
            asyncio.ensure_future(arrival.conn.close())

    async def wait_for(self, cid: str, timeout: float) -> Arrival:
        got = self.arrived.pop(cid, None)
        if got is not None and not got.conn.closed.done():
            return got
        fut = self.waiting.get(cid)
        if fut is None or fut.done():
            fut = asyncio.get_running_loop().create_future()
            self.waiting[cid] = fut
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            self.waiting.pop(cid, None)
            raise TetherError(f"the VM's serial port did not connect within {timeout:.0f} s "
                              f"(is {self.host}:{self.port} reachable from the ESXi host?)"
                              ) from None
