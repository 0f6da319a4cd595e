"""docker cp and docker export with the stock CLI: running and stopped containers,
tar streams on stdin/stdout, dockerd's errors, and no way out of the container root."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import DOCKER, Vicd
from refdockerd import RefDockerd, dockerd  # noqa: F401


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def running(vicd: Vicd):
    name = _name("cp")
    vicd.docker("run", "-d", "--name", name, "busybox", "sleep", "1000")
    yield name
    vicd.docker("rm", "-f", name, check=False)


def _tree(base: Path) -> None:
    (base / "sub").mkdir(parents=True)
    (base / "a.txt").write_text("alpha\n")
    (base / "sub" / "b.bin").write_bytes(os.urandom(70000))
    (base / "sub").chmod(0o750)
    (base / "a.txt").chmod(0o640)
    os.symlink("sub/b.bin", base / "link")
    os.utime(base / "a.txt", (1_600_000_000, 1_600_000_000))


def test_cp_roundtrip_running(vicd: Vicd, running: str, tmp_path: Path):
    src = tmp_path / "src"
    _tree(src)
    vicd.docker("cp", str(src), f"{running}:/tmp/")
    ls = vicd.docker("exec", running, "sh", "-c",
                     "stat -c '%n %a %s' /tmp/src/a.txt /tmp/src/sub; readlink /tmp/src/link;"
                     "md5sum /tmp/src/sub/b.bin | cut -d' ' -f1; stat -c %Y /tmp/src/a.txt").stdout
    lines = ls.split("\n")
    assert lines[0] == "/tmp/src/a.txt 640 6"
    assert lines[1].startswith("/tmp/src/sub 750")
    assert lines[2] == "sub/b.bin"
    import hashlib
    assert lines[3] == hashlib.md5((src / "sub" / "b.bin").read_bytes()).hexdigest()
    assert lines[4] == "1600000000"
    out = tmp_path / "out"
    out.mkdir()
    vicd.docker("cp", f"{running}:/tmp/src", str(out))
    assert (out / "src" / "a.txt").read_text() == "alpha\n"
    assert (out / "src" / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()
    assert os.readlink(out / "src" / "link") == "sub/b.bin"
    # Contents of a directory (trailing /.), and a single file renamed.
    vicd.docker("cp", f"{running}:/tmp/src/.", str(tmp_path / "flat"))
    assert (tmp_path / "flat" / "a.txt").exists()
    vicd.docker("cp", f"{running}:/etc/hostname", str(tmp_path / "h"))
    assert (tmp_path / "h").read_text().strip() == vicd.inspect(running)["Config"]["Hostname"]


def test_cp_follow_link(vicd: Vicd, running: str, tmp_path: Path):
    vicd.docker("exec", running, "sh", "-c", "echo target > /tmp/t; ln -s /tmp/t /tmp/l")
    vicd.docker("cp", f"{running}:/tmp/l", str(tmp_path / "nolink"))
    assert os.readlink(tmp_path / "nolink") == "/tmp/t"
    vicd.docker("cp", "-L", f"{running}:/tmp/l", str(tmp_path / "followed"))
    assert (tmp_path / "followed").read_text() == "target\n"


def test_cp_tar_streams(vicd: Vicd, running: str):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        data = b"from stdin\n"
        info = tarfile.TarInfo("stdin.txt")
        info.size, info.mode, info.uid, info.gid = len(data), 0o600, 1234, 99
        tf.addfile(info, io.BytesIO(data))
    vicd.docker("cp", "-", f"{running}:/tmp", input=buf.getvalue())
    st = vicd.docker("exec", running, "stat", "-c", "%a %u %g", "/tmp/stdin.txt").stdout
    assert st.strip() == "600 1234 99"
    r = vicd.docker("cp", f"{running}:/tmp/stdin.txt", "-")
    with tarfile.open(fileobj=io.BytesIO(r.stdout.encode()), mode="r") as tf:
        assert tf.getnames() == ["stdin.txt"]
        f = tf.extractfile("stdin.txt")
        assert f is not None and f.read() == b"from stdin\n"


def test_cp_errors_match_dockerd(vicd: Vicd, running: str, dockerd: RefDockerd,  # noqa: F811
                                 tmp_path: Path):
    ref = _name("cpref")
    dockerd.docker("run", "-d", "--network", "none", "--name", ref, "busybox", "sleep", "1000")
    try:
        f = tmp_path / "f"
        f.write_text("x")
        cases = [
            ("cp", "{c}:/nonexistent", str(tmp_path / "o")),
            ("cp", str(f), "{c}:/etc/passwd/x"),
            ("cp", str(f), "{c}:/nonexistent/dir/"),
        ]
        for case in cases:
            v = vicd.docker(*[a.format(c=running) for a in case], check=False)
            d = dockerd.docker(*[a.format(c=ref) for a in case], check=False)
            assert v.returncode == d.returncode != 0, (case, v, d)
            # The last line: the CLI may log its own broken-pipe noise before it.
            last = [x.strip().splitlines()[-1] for x in (v.stderr, d.stderr)]
            assert last[0].replace(running, "C") == last[1].replace(ref, "C"), case
    finally:
        dockerd.docker("rm", "-f", ref, check=False)


def test_cp_stopped_container(vicd: Vicd, tmp_path: Path):
    name = _name("cpstop")
    vicd.docker("create", "--name", name, "busybox", "cat", "/tmp/in.txt")
    try:
        (tmp_path / "in.txt").write_text("into a stopped container\n")
        vicd.docker("cp", str(tmp_path / "in.txt"), f"{name}:/tmp/")
        assert vicd.inspect(name)["State"]["Status"] == "created"
        r = vicd.docker("start", "-a", name)
        assert r.stdout == "into a stopped container\n"
        vicd.docker("cp", f"{name}:/tmp/in.txt", str(tmp_path / "back.txt"))
        assert (tmp_path / "back.txt").read_text() == "into a stopped container\n"
        r = vicd.docker("cp", f"{name}:/missing", str(tmp_path / "m"), check=False)
        assert f"Could not find the file /missing in container {name}" in r.stderr
    finally:
        vicd.docker("rm", "-f", name, check=False)


def test_cp_cannot_leave_the_container(vicd: Vicd, running: str, tmp_path: Path):
    """The guest's own files (its initramfs: /init, /modules) stay out of reach."""
    vicd.docker("exec", running, "sh", "-c",
                "ln -s / /tmp/abs; ln -s ../../../../../../ /tmp/rel; mkdir -p /tmp/d")
    for path in ("/tmp/abs/modules/order", "/tmp/rel/modules/order", "/../../modules/order",
                 "/tmp/abs/../../modules"):
        r = vicd.docker("cp", f"{running}:{path}", "-", check=False)
        assert r.returncode != 0 and "Could not find the file" in r.stderr, (path, r.stderr)
    # Out of the container root by a symlink in the target path: lands inside it.
    (tmp_path / "pwn").write_text("x")
    vicd.docker("cp", str(tmp_path / "pwn"), f"{running}:/tmp/rel/")
    assert vicd.docker("exec", running, "cat", "/pwn").stdout == "x"
    # A crafted tar: ../ names, and a symlink to / followed by a file below it.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name in ("../../../../escape1", "d/../../../../escape2"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tf.addfile(info, io.BytesIO(b"1"))
        link = tarfile.TarInfo("up")
        link.type, link.linkname = tarfile.SYMTYPE, "/../../../"
        tf.addfile(link)
        info = tarfile.TarInfo("up/modules/escape3")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"3"))
        hard = tarfile.TarInfo("hl")
        hard.type, hard.linkname = tarfile.LNKTYPE, "../../../../init"
        tf.addfile(hard)
    r = vicd.docker("cp", "-", f"{running}:/tmp/d", input=buf.getvalue(), check=False)
    found = vicd.docker("exec", running, "sh", "-c",
                        "ls /tmp/d/escape1 /tmp/d/escape2 /modules/escape3 2>&1; ls /tmp/d").stdout
    assert "/tmp/d/escape1" in found and "/modules/escape3" in found
    assert "hl" not in found.split()  # the hard link to the guest's /init was refused
    assert r.returncode != 0 and "invalid hardlink" in r.stderr


