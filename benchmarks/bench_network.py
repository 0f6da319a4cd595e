#!/usr/bin/env python3
"""Networking: HTTP through a published port and between containers by name, on vicd and on
the reference dockerd 20.10 with its real bridge networking, side by side, interleaved in one run.

Every server is busybox ``httpd -f -p 80 -h /www`` in a container, serving ``/www/small``
(612 bytes, nginx's index page size) and ``/www/big`` (B MiB from /dev/zero, 64 by default).
On each daemon, before the first round (untimed):

* ``docker run -d --name web -p 127.0.0.1:PORT:80 busybox sh -c 'SERVE'`` (default network);
* ``docker network create benchnet``, then ``docker run -d --name server --network benchnet``
  with the same server, and ``docker run -d --name client --network benchnet busybox sleep``.

Each round, on each daemon (the daemons take turns, the order reversing every round):

* ``ab -n N -c 1`` and ``ab -n N -c 8`` on ``http://127.0.0.1:PORT/small`` from the host
  (apache2-utils): requests/s; then ``ab -n F -c 1`` on ``/big``: MiB/s (F x B MiB over ab's
  "Time taken for tests"). A failed or non-2xx request is an error, not a number. Around each
  small-file run, the CPU time of what serves the port is read (vicd: the VM's QEMU process;
  dockerd: the container's cgroup v1 cpuacct plus its docker-proxy processes): CPU per
  request, which the machine's load changes much less than a rate;
* ``docker exec client time -f %e sh -c '<F x wget -q -O /dev/null http://server/big>'``:
  MiB/s over the loop's time measured inside the container (busybox ``time``, 10 ms
  resolution: a loop shorter than 1 s is run again with proportionally more wgets, so a fast
  daemon's count is higher; the footnote gives the counts);
* the same with M wgets of ``http://server/small``: requests/s, one after the other, each a
  new busybox wget process that resolves ``server`` through the daemon's embedded DNS again
  (what a shell script in a container does).

Where the clients run:

* vicd: ``ab`` on the host; the published port is QEMU's slirp host forward on the host's
  127.0.0.1. Containers on ``benchnet`` are VMs with a NIC slot's tap on a Linux bridge in
  vicd's own network namespace (docs/networking.md).
* dockerd: ``ip netns add rdnet-<pid>`` and ``ip -n rdnet-<pid> link set lo up``, then
  ``nsenter --net=/run/netns/rdnet-<pid> dockerd --host unix:///tmp/rdXXX/docker.sock
  --data-root ... --exec-root ... --pidfile ...`` with its defaults: the ``docker0`` bridge,
  ``--iptables=true`` (its NAT/filter rules go into that namespace's own tables) and the
  userland proxy (``nsenter``, not ``ip netns exec``: that remounts /sys and hides the cgroup
  mounts dockerd needs). ``ab`` runs as ``ip netns exec rdnet-<pid> ab ...``, so it reaches
  127.0.0.1:PORT of dockerd's namespace. For a loopback destination dockerd's OUTPUT rule
  (``! -d 127.0.0.0/8 ... -j DOCKER``) does not DNAT, so this traffic goes through
  ``docker-proxy``, as for any host client of ``-p 127.0.0.1:...`` on dockerd 20.10 with its
  defaults; ``benchnet`` is a bridge with veths, and the name lookup is dockerd's 127.0.0.11
  resolver. Nothing changes on the host's own interfaces or iptables; stopping dockerd and
  ``ip netns del`` remove its bridges, veths and rules.

At the end (also on an error, Ctrl-C or SIGTERM) the containers, networks and daemons (with
vicd's QEMU processes and dockerd's namespace) are removed.

    .venv/bin/python benchmarks/bench_network.py [--quick] [-n ROUNDS] [--requests N]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from common import (
    BUSYBOX_TIME_RE,
    DOCKER_CLI,
    Daemon,
    DockerdDaemon,
    Row,
    VicdDaemon,
    add_shared_args,
    build_guest,
    busybox_rootfs,
    interleave,
    print_table,
    reference_missing,
    running,
    workdir,
    write_json,
)

NETWORK = "benchnet"
SMALL_BYTES = 612
MIN_LOOP_S = 1.0
AB_RE = {k: re.compile(rb"^" + k.encode() + rb":\s+([0-9.]+)", re.M)
         for k in ("Complete requests", "Failed requests", "Non-2xx responses",
                   "Requests per second", "Time taken for tests")}


def serve_script(big_mb: int) -> str:
    """The server container's command: make the two files, then busybox httpd as PID 1."""
    return (f"mkdir -p /www && head -c {SMALL_BYTES} /dev/zero | tr '\\0' x > /www/small"
            f" && dd if=/dev/zero of=/www/big bs=1M count={big_mb} 2>/dev/null"
            " && exec httpd -f -p 80 -h /www")


