"""Layer tars: decompress, hash (diff_id) and apply onto a directory without trusting them.

Paths are resolved by hand, component by component, so that a symlink planted by the
archive itself can never make us write outside the target directory (dockerd gets the
same effect from a chroot). Absolute symlink targets are therefore taken relative to the
target root; a `..` that would climb above it is refused.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import io
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import zstandard

from vicd.errors import InvalidParameter

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
CHUNK = 1 << 20
MAX_SYMLINKS = 40


@dataclass(frozen=True)
class Limits:
    """Caps against tar/gzip bombs: uncompressed bytes, file content bytes, entries."""

    max_bytes: int = 64 << 30
    max_entries: int = 2_000_000


@dataclass
class LayerInfo:
    """What streaming a layer told us."""

    diff_id: str = ""  # "sha256:<hex>" of the uncompressed tar
    tar_size: int = 0  # bytes of the uncompressed tar
    size: int = 0  # regular-file bytes + symlink target lengths (dockerd's layer Size)
    entries: int = 0
    compression: str = "none"


class _Prefixed(io.RawIOBase):
    """A stream with some already-read bytes pushed back in front (for magic sniffing)."""

    def __init__(self, prefix: bytes, src: IO[bytes]) -> None:
        self._prefix = prefix
        self._src = src

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._prefix:
            n = min(len(b), len(self._prefix))
            b[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._src.read(len(b))
        b[: len(data)] = data
        return len(data)


class _Counting(io.RawIOBase):
    """Hashes, counts, optionally copies everything read through it; enforces max_bytes."""

    def __init__(self, src: IO[bytes], limit: int, copy_to: IO[bytes] | None) -> None:
        self._src = src
        self._limit = limit
        self._copy_to = copy_to
        self.hash = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._src.read(len(b))
        if not data:
            return 0
        self.count += len(data)
        if self.count > self._limit:
            raise InvalidParameter(f"layer exceeds the size limit of {self._limit} bytes")
        self.hash.update(data)
        if self._copy_to is not None:
            self._copy_to.write(data)
        b[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read to EOF so the hash covers tar padding after the end-of-archive marker."""
        while self.read(CHUNK):
            pass


def detect_compression(head: bytes) -> str:
    """Name the compression from the first bytes (like dockerd's DetectCompression)."""
    if head.startswith(b"\x1f\x8b\x08"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    return "none"


def decompressed(src: IO[bytes]) -> tuple[IO[bytes], str]:
    """Wrap src so that reading it yields the uncompressed bytes; also name the codec."""
    head = src.read(6)
    raw: IO[bytes] = io.BufferedReader(_Prefixed(head, src), CHUNK)
    kind = detect_compression(head)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb"), kind
    if kind == "bzip2":
        return bz2.BZ2File(raw), kind
    if kind == "xz":
        return lzma.LZMAFile(raw), kind
    if kind == "zstd":
        # a layer may hold several frames (parallel encoders write them)
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True), kind
    return raw, kind


@contextmanager
def _opened(src: BinaryIO | IO[bytes] | Path) -> Iterator[IO[bytes]]:
    if isinstance(src, Path | str):
        with open(src, "rb") as f:
            yield f
    else:
        yield src


def clean_name(name: str) -> str:
    """Archive member name -> clean relative path ('' for the root). Absolute names become
    relative like dockerd; a `..` leaving the root is a breakout and refused."""
    cleaned = posixpath.normpath(name).lstrip("/")
    if cleaned == ".":
        return ""
    if cleaned == ".." or cleaned.startswith("../"):
        raise InvalidParameter(f"invalid layer: {name!r} is outside of the target directory")
    return cleaned


@contextmanager
def _tar_stream(
    src: IO[bytes], limits: Limits, copy_to: IO[bytes] | None
) -> Iterator[tuple[tarfile.TarFile, _Counting, LayerInfo]]:
    """Open a (possibly compressed) tar stream, counted and hashed on its uncompressed bytes."""
    plain, kind = decompressed(src)
    counter = _Counting(plain, limits.max_bytes, copy_to)
    info = LayerInfo(compression=kind)
    try:
        with tarfile.open(fileobj=io.BufferedReader(counter, CHUNK), mode="r|") as tf:
            yield tf, counter, info
            counter.drain()
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # real I/O errors are ours, not the archive's
        raise InvalidParameter(f"invalid layer archive: {e}") from e
    info.diff_id = "sha256:" + counter.hash.hexdigest()
    info.tar_size = counter.count


