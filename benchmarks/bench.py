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
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from refdockerd import DOCKER_CLI, RefDockerd, dockerd_available  # noqa: E402

GUEST_DIR = Path(os.environ.get("VICD_GUEST_DIR", REPO / ".cache" / "guest"))
NET = ("--network", "none")


def _http(sock: Path, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 request over a unix socket (for populating containers quickly)."""
    data = json.dumps(body).encode() if body is not None else b""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(60)
    s.connect(str(sock))
    head = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
    s.sendall(head.encode() + data)
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    s.close()
    raw = b"".join(chunks)
    status = int(raw.split(b" ", 2)[1])
    return status, raw.partition(b"\r\n\r\n")[2]


def _ping(sock: Path) -> bool:
    try:
        return _http(sock, "GET", "/_ping")[0] == 200
    except OSError:
        return False


class Daemon:
    """What the benchmark needs of either daemon."""

    name: str
    sock: Path

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "DOCKER_HOST": self.host}
        env.pop("DOCKER_API_VERSION", None)
        env.pop("DOCKER_CONTEXT", None)
        r = subprocess.run([DOCKER_CLI, *args], capture_output=True, env=env, timeout=300)
        if check and r.returncode != 0:
            raise RuntimeError(f"[{self.name}] docker {' '.join(args)} -> {r.returncode}: "
                               f"{r.stderr.decode(errors='replace')}")
        return r

    def timed(self, *args: str) -> float:
        t0 = time.perf_counter()
        self.docker(*args)
        return time.perf_counter() - t0


class VicdDaemon(Daemon):
    name = "vicd"

    def __init__(self, base: Path, extra: list[str]) -> None:
        self.base = base
        self.extra = extra
        self.sock = base / "d.sock"
        self.data_root = base / "data"
        self.log = base / "vicd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "vicd.cli", "serve", "--host", self.host,
               "--data-root", str(self.data_root), "--guest-dir", str(GUEST_DIR), *self.extra]
        logf = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, start_new_session=True,
                                     cwd=REPO)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vicd exited: {self.log.read_text()[-3000:]}")
            if _ping(self.sock):
                return
            time.sleep(0.1)
        raise RuntimeError(f"vicd did not answer: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # vicd's VMs outlive the daemon by design: kill every QEMU it started.
        for pidfile in self.data_root.glob("microvm/vms/*/qemu.pid"):
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        shutil.rmtree(self.base, ignore_errors=True)


class DockerdDaemon(Daemon):
    name = "dockerd"

    def __init__(self) -> None:
        self.ref = RefDockerd()
        self.sock = self.ref.sock

    def start(self) -> None:
        self.ref.start()

    def stop(self) -> None:
        self.ref.stop()


# --- measurements ------------------------------------------------------------------------------


def interleave(daemons: list[Daemon], rounds: int, fn: Callable[[Daemon, int], float]
               ) -> dict[str, list[float]]:
    """fn(daemon, i) for i in range(rounds), daemons taking turns, order alternating."""
    out: dict[str, list[float]] = {d.name: [] for d in daemons}
    for i in range(rounds):
        order = daemons if i % 2 == 0 else daemons[::-1]
        for d in order:
            out[d.name].append(fn(d, i))
    return out


def populate(d: Daemon, total: int) -> None:
    """Bring the number of containers to ``total`` through the API (fast, not measured)."""
    have = len(d.docker("ps", "-aq").stdout.split())
    for i in range(have, total):
        body = {"Image": "busybox", "Cmd": ["true"], "HostConfig": {"NetworkMode": "none"}}
        q = urllib.parse.urlencode({"name": f"bench-fill-{i}"})
        status, resp = _http(d.sock, "POST", f"/containers/create?{q}", body)
        if status != 201:
            raise RuntimeError(f"[{d.name}] create -> {status}: {resp[:300]!r}")


def fmt_s(x: float) -> str:
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--runs", type=int, help="docker run --rm rounds per daemon (10)")
    ap.add_argument("-m", "--creates", type=int, help="docker create calls per daemon (50)")
    ap.add_argument("-c", "--count", type=int, help="containers present for ps -a (200)")
    ap.add_argument("-p", "--ps-runs", type=int, help="docker ps -a rounds per daemon (10)")
    ap.add_argument("--quick", action="store_true", help="n=3, m=20, p=5 (count stays 200)")
    ap.add_argument("--vicd-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for 'vicd serve' (repeatable), e.g. --no-templates")
    ap.add_argument("--json", metavar="FILE", help="also write the raw samples here")
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
    if not dockerd_available():
        print("reference dockerd or /usr/local/bin/docker missing (or not root)", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)

    subprocess.run(["bash", str(REPO / "contrib/guest/build.sh"), str(GUEST_DIR)], check=True)
    work = Path(tempfile.mkdtemp(prefix="vb", dir="/tmp"))  # short: AF_UNIX path limit
    vicd = VicdDaemon(work / "v", a.vicd_arg)
    vicd.base.mkdir()
    dockerd = DockerdDaemon()
    daemons: list[Daemon] = [vicd, dockerd]
    try:
        rootfs = work / "busybox.tar"
        subprocess.run(["bash", str(REPO / "contrib/guest/mkrootfs-busybox.sh"), str(rootfs)],
                       check=True, capture_output=True)
        first: dict[str, float] = {}
        for d in daemons:
            d.start()
            d.docker("import", str(rootfs), "busybox:latest")
            # The first run on a fresh daemon is reported apart: vicd builds its per-shape VM
            # template snapshot then, dockerd sets up the image's overlay snapshot.
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
    finally:
        for d in daemons:
            try:
                d.stop()
            except Exception as e:  # noqa: BLE001
                print(f"stopping {d.name}: {e}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)

    rows: list[tuple[str, float, float, Callable[[float], str]]] = [
        ("run --rm busybox true, first on a fresh daemon", first["vicd"], first["dockerd"],
         fmt_s)]
    for stat, f in (("median", statistics.median), ("min", min), ("max", max)):
        rows.append((f"run --rm busybox true, {stat}", f(run["vicd"]), f(run["dockerd"]),
                     fmt_s))
    rate = {k: len(v) / sum(v) for k, v in create.items()}
    rows.append((f"create rate ({a.creates} creates)", rate["vicd"], rate["dockerd"],
                 lambda x: f"{x:.1f} /s"))
    rows.append(("create latency, median", statistics.median(create["vicd"]),
                 statistics.median(create["dockerd"]), fmt_s))
    for stat, f in (("median", statistics.median), ("min", min), ("max", max)):
        rows.append((f"ps -a with {a.count} containers, {stat}", f(ps["vicd"]),
                     f(ps["dockerd"]), fmt_s))

    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'vicd':>10}  {'dockerd':>10}  {'vicd/dockerd':>12}")
    print("-" * (w + 40))
    for label, v, d, show in rows:
        print(f"{label:<{w}}  {show(v):>10}  {show(d):>10}  {v / d:>11.2f}x")
    print(f"\n(stock docker CLI {DOCKER_CLI}; times include the CLI's own start-up; "
          f"n={a.runs}, m={a.creates}, ps rounds={a.ps_runs})")
    if a.json:
        Path(a.json).write_text(json.dumps({"first": first, "run": run, "create": create, "ps": ps,
                                            "args": vars(a)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