def ab(d: Daemon, url: str, n: int, c: int) -> dict[str, float]:
    """``ab -n N -c C URL`` where a host client of d runs: its summary numbers."""
    r = subprocess.run(d.on_host("ab", "-q", "-n", str(n), "-c", str(c), url),
                       capture_output=True, timeout=900)
    out = {k: float(m[1]) for k, rx in AB_RE.items() if (m := rx.search(r.stdout))}
    if (r.returncode != 0 or out.get("Complete requests") != n or out.get("Failed requests")
            or out.get("Non-2xx responses")):
        raise RuntimeError(f"[{d.name}] ab -n {n} -c {c} {url} -> {r.returncode}: "
                           f"{(r.stdout + r.stderr).decode(errors='replace')}")
    return out


def answers(d: Daemon, url: str) -> bool:
    try:
        ab(d, url, 1, 1)
    except RuntimeError:
        return False
    return True


def wgets_per_s(d: Daemon, url: str, times: int) -> tuple[float, int]:
    """(per second, count) of ``wget -q -O /dev/null URL`` one after the other in the client
    container, timed inside it (busybox time, 10 ms resolution): a loop under MIN_LOOP_S is
    run again with more wgets, so the rate is good to ~1%."""
    while True:
        loop = (f"i=0; while [ $i -lt {times} ]; do wget -q -O /dev/null {url} || exit 1; "
                "i=$((i+1)); done")
        r = d.docker("exec", "client", "time", "-f", "%e", "sh", "-c", loop, timeout=900)
        m = BUSYBOX_TIME_RE.search(r.stderr)
        if not m:
            raise RuntimeError(f"[{d.name}] no time line in {r.stderr!r}")
        t = float(m[1])
        if t >= MIN_LOOP_S:
            return times / t, times
        times = math.ceil(times * 1.2 * MIN_LOOP_S / max(t, 0.01))


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, all its threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(ppid: int, comm: str) -> list[int]:
    """The pids of PPID's children named COMM."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):  # gone meanwhile
            head, _, rest = stat.read_text().rpartition(")")
            if head.endswith(f"({comm}") and int(rest.split()[1]) == ppid:
                out.append(int(stat.parent.name))
    return out


def cpu_reader(d: Daemon, container: str) -> Callable[[], float] | None:
    """Cumulative CPU seconds of what serves CONTAINER's published port, read before and after
    a run (the machine's load does not change it, unlike a rate): vicd: the VM's QEMU process
    (guest, virtio, slirp); dockerd: the container's cgroup (cgroup v1 cpuacct, every httpd
    child) plus dockerd's docker-proxy processes. None where it cannot be read."""
    if isinstance(d, VicdDaemon):
        cid = d.docker("inspect", "-f", "{{.Id}}", container).stdout.decode().strip()
        pid = next(p for k, p in d.qemu_pids().items() if cid.startswith(k))
        return lambda: proc_cpu_s(pid)
    if not isinstance(d, DockerdDaemon) or not d.ref.proc:
        return None
    pid = d.docker("inspect", "-f", "{{.State.Pid}}", container).stdout.decode().strip()
    lines = [x.split(":", 2) for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
    usage = [Path(f"/sys/fs/cgroup/cpuacct{path}/cpuacct.usage")
             for _, ctrl, path in lines if "cpuacct" in ctrl.split(",")]
    if not usage or not usage[0].exists():
        return None
    proxies = children(d.ref.proc.pid, "docker-proxy")
    return lambda: int(usage[0].read_text()) / 1e9 + sum(proc_cpu_s(p) for p in proxies)


def wait_until(what: str, ok: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.5)


def set_up(d: Daemon, port: int, big_mb: int) -> None:
    """The three containers and the network (untimed); returns when both servers answer."""
    serve = serve_script(big_mb)
    d.docker("run", "-d", "--name", "web", "-p", f"127.0.0.1:{port}:80", *d.net, "busybox",
             "sh", "-c", serve)
    d.docker("network", "create", NETWORK)
    d.docker("run", "-d", "--name", "server", "--network", NETWORK, "busybox", "sh", "-c", serve)
    d.docker("run", "-d", "--name", "client", "--network", NETWORK, "busybox", "sleep", "1000000")
    # httpd starts after both files are made: /small answering means /big is there too.
    wait_until(f"[{d.name}] web", lambda: answers(d, f"http://127.0.0.1:{port}/small"))
    wait_until(f"[{d.name}] server", lambda: d.docker(
        "exec", "client", "wget", "-q", "-O", "/dev/null", "http://server/small",
        check=False).returncode == 0)


def clean_up(d: Daemon) -> None:
    d.docker("rm", "-f", "web", "server", "client", check=False)
    d.docker("network", "rm", NETWORK, check=False)


def round_(d: Daemon, a: argparse.Namespace, port: int,
           cpu: Callable[[], float] | None) -> dict[str, float]:
    base = f"http://127.0.0.1:{port}"
    out: dict[str, float] = {}
    for c in (1, 8):
        before = cpu() if cpu else 0
        out[f"ab c{c}"] = ab(d, f"{base}/small", a.requests, c)["Requests per second"]
        if cpu:
            out[f"cpu c{c}"] = (cpu() - before) / a.requests * 1000  # ms
    t = ab(d, f"{base}/big", a.fetches, 1)["Time taken for tests"]
    out["ab big"] = a.fetches * a.big_mb / max(t, 0.001)
    rate, out["c2c big count"] = wgets_per_s(d, "http://server/big", a.fetches)
    out["c2c big"] = rate * a.big_mb
    out["c2c small"], out["c2c small count"] = wgets_per_s(d, "http://server/small", a.wgets)
    return out


def free_port() -> int:
    """A port free on the host's loopback (dockerd's namespace has a loopback of its own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--rounds", type=int, help="rounds per daemon (3; --quick: 1)")
    ap.add_argument("--requests", type=int, help="ab requests per concurrency (500; quick: 200)")
    ap.add_argument("--big-mb", type=int, default=64, help="MiB of the large file (64)")
    ap.add_argument("--fetches", type=int, help="large-file fetches per round (2; quick: 1)")
    ap.add_argument("--wgets", type=int, help="small-file wgets between containers (100; "
                    "quick: 50)")
    ap.add_argument("--quick", action="store_true", help="small counts, one round (~1-2 min)")
    add_shared_args(ap)
    a = ap.parse_args()
    for key, full, quick in (("rounds", 3, 1), ("requests", 500, 200), ("fetches", 2, 1),
                             ("wgets", 100, 50)):
        if getattr(a, key) is None:
            setattr(a, key, quick if a.quick else full)
    if reference_missing():
        return 2

    build_guest()
    port = free_port()
    with workdir("vn") as work:
        vicd = VicdDaemon(work / "v", a.vicd_arg)
        daemons: list[Daemon] = [vicd, DockerdDaemon(bridged=True)]
        rootfs = busybox_rootfs(work / "busybox.tar")
        with running(daemons):
            try:
                cpu = {}
                for d in daemons:
                    d.docker("import", str(rootfs), "busybox:latest")
                    set_up(d, port, a.big_mb)
                    cpu[d.name] = cpu_reader(d, "web")
                print(f"network: {a.rounds} round(s) ...", file=sys.stderr)
                samples = interleave(daemons, a.rounds,
                                     lambda d, i: round_(d, a, port, cpu[d.name]))
            finally:
                for d in daemons:
                    clean_up(d)
            accel = vicd.accelerator()

    names = [d.name for d in daemons]
    rows: list[Row] = []
    for key, label, unit in (
            ("ab c1", f"published port, ab -c 1, {SMALL_BYTES} B", "req/s"),
            ("ab c8", f"published port, ab -c 8, {SMALL_BYTES} B", "req/s"),
            ("cpu c1", "  server-side CPU per request (ab -c 1)", "ms"),
            ("cpu c8", "  server-side CPU per request (ab -c 8)", "ms"),
            ("ab big", f"published port, ab, {a.big_mb} MiB file", "MiB/s"),
            ("c2c big", f"container to container, wget {a.big_mb} MiB", "MiB/s"),
            ("c2c small", f"container to container, wget {SMALL_BYTES} B", "req/s")):
        per = {n: [s[key] for s in samples[n]] for n in names if key in samples[n][0]}
        for stat, fn in (("median", statistics.median), ("min", min), ("max", max)):
            if stat != "median" and (a.rounds < 3 or key.startswith("cpu")):
                continue
            rows.append((f"{label}, {stat}", {n: fn(v) for n, v in per.items()},
                         lambda x, u=unit: f"{x:.3g} {u}" if x < 100 else f"{x:.0f} {u}"))
    print_table(rows, names, [("vicd/dockerd", "vicd", "dockerd")])
    counts = "; ".join(f"{n}: {max(s['c2c big count'] for s in samples[n]):.0f} x large, "
                       f"{max(s['c2c small count'] for s in samples[n]):.0f} x small"
                       for n in names)
    print(f"\n(stock docker CLI {DOCKER_CLI}; n={a.rounds}; ab -n {a.requests} on the small "
          f"file, -n {a.fetches} on the large one; wgets in the client container, by name, per "
          f"loop ({counts}); vicd accelerator: {accel}; dockerd: bridge + iptables + "
          f"docker-proxy in netns "
          f"{daemons[1].netns}; load average at the end: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; a ratio above 1: vicd does more per "
          "second, or uses more CPU per request)")
    write_json(a, samples=samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
