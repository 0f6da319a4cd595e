"""Template snapshots: a booted, waiting guest saved once, restored per container.

A template is a directory ``<data-root>/microvm/templates/<key>/`` with
``mem`` (guest RAM, mapped copy-on-write by every clone, never written),
``state`` (QEMU's migration stream without RAM, ~50 KB) and ``meta.json``.
It is built in a ``.tmp-*`` directory and renamed into place after fsync, so
a daemon killed mid-build leaves nothing that could be used.

The key covers everything that makes a restore invalid: the guest build
(kernel, initrd with the tether), the QEMU version, the accelerator and the
machine shape (memory, vCPUs, device layout). The image is not part of it:
the root disk is attached at restore and mounted only after it, so one
template serves every image of that shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LAYOUT_VERSION = 5  # bump when the device layout of the command line changes


@dataclass(frozen=True)
class Shape:
    memory_mb: int
    cpus: int
    accel: str
    root_slot_bytes: int
    extra_disks: int = 0
    nic_slots: int = 0  # taps eth1.. for daemon networks (plugins/microvm/netns.py)


@dataclass
class Template:
    key: str
    dir: Path

    @property
    def mem(self) -> Path:
        return self.dir / "mem"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def meta(self) -> Path:
        return self.dir / "meta.json"


def template_key(shape: Shape, guest_stamp: str, qemu: str) -> str:
    blob = json.dumps(
        {"shape": asdict(shape), "guest": guest_stamp, "qemu": qemu, "layout": LAYOUT_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TemplateStore:
    def __init__(self, root: Path, max_count: int) -> None:
        self.root = root
        self.max_count = max(1, max_count)
        self._locks: dict[str, asyncio.Lock] = {}
        root.mkdir(parents=True, exist_ok=True)
        # Half-built templates from a daemon that died: never used, removed.
        for d in root.glob(".tmp-*"):
            shutil.rmtree(d, ignore_errors=True)

    def get(self, key: str) -> Template | None:
        t = Template(key, self.root / key)
        if t.meta.is_file() and t.state.is_file() and t.mem.is_file():
            return t
        return None

    async def ensure(
        self, key: str, shape: Shape, build: Callable[[Path], Awaitable[None]]
    ) -> Template:
        """The template for ``key``, building it once even when many ask at once."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            t = self.get(key)
            if t is not None:
                return t
            # Short: the build VM's sockets live in it (AF_UNIX paths are short).
            tmp = self.root / f".tmp-{os.urandom(4).hex()}"
            tmp.mkdir()
            try:
                t0 = time.monotonic()
                await build(tmp)
                meta = {"key": key, "shape": asdict(shape), "created": time.time(),
                        "build_ms": round((time.monotonic() - t0) * 1000)}
                (tmp / "meta.json").write_text(json.dumps(meta))
                for name in ("mem", "state", "meta.json"):
                    await asyncio.to_thread(_fsync, tmp / name)
                final = self.root / key
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
                _fsync(self.root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            log.info("template %s built in %d ms (%s)", key, meta["build_ms"], shape)
            self.evict(keep=key)
            return Template(key, final)

    def touch(self, t: Template) -> None:
        with contextlib.suppress(OSError):
            os.utime(t.meta)

    def discard(self, t: Template, why: str) -> None:
        log.warning("template %s discarded: %s", t.key, why)
        shutil.rmtree(t.dir, ignore_errors=True)

    def entries(self) -> list[dict[str, Any]]:
        out = []
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") or not (d / "meta.json").is_file():
                continue
            try:
                meta = json.loads((d / "meta.json").read_text())
            except (OSError, ValueError):
                meta = {}
            size = sum(f.stat().st_blocks * 512 for f in d.iterdir() if f.is_file())
            out.append({"key": d.name, "size": size,
                        "last_used": (d / "meta.json").stat().st_mtime, **meta})
        return out

    def evict(self, keep: str | None = None) -> None:
        """Least recently used first, down to ``max_count``."""
        items = sorted(self.entries(), key=lambda e: e["last_used"])
        while len(items) > self.max_count:
            e = items.pop(0)
            if e["key"] == keep:
                continue
            log.info("template %s evicted (least recently used)", e["key"])
            shutil.rmtree(self.root / e["key"], ignore_errors=True)

    def remove(self, prefix: str) -> list[str]:
        gone = []
        for e in self.entries():
            if e["key"].startswith(prefix):
                shutil.rmtree(self.root / e["key"], ignore_errors=True)
                gone.append(e["key"])
        return gone
