"""Fast start: containers restored from template snapshots (and the cold path)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from conftest import Vicd, new_vicd


def _log(d: Vicd) -> str:
    return d.log.read_text()


def _restored(d: Vicd, cid: str) -> bool:
    return re.search(rf"container {cid[:12]}: VM pid \d+ restored from template", _log(d)) \
        is not None


def test_second_run_is_restored_and_clones_are_not_twins(fresh_vicd: Vicd):
    d = fresh_vicd
    probe = "cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1"
    a = d.docker("run", "-d", "busybox", "sh", "-c", probe).stdout.strip()
    b = d.docker("run", "-d", "busybox", "sh", "-c", probe).stdout.strip()
    d.docker("wait", a)
    d.docker("wait", b)
    assert _restored(d, a) and _restored(d, b)
    assert _log(d).count(" built in ") == 1
    out_a, out_b = d.docker("logs", a).stdout, d.docker("logs", b).stdout
    boot_a, rand_a = out_a.split("\n", 1)
    boot_b, rand_b = out_b.split("\n", 1)
    assert len(boot_a) == 36 and boot_a != boot_b
    assert rand_a.strip() and rand_a != rand_b
    # start of a stopped container takes the same path
    d.docker("start", "-a", a)
    assert len(re.findall(rf"container {a[:12]}: VM pid \d+ restored", _log(d))) == 2
    info = d.docker("info", "--format", "{{json .DriverStatus}}").stdout
    assert '["Templates","1 (' in info
    d.docker("rm", a, b)


def test_another_shape_builds_another_template(fresh_vicd: Vicd):
    d = fresh_vicd
    d.docker("run", "--rm", "busybox", "true")
    d.docker("run", "--rm", "-m", "300m", "busybox", "true")
    assert _log(d).count(" built in ") == 2
    out = subprocess.run([sys.executable, "-m", "vicd.cli", "templates", "ls", "--data-root",
                          str(d.data_root)], capture_output=True, text=True, check=True).stdout
    assert "300M" in out and "256M" in out
    subprocess.run([sys.executable, "-m", "vicd.cli", "templates", "prune", "--data-root",
                    str(d.data_root)], check=True, capture_output=True)
    assert not any((d.data_root / "microvm/templates").iterdir())
    d.docker("run", "--rm", "busybox", "true")  # rebuilt on demand
    assert _log(d).count(" built in ") == 3


def test_guest_change_rebuilds_template(guest_dir: Path, busybox_tar, tmp_path: Path):
    guest = tmp_path / "guest"
    shutil.copytree(guest_dir, guest, ignore=shutil.ignore_patterns("cache"))
    d = new_vicd(tmp_path)
    d.start("--guest-dir", str(guest))
    try:
        d.docker("import", str(busybox_tar), "busybox:latest")
        d.docker("run", "--rm", "busybox", "true")
        # A new guest build (another tether or kernel) changes the key.
        (guest / "build.json").write_text((guest / "build.json").read_text() + " ")
        d.docker("run", "--rm", "busybox", "true")
        assert _log(d).count(" built in ") == 2
    finally:
        d.stop()
        d.kill_vms()


def test_corrupt_template_falls_back_to_cold_boot(fresh_vicd: Vicd):
    d = fresh_vicd
    d.docker("run", "--rm", "busybox", "true")
    (state,) = (d.data_root / "microvm/templates").glob("*/state")
    state.write_bytes(b"garbage" * 100)
    r = d.docker("run", "--rm", "busybox", "echo", "still-runs")
    assert r.stdout == "still-runs\n"
    log = _log(d)
    assert "discarded: restore failed" in log and "cold boot after a failed restore" in log
    d.docker("run", "--rm", "busybox", "true")
    assert _log(d).count(" built in ") == 2


def test_concurrent_first_starts_build_one_template(fresh_vicd: Vicd):
    d = fresh_vicd
    results: list[str] = []

    def run() -> None:
        results.append(d.docker("run", "--rm", "busybox", "echo", "ok").stdout)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["ok\n"] * 3
    assert _log(d).count(" built in ") == 1
    assert _log(d).count("restored from template") == 3


def test_no_templates_cold_boots(guest_dir: Path, busybox_tar, tmp_path: Path):
    d = new_vicd(tmp_path)
    d.start("--no-templates")
    try:
        d.docker("import", str(busybox_tar), "busybox:latest")
        assert d.docker("run", "--rm", "busybox", "echo", "cold").stdout == "cold\n"
        assert "restored from template" not in _log(d)
        assert re.search(r"VM pid \d+ booted in", _log(d))
        assert '["Templates","off"]' in d.docker(
            "info", "--format", "{{json .DriverStatus}}").stdout
    finally:
        d.stop()
        d.kill_vms()
