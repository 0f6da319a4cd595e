#!/usr/bin/env python3
"""Storage: sequential write and read of a 256 MiB file inside a busybox container, on vicd and
on the reference dockerd 20.10, side by side, interleaved in one run.

Two places for the file: a named local volume (``-v benchvol:/d``; on vicd an ext4 disk image
behind virtio-blk) and a host bind mount of a temp folder (``-v /tmp/...:/d``; on vicd shared
through virtio-9p). Each round, per place:

* write: ``docker run --rm -v SPEC busybox dd if=/dev/zero of=/d/f bs=1M count=S conv=fsync``;
* ``sync; echo 3 > /proc/sys/vm/drop_caches`` on the host;
* read, in a second container: ``dd if=/d/f of=/dev/null bs=1M``.

The rate is MiB over the time of the dd command alone, inside the container (busybox's ``time``
applet, 10 ms resolution: Debian's busybox dd prints no bytes/seconds line), so container start
is not in it; the whole ``docker run`` is timed too. The daemons take turns, the order reversing
every round. The volumes, the temp folders and the daemons (with vicd's QEMU processes) are
removed at the end.

    .venv/bin/python benchmarks/bench_storage.py [--quick] [-n N] [--size-mb S]
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (
    BUSYBOX_TIME_RE,
    DOCKER_CLI,
    Daemon,
    Row,
    fmt_s,
    interleave,
    parse_with_rounds,
    print_table,
    vicd_and_dockerd,
    write_json,
)

VOLUME = "benchvol"
# Debian's busybox dd prints only "N+0 records in/out", so busybox's `time` applet times it.
REC_RE = re.compile(rb"^(\d+)\+(\d+) records out$", re.M)
PLACES = ("volume", "bind")


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def dd(d: Daemon, spec: str, *args: str) -> tuple[float, float]:
    """One ``docker run --rm -v spec busybox time dd ... bs=1M``: (MiB/s of the dd inside the
    container, wall time of the whole run)."""
    t0 = time.perf_counter()
    r = d.docker("run", "--rm", *d.net, "-v", spec, "busybox", "time", "-f", "%e", "dd", *args)
    wall = time.perf_counter() - t0
    t, rec = BUSYBOX_TIME_RE.search(r.stderr), REC_RE.search(r.stderr)
    if not t or not rec or rec[2] != b"0":
        raise RuntimeError(f"[{d.name}] no dd/time summary in {r.stderr!r}")
    return int(rec[1]) / max(float(t[1]), 0.01), wall  # whole 1 MiB records


def round_(d: Daemon, specs: dict[str, str], size_mb: int) -> dict[str, float]:
    """Write then read in every place: {"PLACE write", "PLACE read"} MiB/s, and "... wall" s."""
    out: dict[str, float] = {}
    for place in PLACES:
        drop_caches()
        rate, wall = dd(d, specs[place], "if=/dev/zero", "of=/d/f", "bs=1M",
                        f"count={size_mb}", "conv=fsync")
        out[f"{place} write"], out[f"{place} write wall"] = rate, wall
        drop_caches()
        rate, wall = dd(d, specs[place], "if=/d/f", "of=/dev/null", "bs=1M")
        out[f"{place} read"], out[f"{place} read wall"] = rate, wall
    return out


def main() -> int:
    a = parse_with_rounds(__doc__, quick=1, full=3, size_mb=(256, "MiB written and read"))
    with vicd_and_dockerd("vs", a.vicd_arg) as (work, vicd, daemons):
        specs: dict[str, dict[str, str]] = {}
        for d in daemons:
            bind = work / f"bind-{d.name}"
            bind.mkdir()
            specs[d.name] = {"volume": f"{VOLUME}:/d", "bind": f"{bind}:/d"}
        try:
            for d in daemons:
                d.docker("volume", "create", VOLUME)
            print(f"dd {a.size_mb} MiB: {a.rounds} round(s) ...", file=sys.stderr)
            samples = interleave(daemons, a.rounds,
                                 lambda d, i: round_(d, specs[d.name], a.size_mb))
        finally:
            for d in daemons:
                d.docker("volume", "rm", "-f", VOLUME, check=False)
        accel = vicd.accelerator()

    names = [d.name for d in daemons]
    rows: list[Row] = []
    for place in PLACES:
        for op in ("write", "read"):
            key = f"{place} {op}"
            rows.append((f"{key} (dd), median", {n: statistics.median(s[key] for s in samples[n])
                                                 for n in names}, lambda x: f"{x:.0f} MiB/s"))
    for place in PLACES:
        for op in ("write", "read"):
            key = f"{place} {op} wall"
            rows.append((f"{place} {op}: whole docker run, median",
                         {n: statistics.median(s[key] for s in samples[n]) for n in names}, fmt_s))
    print_table(rows, names, [("vicd/dockerd", "vicd", "dockerd")])
    print(f"\n(stock docker CLI {DOCKER_CLI}; n={a.rounds}; {a.size_mb} MiB, bs=1M, write with "
          f"conv=fsync; host page cache dropped before each write and read; volume: "
          f"-v {VOLUME}:/d, bind: -v /tmp/...:/d; vicd accelerator: {accel}; "
          f"dockerd: --network none)")
    write_json(a, samples=samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