def test_export_stopped_imports_into_dockerd(vicd: Vicd, dockerd: RefDockerd,  # noqa: F811
                                             tmp_path: Path):
    name = _name("exp")
    repo = f"exported-{uuid.uuid4().hex[:6]}"
    vicd.docker("run", "--name", name, "busybox", "sh", "-c", "echo made > /made")
    try:
        out = tmp_path / "fs.tar"
        vicd.docker("export", "-o", str(out), name)
        dockerd.docker("import", str(out), repo)
        r = dockerd.docker("run", "--rm", "--network", "none", repo, "cat", "/made")
        assert r.stdout == "made\n"
    finally:
        vicd.docker("rm", "-f", name, check=False)
        dockerd.docker("rmi", "-f", repo, check=False)


def test_export(vicd: Vicd, running: str, tmp_path: Path):
    vicd.docker("exec", running, "sh", "-c", "echo exported > /root-file")
    out = tmp_path / "fs.tar"
    vicd.docker("export", "-o", str(out), running)
    with tarfile.open(out) as tf:
        names = set(tf.getnames())
        assert {"root-file", "bin/sh", "etc/passwd", "proc", "dev"} <= names, sorted(names)[:20]
        assert not any(n.startswith("proc/") or n.startswith("sys/") for n in names)
        f = tf.extractfile("root-file")
        assert f is not None and f.read() == b"exported\n"


def _cp_timing(cli, container: str, tmp_path: Path, src: Path) -> tuple[float, float]:
    t0 = time.monotonic()
    cli.docker("cp", str(src), f"{container}:/tmp/")
    t_in = time.monotonic() - t0
    back = tmp_path / f"back-{container}"
    t0 = time.monotonic()
    cli.docker("cp", f"{container}:/tmp/big", str(back))
    t_out = time.monotonic() - t0
    for i in range(10):
        assert (back / f"f{i}").read_bytes() == (src / f"f{i}").read_bytes()
    return t_in, t_out


