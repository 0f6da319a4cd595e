"""Archive ops over the tether (docs/tether.md "Archives"): stat, tar out, tar in.

Each stream has a channel of its own, taken from the VM's exec counter. Out:
the guest's STDOUT frames are queued for the consumer; past HIGH_WATER
queued bytes the connection stops reading, so the guest's writes block
instead of the daemon's memory growing. In: STDIN frames with a drain after
each, so the guest's bounded queue paces the sender.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from vicd.backend import GuestPathError
from vicd.plugins.microvm.tether import STDIN, STDIN_CLOSE, TetherError

if TYPE_CHECKING:
    from vicd.plugins.microvm.backend import MicroVM
    from vicd.plugins.microvm.guest import TetherGuest

HIGH_WATER = 8 << 20
LOW_WATER = 1 << 20
CHUNK = 256 << 10
# exit_code in a failed archive reply: what went wrong with the path.
_KINDS = {2: "not_found", 3: "not_dir", 4: "read_only"}


def _path_error(e: TetherError) -> GuestPathError:
    code = int((getattr(e, "reply", None) or {}).get("exit_code") or 0)
    return GuestPathError(e.message, _KINDS.get(code, "other"))


async def stat_path(vm: TetherGuest, path: str) -> dict[str, Any]:
    try:
        reply = await vm.conn.request("stat", path=path, timeout=30)
    except TetherError as e:
        raise _path_error(e) from None
    return dict(reply["stat"])


async def get_archive(vm: TetherGuest, path: str, rebase: str | None = None,
                      excludes: list[str] | None = None, listing: bool = False,
                      only: list[str] | None = None, only_trees: list[str] | None = None,
                      ) -> tuple[dict[str, Any], AsyncIterator[bytes]]:
    chan = vm.next_chan
    vm.next_chan += 1
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    pending = 0
    paused = False

    def sink(_stream: int, data: bytes) -> None:
        nonlocal pending, paused
        queue.put_nowait(data)
        pending += len(data)
        if pending > HIGH_WATER and not paused:
            paused = True
            vm.conn.pause_reading(True)

    channel = vm.conn.open_channel(chan, sink)
    fields: dict[str, Any] = {"chan": chan, "path": path}
    if rebase is not None:
        fields["rebase"] = rebase
    if excludes:
        fields["excludes"] = excludes
    if listing:
        fields["listing"] = True
    if only is not None:
        fields["only"] = only
    if only_trees:
        fields["only_trees"] = only_trees
    try:
        reply = await vm.conn.request("archive_get", timeout=60, **fields)
    except TetherError as e:
        vm.conn.channels.pop(chan, None)
        raise _path_error(e) from None

    async def stream() -> AsyncIterator[bytes]:
        nonlocal pending, paused
        try:
            while True:
                if queue.empty():
                    if channel.exit.done():
                        break
                    get = asyncio.ensure_future(queue.get())
                    await asyncio.wait([get, channel.exit, vm.conn.closed],
                                       return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():
                        get.cancel()
                        if channel.exit.done():
                            continue  # drain what came before the exit event
                        raise TetherError("guest channel closed during the archive")
                    data = get.result()
                else:
                    data = queue.get_nowait()
                pending -= len(data)
                if paused and pending < LOW_WATER:
                    paused = False
                    vm.conn.pause_reading(False)
                yield data
            if channel.exit.result() != 0:
                raise TetherError(f"archive of {path} failed: {channel.error}")
        finally:
            if paused:
                vm.conn.pause_reading(False)
            vm.conn.channels.pop(chan, None)

    return dict(reply["stat"]), stream()


async def put_archive(vm: TetherGuest, path: str, data: AsyncIterator[bytes],
                      no_overwrite_dir_non_dir: bool = False, chown_user: str = "") -> None:
    chan = vm.next_chan
    vm.next_chan += 1
    channel = vm.conn.open_channel(chan, lambda _s, _d: None)
    try:
        try:
            await vm.conn.request("archive_put", chan=chan, path=path, timeout=60,
                                  no_overwrite_dir_non_dir=no_overwrite_dir_non_dir,
                                  chown_user=chown_user)
        except TetherError as e:
            raise _path_error(e) from None
        try:
            async for chunk in data:
                for i in range(0, len(chunk), CHUNK):
                    if channel.exit.done():
                        break  # the guest gave up (a bad archive): stop sending
                    await vm.conn.send_stream(STDIN, chan, chunk[i:i + CHUNK])
        finally:
            vm.conn.send(STDIN_CLOSE, chan)
        done, _ = await asyncio.wait([channel.exit, vm.conn.closed],
                                     return_when=asyncio.FIRST_COMPLETED)
        if not channel.exit.done():
            raise TetherError("guest channel closed during the extraction")
        if channel.exit.result() != 0:
            raise GuestPathError(channel.error or "extraction failed", "other")
    finally:
        vm.conn.channels.pop(chan, None)


async def power_off(vm: MicroVM) -> None:
    """End a held VM (run with hold): the guest syncs and unmounts first."""
    with contextlib.suppress(Exception):
        vm.conn.send_ctrl({"op": "poweroff"})
    if not await vm.proc.wait(15):
        vm.proc.kill()
        await vm.proc.wait(5)
    await vm.close()
