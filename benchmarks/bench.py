#!/usr/bin/env python3
"""vicd vs the reference dockerd 20.10, side by side, interleaved in one run.

Starts its own vicd (QEMU microVM per container) and its own dockerd (runc), imports the same
busybox rootfs into both as busybox:latest, then measures with the stock docker CLI:

* ``docker run --rm busybox true`` latency: N runs each, median/min/max
  (``--network none`` on both: this dockerd has no bridge);
* ``docker create`` rate: containers/s over M creates;
* ``docker ps -a`` latency with C containers present (created, never started).

The daemons take turns (the order alternates every round) so drift on the machine hits both.
Everything started here is stopped and removed at the end, including vicd's QEMU processes
(they outlive the daemon by design).

    .venv/bin/python benchmarks/bench.py [--quick] [-n N] [-m M] [-c C]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import urllib.parse
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
    fmt_s,
    http_unix,
    interleave,
    print_table,
    reference_missing,
    running,
    workdir,
)


def populate(d: Daemon, total: int) -> None:
    """Bring the number of containers to ``total`` through the API (fast, not measured)."""
    have = len(d.docker("ps", "-aq").stdout.split())
    for i in range(have, total):
        body = {"Image": "busybox", "Cmd": ["true"], "HostConfig": {"NetworkMode": "none"}}
        q = urllib.parse.urlencode({"name": f"bench-fill-{i}"})
        status, resp = http_unix(d.sock, "POST", f"/containers/create?{q}", body)
        if status != 201:
            raise RuntimeError(f"[{d.name}] create -> {status}: {resp[:300]!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--runs", type=int, help="docker run --rm rounds per daemon (10)")
    ap.add_argument("-m", "--creates", type=int, help="docker create calls per daemon (50)")
    ap.add_argument("-c", "--count", type=int, help="containers present for ps -a (200)")
    ap.add_argument("-p", "--ps-runs", type=int, help="docker ps -a rounds per daemon (10)")
    ap.add_argument("--quick", action="store_true", help="n=3, m=20, p=5 (count stays 200)")
    add_shared_args(ap, "extra argument for 'vicd serve' (repeatable), e.g. --no-templates")
    a = ap.parse_args()
    quick = {"runs": 3, "creates": 20, "ps_runs": 5}
    full = {"runs": 10, "creates": 50, "ps_runs": 10}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.count is None:
        a.count = 200
    if a.count < a.creates:
        ap.error("--count must be >= --creates")
    if reference_missing():
        return 2

    build_guest()
    with workdir("vb") as work:
        vicd = VicdDaemon(work / "v", a.vicd_arg)
        daemons: list[Daemon] = [vicd, DockerdDaemon()]
        rootfs = busybox_rootfs(work / "busybox.tar")
        with running(daemons):
            first: dict[str, float] = {}
            for d in daemons:
                d.docker("import", str(rootfs), "busybox:latest")
                # The first run on a fresh daemon is reported apart: vicd builds its per-shape
                # VM template snapshot then, dockerd sets up the image's overlay snapshot.
                first[d.name] = d.timed("run", "--rm", *NET, "busybox", "true")

            print(f"run --rm: {a.runs} rounds ...", file=sys.stderr)
            run = interleave(daemons, a.runs,
                             lambda d, i: d.timed("run", "--rm", *NET, "busybox", "true"))

            print(f"create: {a.creates} each ...", file=sys.stderr)
            create = interleave(daemons, a.creates, lambda d, i: d.timed(
                "create", *NET, "--name", f"bench-c-{i}", "busybox", "true"))

            print(f"populate to {a.count} containers ...", file=sys.stderr)
            for d in daemons:
                populate(d, a.count)
                n = len(d.docker("ps", "-aq").stdout.split())
                assert n == a.count, (d.name, n)
            ps = interleave(daemons, a.ps_runs, lambda d, i: d.timed("ps", "-a"))

    rows: list[Row] = [("run --rm busybox true, first on a fresh daemon", first, fmt_s)]
    for stat, f in (("median", statistics.median), ("min", min), ("max", max)):
        rows.append((f"run --rm busybox true, {stat}", {k: f(v) for k, v in run.items()},
                     fmt_s))
    rate = {k: len(v) / sum(v) for k, v in create.items()}
    rows.append((f"create rate ({a.creates} creates)", rate, lambda x: f"{x:.1f} /s"))
    rows.append(("create latency, median", {k: statistics.median(v) for k, v in create.items()},
                 fmt_s))
    for stat, f in (("median", statistics.median), ("min", min), ("max", max)):
        rows.append((f"ps -a with {a.count} containers, {stat}",
                     {k: f(v) for k, v in ps.items()}, fmt_s))
    print_table(rows, ["vicd", "dockerd"], [("vicd/dockerd", "vicd", "dockerd")])
    print(f"\n(stock docker CLI {DOCKER_CLI}; times include the CLI's own start-up; "
          f"n={a.runs}, m={a.creates}, ps rounds={a.ps_runs})")
    if a.json:
        Path(a.json).write_text(json.dumps({"first": first, "run": run, "create": create, "ps": ps,
                                            "args": vars(a)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