def test_cp_100mib_timing(vicd: Vicd, running: str, dockerd: RefDockerd,  # noqa: F811
                          tmp_path: Path):
    src = tmp_path / "big"
    src.mkdir()
    for i in range(10):
        (src / f"f{i}").write_bytes(os.urandom(10 << 20))
    v_in, v_out = _cp_timing(vicd, running, tmp_path, src)
    ref = _name("cpref")
    dockerd.docker("run", "-d", "--network", "none", "--name", ref, "busybox", "sleep", "1000")
    try:
        d_in, d_out = _cp_timing(dockerd, ref, tmp_path, src)
    finally:
        dockerd.docker("rm", "-f", ref, check=False)
    print(f"cp of a 100 MiB folder: vicd in {v_in:.2f} s, out {v_out:.2f} s; "
          f"dockerd in {d_in:.2f} s, out {d_out:.2f} s")


def test_cp_read_only_targets_match_dockerd(vicd: Vicd, dockerd: RefDockerd,  # noqa: F811
                                            tmp_path: Path):
    f = tmp_path / "f"
    f.write_text("x")
    vol = _name("rovol")
    for cli, net in ((vicd, ()), (dockerd, ("--network", "none"))):
        cli.docker("run", "-d", *net, "--name", f"{vol}-v", "-v", f"{vol}:/data:ro",
                   "busybox", "sleep", "1000")
        cli.docker("run", "-d", *net, "--name", f"{vol}-r", "--read-only", "busybox",
                   "sleep", "1000")
    try:
        for target, want in ((f"{vol}-v:/data/", "mounted volume is marked read-only"),
                             (f"{vol}-r:/tmp/", "container rootfs is marked read-only")):
            for cli in (vicd, dockerd):
                r = cli.docker("cp", str(f), target, check=False)
                assert r.returncode == 1 and want in r.stderr, (cli, r.stderr)
        # Nothing changed in a read-only container (the guest's /etc files are not).
        assert vicd.docker("diff", f"{vol}-r").stdout == ""
    finally:
        for cli in (vicd, dockerd):
            cli.docker("rm", "-f", f"{vol}-v", f"{vol}-r", check=False)
            cli.docker("volume", "rm", vol, check=False)


def test_cp_archive_mode_owner_is_the_container_user(vicd: Vicd, tmp_path: Path):
    name = _name("cpuser")
    vicd.docker("run", "-d", "--name", name, "-u", "65534", "busybox", "sleep", "1000")
    try:
        f = tmp_path / "owned"
        f.write_text("x")
        vicd.docker("cp", str(f), f"{name}:/tmp/plain")
        vicd.docker("cp", "-a", str(f), f"{name}:/tmp/archived")
        out = vicd.docker("exec", name, "stat", "-c", "%u:%g", "/tmp/plain",
                          "/tmp/archived").stdout.split()
        assert out == [f"{os.getuid()}:{os.getgid()}", "65534:65534"]
    finally:
        vicd.docker("rm", "-f", name, check=False)


def test_cp_paused_container(vicd: Vicd, tmp_path: Path):
    name = _name("cppause")
    vicd.docker("run", "-d", "--name", name, "busybox", "sh", "-c",
                "while true; do date +%s%N > /tmp/tick; sleep 0.1; done")
    try:
        vicd.docker("exec", name, "sh", "-c", "while [ ! -s /tmp/tick ]; do sleep 0.1; done")
        vicd.docker("pause", name)
        (tmp_path / "in").write_text("while paused\n")
        vicd.docker("cp", str(tmp_path / "in"), f"{name}:/tmp/")
        def tick() -> str:
            # The file's content: the tar's own headers carry access times,
            # which the first copy changes.
            r = subprocess.run([DOCKER, "cp", f"{name}:/tmp/tick", "-"], capture_output=True,
                               env={**os.environ, "DOCKER_HOST": vicd.host}, check=True)
            with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tf:
                return tf.extractfile("tick").read().decode()  # type: ignore[union-attr]

        before = tick()
        time.sleep(1)
        assert tick() == before  # the processes did not run meanwhile
        assert vicd.inspect(name)["State"]["Status"] == "paused"
        vicd.docker("unpause", name)
        assert vicd.docker("exec", name, "cat", "/tmp/in").stdout == "while paused\n"
    finally:
        vicd.docker("rm", "-f", name, check=False)


def test_cp_into_bind_mount_reaches_the_host(vicd: Vicd, tmp_path: Path):
    host = tmp_path / "bound"
    host.mkdir()
    name = _name("cpbind")
    vicd.docker("create", "--name", name, "-v", f"{host}:/b", "busybox", "ls", "/b")
    try:
        (tmp_path / "f").write_text("via cp\n")
        vicd.docker("cp", str(tmp_path / "f"), f"{name}:/b/")  # stopped: a held VM
        assert (host / "f").read_text() == "via cp\n"
        assert vicd.docker("start", "-a", name).stdout == "f\n"
    finally:
        vicd.docker("rm", "-f", name, check=False)