def _count(info: LayerInfo, member: tarfile.TarInfo, limits: Limits) -> None:
    info.entries += 1
    if info.entries > limits.max_entries:
        raise InvalidParameter(f"layer has more than {limits.max_entries} entries")
    if member.issym():  # dockerd counts a symlink's st_size (its target's length)
        info.size += len(member.linkname.encode("utf-8", "surrogateescape"))
    if member.isreg():
        info.size += member.size
        # sparse members expand beyond their stored bytes: cap the expanded size too
        if info.size > limits.max_bytes:
            raise InvalidParameter(f"layer exceeds the size limit of {limits.max_bytes} bytes")


def scan_layer(
    src: BinaryIO | IO[bytes] | Path,
    copy_to: IO[bytes] | None = None,
    limits: Limits | None = None,
) -> LayerInfo:
    """Validate member names, compute diff_id and sizes; copy the uncompressed tar to copy_to."""
    limits = limits or Limits()
    with _opened(src) as f, _tar_stream(f, limits, copy_to) as (tf, _counter, info):
        for member in tf:
            _count(info, member, limits)
            clean_name(member.name)
            if member.islnk():
                clean_name(member.linkname)
    return info


class _Applier:
    """State of one layer being unpacked into root."""

    def __init__(self, root: Path, is_root: bool) -> None:
        self.root = str(root)
        self.is_root = is_root
        self.unpacked: set[str] = set()
        self.dirs: list[tuple[str, tarfile.TarInfo]] = []

    def resolve(self, rel: str, follow_last: bool) -> str:
        """Host path of rel inside root, following symlinks scoped to root."""
        todo = [p for p in rel.split("/") if p not in ("", ".")]
        done: list[str] = []
        hops = 0
        while todo:
            comp = todo.pop(0)
            if comp == "..":
                if not done:
                    raise InvalidParameter(
                        f"invalid layer: {rel!r} resolves outside of the target directory"
                    )
                done.pop()
                continue
            cur = os.path.join(self.root, *done, comp)
            if (todo or follow_last) and os.path.islink(cur):
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise InvalidParameter(f"invalid layer: too many symlinks in {rel!r}")
                target = os.readlink(cur)
                if target.startswith("/"):
                    done = []
                todo = [p for p in target.split("/") if p not in ("", ".")] + todo
                continue
            done.append(comp)
        return os.path.join(self.root, *done)

    def parent_dir(self, rel: str) -> str:
        """Resolve and create (0755, like dockerd) the parent directory of rel."""
        parent = self.resolve(posixpath.dirname(rel), follow_last=True)
        if not os.path.isdir(parent):
            if os.path.lexists(parent):
                raise InvalidParameter(f"invalid layer: parent of {rel!r} is not a directory")
            os.makedirs(parent, 0o755, exist_ok=True)
        return parent

    def whiteout(self, rel: str, base: str) -> None:
        parent = self.resolve(posixpath.dirname(rel), follow_last=True)
        if base == WHITEOUT_OPAQUE:
            if os.path.isdir(parent) and not os.path.islink(parent):
                self._make_opaque(parent)
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            return  # other AUFS metadata (.wh..wh.plnk, ...) is not content
        _remove(os.path.join(parent, base[len(WHITEOUT_PREFIX) :]))

    def _make_opaque(self, top: str) -> None:
        """Hide lower-layer content of top, keeping what this layer already put there."""
        for entry in os.scandir(top):
            if entry.path not in self.unpacked:
                _remove(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                self._make_opaque(entry.path)

    def entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo, rel: str) -> None:
        if rel == "":
            if m.isdir():
                self.dirs.append((self.root, m))
            return
        parent = self.parent_dir(rel)
        path = os.path.join(parent, posixpath.basename(rel))
        if os.path.lexists(path) and not (
            m.isdir() and os.path.isdir(path) and not os.path.islink(path)
        ):
            _remove(path)
        if m.isdir():
            if not os.path.isdir(path):
                os.mkdir(path, 0o700)
            os.chmod(path, (m.mode & 0o7777) | 0o700)  # stay writable until the end
            self.dirs.append((path, m))
        elif m.isreg():
            self._write_file(tf, m, path)
        elif m.issym():
            os.symlink(m.linkname, path)
        elif m.islnk():
            self._hardlink(m, path)
        elif m.isfifo():
            os.mkfifo(path, m.mode & 0o7777)
        elif m.ischr() or m.isblk():
            if not self.is_root:
                return  # only root may create device nodes; skip them otherwise
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(path, (m.mode & 0o7777) | kind, os.makedev(m.devmajor, m.devminor))
        else:
            return  # unknown types (GNU volume headers, ...) carry no file
        self.unpacked.add(path)
        if not m.isdir():
            self._metadata(path, m)

    def _write_file(self, tf: tarfile.TarFile, m: tarfile.TarInfo, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            data = tf.extractfile(m)
            if data is not None:
                shutil.copyfileobj(data, out, CHUNK)

    def _hardlink(self, m: tarfile.TarInfo, path: str) -> None:
        link_rel = clean_name(m.linkname)
        target = os.path.join(
            self.resolve(posixpath.dirname(link_rel), follow_last=True),
            posixpath.basename(link_rel),
        )
        if (
            not link_rel
            or not os.path.lexists(target)
            or os.path.isdir(target)
            and not (os.path.islink(target))
        ):
            raise InvalidParameter(f"invalid layer: bad hardlink target {m.linkname!r}")
        os.link(target, path, follow_symlinks=False)

    def _metadata(self, path: str, m: tarfile.TarInfo) -> None:
        if self.is_root:
            try:
                os.lchown(path, m.uid, m.gid)
            except OSError as e:  # e.g. ids beyond a user namespace's map
                if e.errno not in (errno.EINVAL, errno.EPERM):
                    raise
        if not m.issym():
            os.chmod(path, m.mode & 0o7777)  # after chown, which clears setuid bits
        for key, value in (m.pax_headers or {}).items():
            if key.startswith("SCHILY.xattr."):
                _set_xattr(path, key[len("SCHILY.xattr.") :], value)
        mtime_ns = int(m.mtime * 1_000_000_000)
        try:
            os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
        except OSError:
            pass  # some filesystems refuse times on symlinks; cosmetic only

    def finish(self) -> None:
        """Directory modes and mtimes last: writing children would change them."""
        for path, m in reversed(self.dirs):
            if os.path.isdir(path) and not os.path.islink(path):  # a whiteout may have won
                self._metadata(path, m)


def _set_xattr(path: str, name: str, value: str) -> None:
    raw = value.encode("utf-8", "surrogateescape")
    try:
        os.setxattr(path, name, raw, follow_symlinks=False)
    except OSError:
        pass  # unsupported namespace or filesystem: best effort, like rootless dockerd


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def apply_layer(
    src: BinaryIO | IO[bytes] | Path,
    target: Path,
    limits: Limits | None = None,
    copy_to: IO[bytes] | None = None,
) -> LayerInfo:
    """Unpack a layer tar (plain/gzip/bzip2/xz/zstd) onto target, applying whiteouts.

    Raises InvalidParameter for hostile or malformed archives; anything already unpacked
    stays inside target (callers unpack into a scratch directory they can throw away).
    """
    limits = limits or Limits()
    target.mkdir(parents=True, exist_ok=True)
    applier = _Applier(target.resolve(), os.geteuid() == 0)
    with _opened(src) as f, _tar_stream(f, limits, copy_to) as (tf, _counter, info):
        for member in tf:
            _count(info, member, limits)
            rel = clean_name(member.name)
            base = posixpath.basename(rel)
            if base.startswith(WHITEOUT_PREFIX):
                applier.whiteout(rel, base)
                continue
            applier.entry(tf, member, rel)
        applier.finish()
    return info
