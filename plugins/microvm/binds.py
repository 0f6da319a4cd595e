"""Host folders in the VM (``-v /host:/ctr``) through virtiofs.

For each bind mount the host side prepares a staging folder under
``<data-root>/microvm/binds/<vm>/<n>``: a bind mount of the source (made
read-only on the host for ``:ro``, so the guest cannot write whatever it
does), or for a single file, a folder holding a bind mount of that file.
One ``virtiofsd`` serves each staging folder to QEMU's vhost-user-fs device.

Staging folders hold the user's files: they are only ever unmounted and
removed with non-recursive calls (``os.rmdir``/``os.unlink`` of our own
placeholders), never deleted recursively.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vicd.backend import BindSpec
from vicd.errors import VicdError

log = logging.getLogger(__name__)

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


@dataclass
class SharedFolder:
    tag: str  # the virtiofs tag the guest mounts
    socket: Path
    target: str
    read_only: bool
    file: str  # for a single-file bind: its name in the shared folder


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise VicdError(f"cannot share the host path: {r.stderr.strip()}")


def _mounted_below(root: Path) -> list[str]:
    prefix = str(root) + "/"
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            point = line.split()[1].replace("\\040", " ")
            if point.startswith(prefix):
                out.append(point)
    return sorted(out, key=len, reverse=True)


class SharedFolders:
    def __init__(self, root: Path, vm_dir: Path, sock_dir: Path) -> None:
        self.root = root  # <data-root>/microvm/binds/<vm>
        self.vm_dir = vm_dir
        self.sock_dir = sock_dir  # short, for AF_UNIX

    async def prepare(self, binds: list[BindSpec]) -> list[SharedFolder]:
        self.cleanup()
        out = []
        for n, b in enumerate(binds):
            stage = self.root / str(n)
            stage.mkdir(parents=True, exist_ok=True)
            src = b.source
            if not src.exists():
                raise VicdError(f"bind source path does not exist: {src}")
            name = ""
            point = stage
            if not src.is_dir():
                name = src.name or "file"
                point = stage / name
                point.touch(exist_ok=True)
            _mount("--bind", str(src), str(point))
            if b.read_only:
                _mount("-o", "remount,bind,ro", str(point))
            sock = self.sock_dir / f"{self.vm_dir.name}.vfs{n}"
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            await self._virtiofsd(n, sock, stage)
            out.append(SharedFolder(f"vicd{n}", sock, b.target, b.read_only, name))
        return out

    async def _virtiofsd(self, n: int, sock: Path, stage: Path) -> None:
        with open(self.vm_dir / f"virtiofsd{n}.log", "ab") as logf:
            proc = subprocess.Popen(
                [VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={stage}",
                 "-o", "cache=auto", "-o", "sandbox=namespace", "-o", "xattr"],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
            )
        (self.vm_dir / f"virtiofsd{n}.pid").write_text(str(proc.pid))
        for _ in range(500):  # it must listen before QEMU connects
            if sock.exists():
                return
            if proc.poll() is not None:
                raise VicdError(f"virtiofsd failed to start (see {self.vm_dir}/virtiofsd{n}.log)")
            await asyncio.sleep(0.01)
        proc.kill()
        raise VicdError("virtiofsd did not come up")

    def cleanup(self) -> None:
        """Stop the file servers and undo the staging mounts (never a recursive delete)."""
        for pidfile in self.vm_dir.glob("virtiofsd*.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            pidfile.unlink(missing_ok=True)
        if not self.root.exists():
            return
        for point in _mounted_below(self.root):
            r = subprocess.run(["umount", "-l", point], capture_output=True, check=False)
            if r.returncode != 0:
                log.error("cannot unmount %s; leaving it in place", point)
        if _mounted_below(self.root):
            return  # something is still mounted: touch nothing
        for stage in self.root.iterdir():
            for entry in stage.iterdir():
                if entry.is_file() and entry.stat().st_size == 0:
                    entry.unlink()  # our placeholder for a single-file bind
            with contextlib.suppress(OSError):
                stage.rmdir()
        with contextlib.suppress(OSError):
            self.root.rmdir()
