"""Host side of the tether protocol (docs/tether.md): framing, requests, channels."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vicd.errors import VicdError

log = logging.getLogger(__name__)

MAGIC = b"VT"
HEADER = struct.Struct(">2sBBII")
MAX_PAYLOAD = 1 << 20
CTRL, STDIN, STDOUT, STDERR, STDIN_CLOSE = 1, 2, 3, 4, 5
PROTOCOL_VERSION = 1


class TetherError(VicdError):
    """The guest answered a request with ok:false, or the channel broke."""


def encode(typ: int, chan: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, typ, 0, chan, len(payload)) + payload


@dataclass
class Channel:
    """One guest process: its output sink and the future of its exit code."""

    sink: Callable[[int, bytes], None]
    exit: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # The exit event's "error" (archive channels report why a stream failed).
    error: str = ""


class TetherProcess:
    """A guest process addressed by its tether channel (vicd.backend.GuestProcess).

    It has ended when its exit event comes, or when the channel closes or any
    future in ``also_ends`` completes (the VM powered off): then 137.
    """

    def __init__(self, conn: TetherConnection, chan: int, channel: Channel, pid: int,
                 also_ends: tuple[asyncio.Future[Any], ...] = ()) -> None:
        self.conn = conn
        self.chan = chan
        self.channel = channel
        self.pid = pid
        self.also_ends = also_ends

    def write_stdin(self, data: bytes) -> None:
        self.conn.send(STDIN, self.chan, data)

    def close_stdin(self) -> None:
        self.conn.send(STDIN_CLOSE, self.chan)

    async def signal(self, signum: int) -> None:
        await self.conn.request("signal", chan=self.chan, signal=signum, timeout=10)

    async def resize(self, rows: int, cols: int) -> None:
        await self.conn.request("resize", chan=self.chan, rows=rows, cols=cols, timeout=10)

    async def wait(self) -> int:
        await asyncio.wait([self.channel.exit, self.conn.closed, *self.also_ends],
                           return_when=asyncio.FIRST_COMPLETED)
        return self.channel.exit.result() if self.channel.exit.done() else 137


class TetherConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.channels: dict[int, Channel] = {}
        self.next_req = 1
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, path: str, timeout: float) -> TetherConnection:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                r, w = await asyncio.open_unix_connection(path, limit=MAX_PAYLOAD * 2)
                return cls(r, w)
            except (FileNotFoundError, ConnectionRefusedError):
                if loop.time() > deadline:
                    raise TetherError(f"cannot connect to the guest channel {path}") from None
                await asyncio.sleep(0.01)

    # --- sending --------------------------------------------------------------

    def send(self, typ: int, chan: int, payload: bytes = b"") -> None:
        if self.writer.is_closing():
            return
        for i in range(0, max(len(payload), 1), MAX_PAYLOAD):
            self.writer.write(encode(typ, chan, payload[i : i + MAX_PAYLOAD]))

    async def send_stream(self, typ: int, chan: int, payload: bytes) -> None:
        """Like send, but waits while the guest is not reading (flow control)."""
        self.send(typ, chan, payload)
        await self.writer.drain()

    def pause_reading(self, pause: bool) -> None:
        """Stop (or resume) reading from the guest: a slow consumer of a
        stream holds the guest's writes back instead of filling our memory."""
        transport = self.writer.transport
        with contextlib.suppress(Exception):
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def send_ctrl(self, msg: dict[str, Any]) -> None:
        self.send(CTRL, 0, json.dumps(msg).encode())

    async def request(self, op: str, timeout: float | None = 30, **fields: Any) -> dict[str, Any]:
        if self.closed.done():
            raise TetherError("guest channel closed")
        req = self.next_req
        self.next_req += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[req] = fut
        self.send_ctrl({"op": op, "req": req, **fields})
        try:
            reply = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise TetherError(f"guest did not answer {op!r} within {timeout} s") from None
        finally:
            self.pending.pop(req, None)
        if not reply.get("ok"):
            err = TetherError(reply.get("error") or f"guest refused {op!r}")
            err.reply = reply  # type: ignore[attr-defined]
            raise err
        return reply

    def open_channel(self, chan: int, sink: Callable[[int, bytes], None]) -> Channel:
        ch = Channel(sink=sink)
        self.channels[chan] = ch
        return ch

    # --- receiving ------------------------------------------------------------

    async def _read_loop(self) -> None:
        buf = bytearray()
        skipped = 0
        try:
            while True:
                chunk = await self.reader.read(1 << 16)
                if not chunk:
                    break
                buf += chunk
                while len(buf) >= HEADER.size:
                    magic, typ, _, chan, length = HEADER.unpack_from(buf)
                    if magic != MAGIC or length > MAX_PAYLOAD:
                        # Only after a daemon died mid-frame: find the magic again.
                        idx = buf.find(MAGIC, 1)
                        drop = idx if idx > 0 else len(buf) - 1
                        del buf[:drop]
                        skipped += drop
                        continue
                    if len(buf) < HEADER.size + length:
                        break
                    payload = bytes(buf[HEADER.size : HEADER.size + length])
                    del buf[: HEADER.size + length]
                    if skipped:
                        log.warning("tether: resynchronised after %d bad bytes", skipped)
                        skipped = 0
                    self._dispatch(typ, chan, payload)
        except ConnectionError:
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("tether reader failed")
        finally:
            self._fail_all()

    def _dispatch(self, typ: int, chan: int, payload: bytes) -> None:
        if typ in (STDOUT, STDERR):
            ch = self.channels.get(chan)
            if ch:
                ch.sink(1 if typ == STDOUT else 2, payload)
            return
        if typ != CTRL:
            return
        try:
            msg = json.loads(payload)
        except ValueError:
            log.warning("tether: bad control message %r", payload[:100])
            return
        op = msg.get("op")
        if op == "reply":
            fut = self.pending.get(msg.get("req"))
            if fut and not fut.done():
                fut.set_result(msg)
        elif op == "exit":
            ch = self.channels.get(int(msg.get("chan", 0)))
            if ch and not ch.exit.done():
                ch.error = str(msg.get("error") or "")
                ch.exit.set_result(int(msg.get("code", 0)))
        elif op == "log":
            log.info("guest: %s", msg.get("msg"))

    def _fail_all(self) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(TetherError("guest channel closed"))
        if not self.closed.done():
            self.closed.set_result(None)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task
        self.writer.close()
        self._fail_all()
