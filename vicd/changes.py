"""docker diff and docker commit for VM containers.

The image side is the file list of the image's layers (whiteouts applied),
read from the image store's tar blobs. The container side is a listing the
guest walks (tether ``archive_get`` with ``listing``: type, mode, owner,
size, mtime, link target per path, no contents). A path is

- ``A`` (1) when only the container has it,
- ``D`` (2) when only the image has it (below a deleted directory only the
  directory is reported, as dockerd does with overlay2),
- ``C`` (0) when its type, permissions, owner or link target differ, or for
  a non-directory its size or mtime, or for a directory its mtime (a file
  added or removed in it changes it, as the kernel does).

The guest's own mounts (/proc, /sys, /dev, the /etc files it bind-mounts,
volume targets) and mke2fs' /lost+found are left out. ``commit`` asks the
guest for a tar of exactly the A and C paths (``only``), adds a ``.wh.``
whiteout per D, and stores that as the one new layer over the image's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vicd.archive import _need, container_vm
from vicd.container import Container
from vicd.errors import Conflict, InvalidParameter
from vicd.image_store import (
    ImageStore,
    _canonical,
    apply_changes,
    format_time,
    full_container_config,
)
from vicd.references import parse_normalized

if TYPE_CHECKING:
    from vicd.engine import Engine

CHANGED, ADDED, DELETED = 0, 1, 2
KIND = {CHANGED: "C", ADDED: "A", DELETED: "D"}
IGNORED = ("/proc", "/sys", "/dev", "/lost+found", "/etc/hosts", "/etc/hostname",
           "/etc/resolv.conf")

# Go os.FileMode type bits -> a one-letter type.
_GO_TYPES = [(1 << 31, "d"), (1 << 27, "l"), (1 << 25, "p"), (1 << 24, "s")]
_GO_DEVICE, _GO_CHAR = 1 << 26, 1 << 21
_GO_SETUID, _GO_SETGID, _GO_STICKY = 1 << 23, 1 << 22, 1 << 20


Entry = tuple[str, int, int, int, int, int, str]  # type, perm, uid, gid, size, mtime, link


def _from_go(e: dict[str, Any]) -> Entry:
    m = int(e["m"])
    kind = "f"
    for bit, letter in _GO_TYPES:
        if m & bit:
            kind = letter
    if m & _GO_DEVICE:
        kind = "c" if m & _GO_CHAR else "b"
    perm = m & 0o777
    perm |= 0o4000 if m & _GO_SETUID else 0
    perm |= 0o2000 if m & _GO_SETGID else 0
    perm |= 0o1000 if m & _GO_STICKY else 0
    size = int(e.get("s", 0)) if kind == "f" else 0  # a symlink's is its target's length
    return (kind, perm, int(e.get("u", 0)), int(e.get("g", 0)), size,
            int(e.get("t", 0)), str(e.get("l", "")))


def _tar_kind(m: tarfile.TarInfo) -> str:
    if m.isdir():
        return "d"
    if m.issym():
        return "l"
    if m.ischr():
        return "c"
    if m.isblk():
        return "b"
    if m.isfifo():
        return "p"
    return "f"


def image_listing(store: ImageStore, image_id: str) -> dict[str, Entry]:
    """Path -> entry of the image's merged layers."""
    with store._lock:
        diff_ids = store._diff_ids(image_id)
    files: dict[str, Entry] = {}
    for diff in diff_ids:
        with tarfile.open(store._blob_path(diff), "r:") as tf:
            for m in tf:
                name = os.path.normpath("/" + m.name)
                parent, base = os.path.split(name)
                if base == ".wh..wh..opq":
                    for p in [p for p in files if p.startswith(parent.rstrip("/") + "/")]:
                        del files[p]
                    continue
                if base.startswith(".wh."):
                    gone = os.path.join(parent, base[4:])
                    for p in [p for p in files if p == gone or p.startswith(gone + "/")]:
                        del files[p]
                    continue
                if name == "/":
                    continue
                if m.islnk():
                    target = files.get(os.path.normpath("/" + m.linkname))
                    size = target[4] if target else 0
                    files[name] = ("f", m.mode & 0o7777, m.uid, m.gid, size, int(m.mtime), "")
                    continue
                files[name] = (_tar_kind(m), m.mode & 0o7777, m.uid, m.gid,
                               m.size if m.isreg() else 0, int(m.mtime),
                               m.linkname if m.issym() else "")
    return files


def _ignored(path: str, extra: list[str]) -> bool:
    for p in (*IGNORED, *extra):
        if path == p or path.startswith(p.rstrip("/") + "/"):
            return True
    return False


def compare(image: dict[str, Entry], ctr: dict[str, Entry], extra: list[str]
            ) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for path, e in ctr.items():
        if _ignored(path, extra):
            continue
        old = image.get(path)
        if old is None:
            out.append((path, ADDED))
            continue
        same = e[0] == old[0] and e[1:4] == old[1:4] and e[6] == old[6] and e[5] == old[5]
        if e[0] != "d":
            same = same and e[4] == old[4]
        if not same:
            out.append((path, CHANGED))
    # The guest creates the /etc files it bind-mounts when the image lacks
    # them, which touches /etc: not a change of the container's own.
    for parent in {os.path.dirname(p) for p in (*IGNORED, *extra)}:
        if (parent, CHANGED) in out and not any(
                q.startswith(parent.rstrip("/") + "/") for q, _ in out):
            out.remove((parent, CHANGED))
    deleted = sorted(p for p in image if p not in ctr and not _ignored(p, extra))
    top: list[str] = []
    for p in deleted:
        if top and p.startswith(top[-1].rstrip("/") + "/"):
            continue
        top.append(p)
    out += [(p, DELETED) for p in top]
    out.sort()
    return out


