#!/usr/bin/env python3
"""docker cp: a folder of S (100) MiB copied into and out of a container, running and stopped,
on vicd and on the reference dockerd 20.10, side by side, interleaved in one run.

The host folder (made once in a temp dir): S files of 1 MiB from os.urandom, ten small text
files, a subfolder two levels deep and a symlink. Each round, on each daemon, two fresh
containers (untimed): ``docker run -d busybox sleep 3600`` (running) and ``docker run busybox
true`` (stopped: created, started, exited on its own). On vicd a stopped container's copy boots a
short-lived held VM of it (docs/tether.md, "Archives"). Then, timed, in this order:

* running: ``docker cp c:/etc/hostname -`` (one small file: the fixed cost of a copy), then
  ``docker cp HOSTDIR c:/dst``, then ``docker cp c:/dst OUTDIR/...``;
* stopped: the same.

Each copy-out is checked against the host folder (entries and bytes), and a ``sync`` runs untimed
before each copy so one copy's dirty pages do not slow the next. The containers and the copied
folders are removed after each round, so every copy is into a fresh place. The daemons take turns,
the order reversing every round.

    .venv/bin/python benchmarks/bench_cp.py [--quick] [-n N] [--size-mb S]
"""

from __future__ import annotations

import os
import shutil
import stat
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (
    DOCKER_CLI,
    Daemon,
    Row,
    fmt_mb,
    fmt_s,
    interleave,
    parse_with_rounds,
    print_table,
    stat_rows,
    vicd_and_dockerd,
    write_json,
)

STATES = ("running", "stopped")
OPS = ("in", "out")


def make_folder(root: Path, size_mb: int) -> Path:
    """The folder copied: size_mb x 1 MiB of random bytes, small files, a subfolder, a link."""
    root.mkdir()
    for i in range(size_mb):
        (root / f"blob-{i:03d}.bin").write_bytes(os.urandom(1 << 20))
    deeper = root / "small" / "deeper"
    deeper.mkdir(parents=True)
    for i in range(10):
        (root / "small" / f"note-{i}.txt").write_text(f"note {i}\n" * (i + 1))
    (deeper / "readme.txt").write_text("two levels down\n")
    (root / "latest").symlink_to("blob-000.bin")
    return root


def tree(root: Path) -> tuple[int, int]:
    """(entries, bytes of the regular files) below root, links not followed."""
    entries = size = 0
    for dirpath, dirs, files in os.walk(root):
        entries += len(dirs) + len(files)
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            size += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return entries, size


def timed_cp(d: Daemon, src: str, dst: str) -> float:
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    d.docker("cp", src, dst, timeout=1800)
    return time.perf_counter() - t0


def round_(d: Daemon, i: int, src: Path, out: Path, want: tuple[int, int]) -> dict[str, float]:
    """Fresh containers, then in and out of each: {"STATE small|in|out": seconds}."""
    names = {"running": f"cp-run-{i}", "stopped": f"cp-stop-{i}"}
    d.docker("run", "-d", *d.net, "--name", names["running"], "busybox", "sleep", "3600")
    d.docker("run", *d.net, "--name", names["stopped"], "busybox", "true")
    res: dict[str, float] = {}
    try:
        for state in STATES:
            c = names[state]
            res[f"{state} small"] = timed_cp(d, f"{c}:/etc/hostname", "-")
            res[f"{state} in"] = timed_cp(d, str(src), f"{c}:/dst")
            dest = out / f"{d.name}-{i}-{state}"
            res[f"{state} out"] = timed_cp(d, f"{c}:/dst", str(dest))
            got = tree(dest)
            if got != want:
                raise RuntimeError(f"[{d.name}] {state}: copied back {got}, want {want} "
                                   f"(entries, bytes)")
            shutil.rmtree(dest)
    finally:
        d.docker("rm", "-f", *names.values(), check=False)
    return res


def main() -> int:
    a = parse_with_rounds(__doc__, quick=2, full=5, size_mb=(100, "MiB in the folder copied"))
    with vicd_and_dockerd("vcp", a.vicd_arg) as (work, vicd, daemons):
        src = make_folder(work / "src", a.size_mb)
        want = tree(src)
        (work / "out").mkdir()
        print(f"docker cp {fmt_mb(want[1])} in and out: {a.rounds} round(s) ...",
              file=sys.stderr)
        samples = interleave(daemons, a.rounds, lambda d, i: round_(d, i, src, work / "out", want))
        accel = vicd.accelerator()

    names = [d.name for d in daemons]
    mib = want[1] / 2**20
    rows: list[Row] = []
    for state in STATES:
        rows += stat_rows(f"{state}: cp c:/etc/hostname - (one small file)",
                          {n: [s[f"{state} small"] for s in samples[n]] for n in names}, fmt_s,
                          ("median",))
        for op in OPS:
            key = f"{state} {op}"
            label = (f"{state}: cp HOSTDIR c:/dst" if op == "in"
                     else f"{state}: cp c:/dst OUTDIR")
            per = {n: [s[key] for s in samples[n]] for n in names}
            rows += stat_rows(label, per, fmt_s)
            rows.append((f"{label}, MiB/s at the median",
                         {n: mib / statistics.median(v) for n, v in per.items()},
                         lambda x: f"{x:.3g} MiB/s" if x < 100 else f"{x:.0f} MiB/s"))
    print_table(rows, names, [("vicd/dockerd", "vicd", "dockerd")])
    print(f"\n(stock docker CLI {DOCKER_CLI}; n={a.rounds}; folder of {mib:.1f} MiB in {want[0]} "
          f"entries;\n times include the CLI's start-up; stopped = `run busybox true`, exited; "
          f"vicd accelerator: {accel}; dockerd: --network none)")
    write_json(a, samples=samples, folder={"entries": want[0], "bytes": want[1]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
