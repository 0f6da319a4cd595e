"""A minimal QMP client: enough for stop/cont/query-status/quit."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from vicd.errors import VicdError


class QMPError(VicdError):
    pass


class QMP:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.lock = asyncio.Lock()

    @classmethod
    async def connect(cls, path: str, timeout: float = 5) -> QMP:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                r, w = await asyncio.open_unix_connection(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if loop.time() > deadline:
                    raise QMPError(f"cannot connect to QMP at {path}") from None
                await asyncio.sleep(0.01)
        q = cls(r, w)
        await q._read_message()  # the greeting
        await q.execute("qmp_capabilities")
        return q

    async def _read_message(self) -> dict[str, Any]:
        while True:
            line = await self.reader.readline()
            if not line:
                raise QMPError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    async def execute(self, cmd: str, **args: Any) -> Any:
        async with self.lock:
            msg: dict[str, Any] = {"execute": cmd}
            if args:
                msg["arguments"] = args
            self.writer.write(json.dumps(msg).encode() + b"\n")
            await self.writer.drain()
            reply = await asyncio.wait_for(self._read_message(), 10)
        if "error" in reply:
            raise QMPError(f"QMP {cmd}: {reply['error'].get('desc')}")
        return reply.get("return")

    def close(self) -> None:
        self.writer.close()
