"""Host folders and files in container VMs (-v /host:/ctr), through virtio-9p."""

from __future__ import annotations

import os
import re
from pathlib import Path

from conftest import Vicd


def test_bind_directory_and_file(vicd: Vicd, tmp_path: Path):
    src = tmp_path / "shared"
    src.mkdir()
    (src / "owned").write_text("from-host\n")
    os.chown(src / "owned", 1234, 5678)
    single = tmp_path / "conf.txt"
    single.write_text("single-file\n")
    r = vicd.docker(
        "run", "--rm", "-v", f"{src}:/h", "-v", f"{single}:/etc/app.conf:ro", "busybox", "sh",
        "-c", "stat -c '%u:%g' /h/owned; cat /h/owned /etc/app.conf; "
              "echo from-vm > /h/new; chown 42 /h/new; "
              "echo x 2>/dev/null > /etc/app.conf || echo read-only")
    assert r.stdout.splitlines() == ["1234:5678", "from-host", "single-file", "read-only"]
    assert (src / "new").read_text() == "from-vm\n"
    assert (src / "new").stat().st_uid == 42
    assert single.read_text() == "single-file\n"
    # nothing of the host share is left mounted once the VM is gone
    assert str(vicd.data_root) not in Path("/proc/self/mounts").read_text()


def test_bind_read_only_directory_is_enforced_on_the_host(vicd: Vicd, tmp_path: Path):
    src = tmp_path / "ro"
    src.mkdir()
    r = vicd.docker("run", "--rm", "-v", f"{src}:/ro:ro", "busybox", "sh", "-c",
                    "mount -o remount,rw /ro 2>/dev/null; touch /ro/x 2>&1 || true")
    assert "Read-only file system" in r.stdout
    assert not (src / "x").exists()


def test_bind_sources(vicd: Vicd, tmp_path: Path):
    missing = tmp_path / "made-by-v"
    vicd.docker("run", "--rm", "-v", f"{missing}:/m", "busybox", "true")
    assert missing.is_dir()  # -v creates a missing host folder, as dockerd does
    r = vicd.docker("run", "--rm", "--mount", f"type=bind,source={tmp_path}/nope,target=/m",
                    "busybox", "true", check=False)
    assert r.returncode == 125 and "bind source path does not exist" in r.stderr
    vicd.docker("create", "--name", "bound", "-v", f"{tmp_path}:/data:ro", "busybox", "true")
    (m,) = vicd.inspect("bound")["Mounts"]
    assert m["Type"] == "bind" and m["Source"] == str(tmp_path) and m["RW"] is False
    vicd.docker("rm", "bound")


def _start_path(vicd: Vicd, cid: str) -> str:
    m = re.search(rf"container {cid[:12]}: VM pid \d+ (.+?) in \d+ ms", vicd.log.read_text())
    assert m, "no start line in the daemon log"
    return m.group(1)


def test_bind_mounts_keep_template_fast_start(vicd: Vicd, tmp_path: Path):
    # Two clones of one template, each with its own folder at the same slot.
    ids = []
    for name in ("a", "b"):
        src = tmp_path / name
        src.mkdir()
        (src / "who").write_text(f"{name}\n")
        ids.append(vicd.docker("run", "-d", "-v", f"{src}:/h", "-v", f"{src / 'who'}:/who:ro",
                               "busybox", "cat", "/h/who", "/who").stdout.strip())
    for cid, name in zip(ids, ("a", "b"), strict=True):
        vicd.docker("wait", cid)
        assert vicd.docker("logs", cid).stdout == f"{name}\n{name}\n"
        assert _start_path(vicd, cid) == "restored from template with 2 host folder(s) over 9p"
        vicd.docker("rm", cid)


def test_more_binds_than_template_slots_cold_boot(vicd: Vicd, tmp_path: Path):
    args = []
    for i in range(5):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "n").write_text(str(i))
        args += ["-v", f"{tmp_path / str(i)}:/d{i}"]
    cid = vicd.docker("run", "-d", *args, "busybox", "sh", "-c", "cat /d*/n").stdout.strip()
    vicd.docker("wait", cid)
    assert vicd.docker("logs", cid).stdout == "01234"
    assert _start_path(vicd, cid) == "booted with 5 host folder(s) over 9p"
    vicd.docker("rm", cid)
