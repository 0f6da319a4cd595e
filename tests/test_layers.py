"""Applying layer tars: whiteouts, links, metadata, compression, hostile archives."""

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard

from vicd.errors import InvalidParameter
from vicd.layers import Limits, apply_layer, scan_layer


def make_tar(*entries: tuple, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """entries: (name, kind, arg, **opts) with kind file/dir/sym/link/fifo/chr."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for entry in entries:
            name, kind, arg, *rest = entry
            opts = rest[0] if rest else {}
            ti = tarfile.TarInfo(name)
            ti.mtime = opts.get("mtime", 1_600_000_000)
            ti.mode = opts.get("mode", 0o755 if kind == "dir" else 0o644)
            ti.uid, ti.gid = opts.get("uid", 0), opts.get("gid", 0)
            ti.pax_headers = opts.get("pax", {})
            data = None
            if kind == "file":
                ti.size, data = len(arg), io.BytesIO(arg)
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, arg
            elif kind == "link":
                ti.type, ti.linkname = tarfile.LNKTYPE, arg
            elif kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            elif kind == "chr":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, *arg
            tf.addfile(ti, data)
    return buf.getvalue()


def apply(data: bytes, root: Path, **kw) -> object:
    return apply_layer(io.BytesIO(data), root, **kw)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


def snapshot(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


SUID = {"mode": 0o4755, "uid": 1000, "gid": 1000}


def test_basic_entries_and_metadata(root: Path):
    data = make_tar(
        (".", "dir", None, {"mode": 0o755}),
        ("bin", "dir", None, {"mode": 0o700, "mtime": 1_000_000_000}),
        ("bin/busybox", "file", b"x" * 100, SUID),
        ("bin/sh", "sym", "busybox"),
        ("bin/ls", "link", "bin/busybox", SUID),  # tar writers repeat the inode's metadata
        ("etc/deep/file", "file", b"auto parents"),
        ("run/fifo", "fifo", None),
        ("dev/null", "chr", (1, 3), {"mode": 0o666}),
        ("file-x", "file", b"x", {"pax": {"SCHILY.xattr.user.test": "v"}}),
    )
    info = apply(data, root)
    assert info.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert info.tar_size == len(data)
    assert info.size == 100 + len(b"auto parents") + 1 + len("busybox")  # symlinks count
    st = os.lstat(root / "bin/busybox")
    assert stat.S_IMODE(st.st_mode) == 0o4755 or os.geteuid() != 0
    assert st.st_mtime == 1_600_000_000
    assert os.readlink(root / "bin/sh") == "busybox"
    assert os.lstat(root / "bin/ls").st_ino == st.st_ino
    assert stat.S_IMODE(os.lstat(root / "bin").st_mode) == 0o700
    assert os.lstat(root / "bin").st_mtime == 1_000_000_000  # set after its children
    assert (root / "etc/deep/file").read_bytes() == b"auto parents"
    assert stat.S_ISFIFO(os.lstat(root / "run/fifo").st_mode)
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (1000, 1000)
        assert stat.S_ISCHR(os.lstat(root / "dev/null").st_mode)
        assert os.major(os.lstat(root / "dev/null").st_rdev) == 1
    else:
        assert not (root / "dev/null").exists()


def test_whiteouts_and_opaque(root: Path):
    apply(
        make_tar(
            ("a/keep", "file", b"1"),
            ("a/gone", "file", b"2"),
            ("a/sub/x", "file", b"3"),
            ("o/old1", "file", b"4"),
            ("o/olddir/y", "file", b"5"),
            ("dir/f", "file", b"6"),
        ),
        root,
    )
    apply(
        make_tar(
            ("a/.wh.gone", "file", b""),
            ("a/.wh.sub", "file", b""),
            ("o", "dir", None),
            ("o/new", "file", b"n"),
            ("o/.wh..wh..opq", "file", b""),
            ("o/later", "file", b"l"),
            ("dir", "file", b"now a file"),
            ("x/.wh..wh.plnk", "file", b""),
        ),
        root,
    )
    assert snapshot(root / "a") == {"keep"}
    assert snapshot(root / "o") == {"new", "later"}  # this layer's own files survive
    assert (root / "dir").read_bytes() == b"now a file"
    assert not list(root.rglob(".wh.*"))


def test_gzip_and_diff_id_of_uncompressed(root: Path):
    data = make_tar(("f", "file", b"hello"))
    info = apply(gzip.compress(data), root)
    assert info.compression == "gzip"
    assert info.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert (root / "f").read_bytes() == b"hello"


def test_zstd_multi_frame_and_bomb(root: Path):
    data = make_tar(("f", "file", b"hello"), ("g", "file", b"world"))
    two_frames = zstandard.ZstdCompressor().compress(data[:700]) + \
        zstandard.ZstdCompressor().compress(data[700:])
    info = apply(two_frames, root)
    assert info.compression == "zstd"
    assert info.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert (root / "g").read_bytes() == b"world"
    bomb = zstandard.ZstdCompressor().compress(make_tar(("z", "file", b"\0" * 5_000_000)))
    assert len(bomb) < 20_000
    with pytest.raises(InvalidParameter, match="size limit"):
        apply(bomb, root, limits=Limits(max_bytes=1_000_000))


def test_scan_copies_uncompressed(tmp_path: Path):
    data = make_tar(("f", "file", b"hello"))
    out = io.BytesIO()
    info = scan_layer(io.BytesIO(gzip.compress(data)), copy_to=out)
    assert out.getvalue() == data
    assert info.entries == 1


def test_replace_symlink_with_dir_does_not_follow(root: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    apply(make_tar(("d", "sym", str(outside))), root)
    apply(make_tar(("d", "dir", None), ("d/f", "file", b"x")), root)
    assert not os.path.islink(root / "d")
    assert (root / "d/f").exists()
    assert list(outside.iterdir()) == []


def test_absolute_paths_made_relative(root: Path, tmp_path: Path):
    apply(make_tar(("/etc/abs", "file", b"x"), ("/../../up", "file", b"y")), root)
    assert (root / "etc/abs").read_bytes() == b"x"
    assert (root / "up").read_bytes() == b"y"
    assert snapshot(tmp_path) == {"root", "root/etc", "root/etc/abs", "root/up"}


@pytest.mark.parametrize(
    "entries",
    [
        [("../evil", "file", b"x")],
        [("a/../../evil", "file", b"x")],
        [("link", "link", "../../etc/passwd")],
        [("esc", "sym", "../.."), ("esc/evil", "file", b"x")],
        [("a", "dir", None), ("a/esc", "sym", "../../outside"), ("a/esc/evil", "file", b"x")],
        [("esc", "sym", "../outside"), ("esc/.wh.victim", "file", b"")],
        [("esc", "sym", "../outside/victim"), ("hl", "link", "esc/x")],
    ],
)
def test_hostile_refused_nothing_outside(tmp_path: Path, entries):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("keep")
    before = snapshot(tmp_path)
    with pytest.raises(InvalidParameter):
        apply(make_tar(*entries), root)
    after = snapshot(tmp_path)
    assert {p for p in after - before if not p.startswith("root")} == set()
    assert (outside / "victim").read_text() == "keep"


def test_absolute_symlink_is_rooted(tmp_path: Path):
    """An absolute symlink target means the target root, as in the container."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    apply(make_tar(("esc", "sym", str(outside)), ("esc/evil", "file", b"x")), root)
    assert list(outside.iterdir()) == []
    assert (root / str(outside).lstrip("/") / "evil").read_bytes() == b"x"


def test_relative_symlink_inside_is_followed(root: Path):
    apply(make_tar(("usr/lib", "dir", None), ("lib", "sym", "usr/lib")), root)
    apply(make_tar(("lib/libc.so", "file", b"c")), root)
    assert (root / "usr/lib/libc.so").read_bytes() == b"c"
    assert os.path.islink(root / "lib")


def test_hardlink_to_directory_refused(root: Path):
    with pytest.raises(InvalidParameter, match="hardlink"):
        apply(make_tar(("d", "dir", None), ("l", "link", "d")), root)


def test_bomb_limits(root: Path):
    big = gzip.compress(make_tar(("zeros", "file", b"\0" * 5_000_000)))
    assert len(big) < 20_000
    with pytest.raises(InvalidParameter, match="size limit"):
        apply(big, root, limits=Limits(max_bytes=1_000_000))
    many = make_tar(*[(f"f{i}", "file", b"") for i in range(50)])
    with pytest.raises(InvalidParameter, match="entries"):
        apply(many, root, limits=Limits(max_entries=10))
    with pytest.raises(InvalidParameter, match="entries"):
        scan_layer(io.BytesIO(many), limits=Limits(max_entries=10))


def test_garbage_refused(root: Path):
    with pytest.raises(InvalidParameter):
        apply(b"this is not a tar archive at all" * 40, root)
    with pytest.raises(InvalidParameter):
        apply(gzip.compress(b"x" * 1000)[:-20], root)
