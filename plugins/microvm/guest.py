"""What every VM whose guest runs the tether offers the engine over its channel.

microvm and vSphere VMs differ in how they are made, paused and killed; exec,
ps, stats and the archive operations are the same tether requests on both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from vicd.backend import GuestStats, OutputSink, ProcessSpec, StartError
from vicd.plugins.microvm import archive
from vicd.plugins.microvm.tether import TetherConnection, TetherError, TetherProcess


def process_fields(spec: ProcessSpec) -> dict[str, Any]:
    """A process spec as the tether's run/exec requests carry it."""
    return {
        "args": spec.args,
        "env": spec.env,
        "cwd": spec.cwd,
        "user": spec.user,
        "tty": spec.tty,
        "stdin": spec.stdin,
        "rows": spec.rows,
        "cols": spec.cols,
    }


def slot_iface(nic: dict[str, Any]) -> dict[str, Any]:
    """A NIC on a daemon network as the tether's run/net requests carry it: the
    tether finds it by its slot (or its own MAC); the default route stays on
    eth0 (egress and published ports)."""
    return {"name": "", "slot": nic["slot"], "mac": nic.get("mac", ""),
            "address": nic.get("address", "")}


class TetherGuest:
    conn: TetherConnection
    main: TetherProcess
    next_chan: int = 2

    async def configure_nic(self, nic: dict[str, Any]) -> None:
        """The guest side of ``docker network connect``: MAC and address on the slot's NIC."""
        await self.conn.request("net", interfaces=[slot_iface(nic)], timeout=10)

    async def unconfigure_nic(self, slot: int) -> None:
        """The guest side of ``docker network disconnect``: the slot's NIC down."""
        await self.conn.request("net", interfaces=[{"slot": slot, "address": ""}], timeout=10)

    def process_ends(self) -> tuple[asyncio.Future[Any], ...]:
        """Futures that end every guest process too (the VM powered off)."""
        return ()

    async def exec(self, spec: ProcessSpec, sink: OutputSink) -> TetherProcess:
        chan = self.next_chan
        self.next_chan += 1
        channel = self.conn.open_channel(chan, sink)
        try:
            reply = await self.conn.request("exec", chan=chan, **process_fields(spec))
        except TetherError as e:
            code = (getattr(e, "reply", None) or {}).get("exit_code", 126)
            raise StartError(e.message, int(code)) from None
        return TetherProcess(self.conn, chan, channel, int(reply.get("pid", 0)),
                             self.process_ends())

    async def ps(self) -> list[dict[str, Any]]:
        reply = await self.conn.request("ps", timeout=10)
        return list(reply.get("processes") or [])

    async def stats(self) -> GuestStats:
        r = await self.conn.request("stats", timeout=10)
        total = int(r.get("mem_total", 0))
        avail = int(r.get("mem_available", r.get("mem_free", 0)))
        return GuestStats(
            cpu_ns=int(r.get("cpu_ns", 0)),
            system_ns=int(r.get("system_ns", 0)),
            online_cpus=int(r.get("online_cpus", 1)),
            mem_total=total,
            mem_used=max(total - avail, 0),
            mem_cache=int(r.get("mem_cache", 0)),
            pids=int(r.get("pids", 0)),
        )

    # Archive ops (docker cp, export, diff, commit): plugins/microvm/archive.py.
    async def stat_path(self, path: str) -> dict[str, Any]:
        return await archive.stat_path(self, path)

    async def get_archive(self, path: str, rebase: str | None = None,
                          excludes: list[str] | None = None, listing: bool = False,
                          only: list[str] | None = None, only_trees: list[str] | None = None,
                          ) -> tuple[dict[str, Any], AsyncIterator[bytes]]:
        return await archive.get_archive(self, path, rebase, excludes, listing, only,
                                         only_trees)

    async def put_archive(self, path: str, data: AsyncIterator[bytes],
                          no_overwrite_dir_non_dir: bool = False, chown_user: str = "") -> None:
        await archive.put_archive(self, path, data, no_overwrite_dir_non_dir, chown_user)

    async def set_cpu_max(self, quota_us: int, period_us: int) -> None:
        """The container's CPU quota inside the guest (cgroup v2 cpu.max; 0: none)."""
        await self.conn.request("cpu_max", cpu_max={"quota": quota_us, "period": period_us},
                                timeout=10)

    async def freeze(self, frozen: bool) -> None:
        """Stop (SIGSTOP) or continue every container process (commit --pause)."""
        await self.conn.request("freeze", frozen=frozen, timeout=10)