async def _container_listing(vm: Any, extra: list[str]) -> dict[str, Entry]:
    _, data = await vm.get_archive("/", rebase="", excludes=extra or None, listing=True)
    buf = bytearray()
    async for chunk in data:
        buf += chunk
    out: dict[str, Entry] = {}
    for line in bytes(buf).splitlines():
        if line.strip():
            e = json.loads(line)
            out[e["p"]] = _from_go(e)
    return out


async def _changes(engine: Engine, c: Container, vm: Any) -> list[tuple[str, int]]:
    _need(vm, "get_archive")
    extra = [m["Destination"] for m in c.mounts]
    ctr = await _container_listing(vm, extra)
    image = await asyncio.to_thread(image_listing, engine.images, c.image_id)
    return compare(image, ctr, extra)


async def diff(engine: Engine, ref: str) -> list[dict[str, Any]]:
    c = engine.get(ref)
    async with container_vm(engine, c) as vm:
        changes = await _changes(engine, c, vm)
    return [{"Path": p, "Kind": k} for p, k in changes]


async def commit(engine: Engine, ref: str, repo: str, tag: str, comment: str, author: str,
                 pause: bool, changes: list[str], config: dict[str, Any] | None) -> str:
    c = engine.get(ref)
    if repo:
        parsed = parse_normalized(f"{repo}:{tag}" if tag else repo)
        if parsed.digest is not None:
            raise InvalidParameter("cannot commit to digest reference")
    base = full_container_config({**c.config, **(config or {})})
    new_config = apply_changes(changes, base)  # refuse a bad --change first
    tmp = Path(tempfile.mkstemp(dir=engine.images.tmp, suffix=".commit")[1])
    try:
        async with container_vm(engine, c) as vm:
            frozen = pause and c.state.status == "running"  # a paused one is frozen already
            if frozen:
                await vm.freeze(True)
            try:
                found = await _changes(engine, c, vm)
                only, trees = _layer_paths(found)
                _, data = await vm.get_archive("/", rebase="", only=only, only_trees=trees,
                                               excludes=[m["Destination"] for m in c.mounts])
                with open(tmp, "wb") as f:
                    async for chunk in data:
                        f.write(chunk)
            finally:
                if frozen:
                    with contextlib.suppress(Exception):
                        await vm.freeze(False)
        deleted = [p for p, k in found if k == DELETED]
        image_id = await asyncio.to_thread(
            _store_commit, engine.images, c, tmp, deleted, new_config, repo, tag, comment, author)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    engine.events.publish("container", "commit", c.id, comment=comment, imageID=image_id,
                          imageRef=f"{repo}:{tag or 'latest'}" if repo else "",
                          **engine._attrs(c))
    return image_id


def _layer_paths(found: list[tuple[str, int]]) -> tuple[list[str], list[str]]:
    """The paths for the guest to archive: an added directory goes as a whole tree
    (everything below it is added too), so the request stays small."""
    added = {p for p, k in found if k == ADDED}
    has_added_child = {os.path.dirname(p) for p in added}
    only, trees = [], []
    for p, k in found:
        if k == DELETED:
            continue
        d, inside = os.path.dirname(p), False
        while d not in ("/", "") and not inside:
            inside, d = d in added, os.path.dirname(d)
        if inside:
            continue
        (trees if k == ADDED and p in has_added_child else only).append(p)
    return only, trees


def _layer_with_whiteouts(src: Path, deleted: list[str]) -> Path:
    out = src.with_suffix(".layer")
    with tarfile.open(src, "r:") as tin, tarfile.open(out, "w:", format=tarfile.PAX_FORMAT) as tout:
        for m in tin:
            tout.addfile(m, tin.extractfile(m) if m.isreg() else None)
        for p in deleted:
            parent, base = os.path.split(p)
            wh = tarfile.TarInfo(os.path.join(parent, ".wh." + base).lstrip("/"))
            wh.mtime = int(time.time())
            tout.addfile(wh)
    return out


def _store_commit(store: ImageStore, c: Container, tar: Path, deleted: list[str],
                  cfg: dict[str, Any], repo: str, tag: str, comment: str, author: str) -> str:
    layer = _layer_with_whiteouts(tar, deleted)
    try:
        with store._pinned() as pins:
            info = store._put_layer(layer, pins)
            with store._lock:
                parent = store._config(c.image_id)
                diff_ids = store._diff_ids(c.image_id)
            created = format_time(time.time_ns())
            history = list(parent.get("history") or [])
            entry: dict[str, Any] = {"created": created}
            if author:
                entry["author"] = author
            entry["created_by"] = " ".join([c.path, *c.args])
            if comment:
                entry["comment"] = comment
            history.append(entry)
            config: dict[str, Any] = {
                "architecture": parent.get("architecture", "amd64"),
                "config": cfg,
                "container": c.id,
                "container_config": full_container_config(c.config),
                "created": created,
                "docker_version": "vicd",
                "history": history,
                "os": parent.get("os", "linux"),
                "rootfs": {"type": "layers", "diff_ids": [*diff_ids, info.diff_id]},
            }
            if author:
                config["author"] = author
            if comment:
                config["comment"] = comment
            img_id = "sha256:" + store._put_bytes(_canonical(config), pins)
            with store._lock:
                parent_layers = [store._state["layers"].get(d) for d in diff_ids]
                if any(p is None for p in parent_layers):
                    raise Conflict("the container's image lost its layers")
                store._add_image(img_id, [info])
                if repo:
                    ref = parse_normalized(f"{repo}:{tag}" if tag else repo).with_default_tag()
                    store._set_ref(ref, img_id)
                store._save_state()
            return img_id
    finally:
        with contextlib.suppress(FileNotFoundError):
            layer.unlink()

