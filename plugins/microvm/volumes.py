"""The ``local`` volume driver of the microvm backend: one ext4 disk image a volume.

The disk file has a fixed virtual size (sparse: only what is written takes
space) so that every volume fits the same device slot of a template
snapshot; the ext4 inside has the size asked for (``-o size=``, default
``volume_size_mb``).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from vicd.backend import DiskSpec
from vicd.config import Config
from vicd.errors import InvalidParameter, VicdError

# Every volume disk has this virtual size; the guest learnt it in the template.
VOLUME_SLOT_BYTES = 64 << 30
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", text.strip().lower())
    if not m:
        raise InvalidParameter(f"invalid size: '{text}'")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


class LocalVolumeDriver:
    name = "local"

    def __init__(self, config: Config) -> None:
        self.root = config.data_root / "volumes"
        self.default_size = config.volume_size_mb << 20

    def disk(self, name: str) -> Path:
        return self.root / name / "disk.img"

    def capabilities(self) -> dict[str, Any]:
        return {"Scope": "local"}

    def create(self, name: str, opts: dict[str, str]) -> None:
        unknown = set(opts) - {"size"}
        if unknown:
            raise InvalidParameter(f"invalid option key: {sorted(unknown)[0]!r}")
        size = parse_size(opts["size"]) if "size" in opts else self.default_size
        if not 8 << 20 <= size <= VOLUME_SLOT_BYTES:
            raise InvalidParameter(f"volume size must be between 8MiB and 64GiB, not {size}")
        disk = self.disk(name)
        disk.parent.mkdir(parents=True, exist_ok=True)
        with open(disk, "wb") as f:
            f.truncate(VOLUME_SLOT_BYTES)
        r = subprocess.run(
            ["mke2fs", "-q", "-t", "ext4", "-F", "-E", "root_owner=0:0", "-L", name[:16],
             str(disk), f"{size // 1024}k"],
            capture_output=True, text=True, check=False,
        )
        if r.returncode != 0:
            disk.unlink(missing_ok=True)
            raise VicdError(f"cannot make the volume's filesystem: {r.stderr.strip()}")

    def remove(self, name: str) -> None:
        self.disk(name).unlink(missing_ok=True)

    def path(self, name: str) -> str:
        return str(self.disk(name))

    def mount(self, name: str, container_id: str) -> DiskSpec:
        disk = self.disk(name)
        if not disk.is_file():
            raise VicdError(f"volume {name}: its disk is missing ({disk})")
        return DiskSpec(path=disk, target="", fmt="raw")

    def unmount(self, name: str, container_id: str) -> None:
        pass  # the VM has ended; nothing stays attached

    def usage(self, name: str) -> int:
        try:
            return self.disk(name).stat().st_blocks * 512
        except OSError:
            return -1
