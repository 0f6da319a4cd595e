#!/usr/bin/env python3
"""Fast start: vicd with template snapshots, vicd --no-templates and the reference dockerd 20.10,
side by side, interleaved in one run.

Starts three daemons of its own: vicd (containers restored from the per-shape template
snapshot), vicd ``--no-templates`` (every VM cold-boots) and dockerd (runc; ``--network none``,
it has no bridge), imports the same busybox rootfs into each, then measures with the stock
docker CLI:

* ``docker run --rm busybox true`` and ``docker run --rm busybox echo hi``: N runs each,
  median/min/max;
* ``docker run --rm -v DIR:/d:ro busybox cat /d/hi``: a host bind mount (virtio-9p on vicd,
  restored from the template like any other start), N runs;
* ``docker run -d busybox sleep 600`` followed by the first ``docker exec c true``: from the
  start of the run command until the exec returns (N rounds);
* K containers at once: K × ``docker run -d busybox sleep 600`` in parallel, wall time until
  all K are running (B batches);
* the host memory those K idle containers hold, after a settle time: the sum of the PSS
  (/proc/PID/smaps_rollup) of vicd's QEMU processes; for dockerd the sum of the PSS of the
  containers' processes plus their containerd-shim-runc-v2 processes (and, on a row of its own,
  of the container processes alone).

The daemons take turns, the order reversing every round, so drift on the machine hits all
three. Everything started here is stopped and removed at the end, including vicd's QEMU
processes (they outlive the daemon by design).

    .venv/bin/python benchmarks/bench_faststart.py [--quick] [-n N] [-k K] [-b B]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import (
    DOCKER_CLI,
    NET,
    Daemon,
    DockerdDaemon,
    Row,
    VicdDaemon,
    add_shared_args,
    build_guest,
    busybox_rootfs,
    fmt_mb,
    fmt_s,
    interleave,
    print_table,
    reference_missing,
    running,
    smaps_rollup,
    stat_rows,
    workdir,
)

TPL, COLD, REF = "vicd-tpl", "vicd-cold", "dockerd"
RATIOS = [("tpl/dockerd", TPL, REF), ("cold/dockerd", COLD, REF), ("tpl/cold", TPL, COLD)]


def run_rm(d: Daemon, *cmd: str, opts: Sequence[str] = (), expect: bytes | None = None
           ) -> float:
    t0 = time.perf_counter()
    r = d.docker("run", "--rm", *d.net, *opts, "busybox", *cmd)
    dt = time.perf_counter() - t0
    if cmd[0] == "echo":
        expect = (" ".join(cmd[1:]) + "\n").encode()
    if expect is not None and r.stdout != expect:
        raise RuntimeError(f"[{d.name}] {cmd[0]} printed {r.stdout!r}")
    return dt


def run_then_exec(d: Daemon, i: int) -> float:
    """`run -d ... sleep 600`, then the first `exec c true`: the time until the exec returns."""
    name = f"bench-x-{i}"
    try:
        t0 = time.perf_counter()
        d.docker("run", "-d", "--name", name, *d.net, "busybox", "sleep", "600")
        d.docker("exec", name, "true")
        return time.perf_counter() - t0
    finally:
        d.docker("rm", "-f", name, check=False)


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


def host_memory(d: Daemon, ids: Sequence[str]) -> dict[str, float]:
    """Bytes of host memory the containers hold, summed over their processes: "pss" (split
    into "pss_anon" and "pss_file"), "rss"; for dockerd also "pss_proc": the container processes
    alone, without their shims."""
    def total(pids: set[int], field: str) -> float:
        return sum(smaps_rollup(p).get(field, 0) for p in pids) * 1024.0

    if isinstance(d, VicdDaemon):
        vms = d.qemu_pids()
        pids = {pid for vm, pid in vms.items() if any(c.startswith(vm) for c in ids)}
    else:
        out = d.docker("inspect", "-f", "{{.State.Pid}}", *ids).stdout.split()
        procs = {int(p) for p in out}
        shims = {_ppid(p) for p in procs}
        pids = procs | shims
    if len(pids) < len(ids):
        raise RuntimeError(f"[{d.name}] {len(pids)} processes for {len(ids)} containers")
    mem = {"pss": total(pids, "Pss"), "pss_anon": total(pids, "Pss_Anon"),
           "pss_file": total(pids, "Pss_File"), "rss": total(pids, "Rss")}
    if not isinstance(d, VicdDaemon):
        mem["pss_proc"] = total(procs, "Pss")
    return mem


def batch(d: Daemon, i: int, count: int, settle: float) -> tuple[float, dict[str, float]]:
    """``count`` × `run -d ... sleep 600` at once: the wall time until all are running, and
    the host memory they hold after ``settle`` seconds."""
    label = f"bench-batch={i}"
    run = ("run", "-d", "--label", label, *d.net, "busybox", "sleep", "600")
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(count) as ex:
            futures = [ex.submit(d.docker, *run) for _ in range(count)]
            ids = [f.result().stdout.decode().strip() for f in futures]
        deadline = time.time() + 120
        while True:
            up = d.docker("ps", "-q", "--filter", "status=running", "--filter", f"label={label}")
            if len(up.stdout.split()) >= count:
                break
            if time.time() > deadline:
                raise RuntimeError(f"[{d.name}] not all {count} containers are running")
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        time.sleep(settle)
        return wall, host_memory(d, ids)
    finally:
        left = d.docker("ps", "-aq", "--filter", f"label={label}", check=False).stdout.split()
        if left:
            d.docker("rm", "-f", *(x.decode() for x in left), check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--runs", type=int, help="rounds of each single-container measure (10)")
    ap.add_argument("-k", "--count", type=int, default=20, help="containers started at once (20)")
    ap.add_argument("-b", "--batches", type=int, help="rounds of the K-at-once start (3)")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds the K containers idle before their memory is read (5)")
    ap.add_argument("--quick", action="store_true", help="n=3, b=1")
    ap.add_argument("--vicd-network", default="default", choices=["default", "none"],
                    help="vicd's --network (default: its slirp NIC; dockerd always has none)")
    add_shared_args(ap, "extra argument for both 'vicd serve' (repeatable)")
    a = ap.parse_args()
    for k, quick, full in (("runs", 3, 10), ("batches", 1, 3)):
        if getattr(a, k) is None:
            setattr(a, k, quick if a.quick else full)
    if reference_missing():
        return 2

    build_guest()
    vnet = NET if a.vicd_network == "none" else ()
    with workdir("vf") as work:
        daemons: list[Daemon] = [
            VicdDaemon(work / "t", a.vicd_arg, name=TPL, net=vnet),
            VicdDaemon(work / "c", [*a.vicd_arg, "--no-templates"], name=COLD, net=vnet),
            DockerdDaemon(),
        ]
        rootfs = busybox_rootfs(work / "busybox.tar")
        with running(daemons):
            first: dict[str, float] = {}
            for d in daemons:
                d.docker("import", str(rootfs), "busybox:latest")
                # Reported apart: vicd builds the shape's template snapshot then (vicd-tpl),
                # dockerd sets up the image's overlay snapshot.
                first[d.name] = run_rm(d, "true")

            print(f"run --rm true / echo hi, run -d + exec: {a.runs} rounds ...", file=sys.stderr)
            true = interleave(daemons, a.runs, lambda d, i: run_rm(d, "true"))
            echo = interleave(daemons, a.runs, lambda d, i: run_rm(d, "echo", "hi"))
            bind = work / "bind"
            bind.mkdir()
            (bind / "hi").write_text("hi\n")
            binds = interleave(daemons, a.runs, lambda d, i: run_rm(
                d, "cat", "/d/hi", opts=("-v", f"{bind}:/d:ro"), expect=b"hi\n"))
            execs = interleave(daemons, a.runs, run_then_exec)

            print(f"{a.count} at once: {a.batches} batches ...", file=sys.stderr)
            batches = interleave(daemons, a.batches,
                                 lambda d, i: batch(d, i, a.count, a.settle))

    wall = {k: [w for w, _ in v] for k, v in batches.items()}
    mem = {k: [m for _, m in v] for k, v in batches.items()}

    def mem_median(field: str) -> dict[str, float]:
        return {k: statistics.median(m[field] for m in v) for k, v in mem.items()
                if field in v[0]}

    k = a.count
    rows: list[Row] = [("run --rm busybox true, first on a fresh daemon", first, fmt_s)]
    rows += stat_rows("run --rm busybox true", true, fmt_s)
    rows += stat_rows("run --rm busybox echo hi", echo, fmt_s)
    rows += stat_rows("run --rm -v DIR:/d:ro busybox cat /d/hi", binds, fmt_s)
    rows += stat_rows("run -d sleep + first exec true", execs, fmt_s)
    rows += stat_rows(f"{k} x run -d at once, all running",
                      wall, fmt_s, ("median", "min", "max") if a.batches > 1 else ("median",))
    pss = mem_median("pss")
    rows.append((f"{k} idle containers: PSS sum (see below)", pss, fmt_mb))
    rows.append((f"{k} idle containers: PSS per container", {n: v / k for n, v in pss.items()},
                 fmt_mb))
    rows.append((f"{k} idle containers: PSS sum, anonymous", mem_median("pss_anon"), fmt_mb))
    rows.append((f"{k} idle containers: PSS sum, file-backed", mem_median("pss_file"), fmt_mb))
    rows.append((f"{k} idle: dockerd container processes only, PSS", mem_median("pss_proc"),
                 fmt_mb))
    rows.append((f"{k} idle containers: RSS sum (shared counted each)", mem_median("rss"),
                 fmt_mb))
    print_table(rows, [TPL, COLD, REF], RATIOS)
    vn = "slirp NIC" if a.vicd_network == "default" else "--network none"
    print(f"\n(stock docker CLI {DOCKER_CLI}; times include the CLI's own start-up; n={a.runs}, "
          f"{a.batches} batch(es) of {k}, memory read {a.settle:g} s after all were running;\n"
          f" PSS: vicd = its QEMU processes (guest RAM, QEMU, slirp), dockerd = the containers' "
          f"processes + their containerd-shim-runc-v2;\n"
          f" vicd containers: {vn}; dockerd: --network none)")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "first": first, "run_true": true, "run_echo": echo, "run_exec": execs,
            "batch_wall": wall, "batch_memory": mem, "args": vars(a)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
