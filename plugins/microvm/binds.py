"""Host folders in the VM (``-v /host:/ctr``) through QEMU's virtio-9p.

Every VM has the same fixed number of 9p devices (``NINEP_SLOTS``, tags
``vicd0``...), so a template snapshot has them too: the guest mounts none of
them before the snapshot (QEMU refuses to migrate a VM with a mounted share),
and each clone gives its own export paths at restore. Unused slots export an
empty read-only folder.

A folder is exported as it is. A single file is exported through a staging
folder ``<data-root>/microvm/binds/<vm>/<n>`` that holds a bind mount of just
that file (the guest then bind-mounts it over its target), so the file's
siblings are never exposed. ``:ro`` is ``readonly=on`` on the export: QEMU
refuses every write whatever the guest does.

Staging folders hold the user's files: they are only ever unmounted and
removed with non-recursive calls (``os.rmdir``/``os.unlink`` of our own
placeholders), never deleted recursively.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vicd.backend import BindSpec
from vicd.errors import VicdError

log = logging.getLogger(__name__)

# 9p devices in every VM (and so in every template). A container with more
# bind mounts cold-boots with one device per mount.
NINEP_SLOTS = 4
# virtio caps a 9p message at this size; measured fastest under TCG.
NINEP_MSIZE = 512000


@dataclass
class Export:
    """What one 9p slot serves: QEMU's side."""

    path: Path
    read_only: bool


@dataclass
class SharedFolder:
    tag: str  # the 9p mount tag the guest mounts
    export: Export
    target: str
    file: str  # for a single-file bind: its name in the exported folder


def slot_tag(n: int) -> str:
    return f"vicd{n}"


def slot_exports(folders: list[SharedFolder], empty: Path) -> list[Export]:
    """The export of each 9p device: the binds first, then empty slots."""
    out = [f.export for f in folders]
    out += [Export(empty, True)] * max(0, NINEP_SLOTS - len(out))
    return out


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
    def __init__(self, root: Path) -> None:
        self.root = root  # <data-root>/microvm/binds/<vm>: single-file staging

    def prepare(self, binds: list[BindSpec]) -> list[SharedFolder]:
        self.cleanup()
        out = []
        for n, b in enumerate(binds):
            src = b.source
            if not src.exists():
                raise VicdError(f"bind source path does not exist: {src}")
            name = ""
            path = src
            if not src.is_dir():
                name = src.name or "file"
                path = self.root / str(n)
                path.mkdir(parents=True, exist_ok=True)
                point = path / name
                point.touch(exist_ok=True)
                _mount("--bind", str(src), str(point))
            out.append(SharedFolder(slot_tag(n), Export(path, b.read_only), b.target, name))
        return out

    def cleanup(self) -> None:
        """Undo the staging mounts (never a recursive delete)."""
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
