"""What the benchmarks share: the daemons (vicd, the reference dockerd), interleaved rounds,
the result table, set-up (guest build, busybox rootfs) and clean-up, per-process memory.

Used by ``bench.py``, ``bench_faststart.py``, ``bench_pull.py``, ``bench_storage.py``,
``bench_network.py`` and ``bench_cp.py`` (run as scripts: this directory is on ``sys.path``
then).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from refdockerd import DOCKER_CLI, RefDockerd, dockerd_available  # noqa: E402
from vicd.testing import kill_vms, qemu_pids, stop_process, wait_for_ping  # noqa: E402

__all__ = ["BUSYBOX_TIME_RE", "DOCKER_CLI", "GUEST_DIR", "NET", "REPO", "Daemon", "DockerdDaemon",
           "VicdDaemon",
           "add_shared_args", "busybox_rootfs", "build_guest", "dockerd_available", "fmt_mb",
           "fmt_s", "http_unix", "parse_with_rounds", "reference_missing",
           "interleave", "print_table", "Row", "running", "smaps_rollup", "stat_rows",
           "vicd_and_dockerd", "workdir", "write_json"]

GUEST_DIR = Path(os.environ.get("VICD_GUEST_DIR", REPO / ".cache" / "guest"))
NET = ("--network", "none")
# busybox's `time -f %e CMD` prints CMD's elapsed seconds (10 ms resolution) on a line of its
# own on stderr: how a benchmark times a command inside a container.
BUSYBOX_TIME_RE = re.compile(rb"^([0-9]+\.[0-9]+)$", re.M)


def http_unix(sock: Path, method: str, path: str, body: dict | None = None
              ) -> tuple[int, bytes]:
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


# --- the daemons -------------------------------------------------------------------------------


class Daemon:
    """What the benchmarks need of either daemon."""

    name: str
    sock: Path
    # What `run`/`create` need on this daemon (the reference dockerd has no bridge).
    net: tuple[str, ...] = ()
    # The network namespace its published ports listen in (None: the host's own).
    netns: str | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def docker(self, *args: str, check: bool = True, timeout: float = 300
               ) -> subprocess.CompletedProcess[bytes]:
        """The stock docker CLI against this daemon."""
        env = {**os.environ, "DOCKER_HOST": self.host}
        env.pop("DOCKER_API_VERSION", None)
        env.pop("DOCKER_CONTEXT", None)
        r = subprocess.run([DOCKER_CLI, *args], capture_output=True, env=env, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"[{self.name}] docker {' '.join(args)} -> {r.returncode}: "
                               f"{r.stderr.decode(errors='replace')}")
        return r

    def timed(self, *args: str) -> float:
        t0 = time.perf_counter()
        self.docker(*args)
        return time.perf_counter() - t0

    def on_host(self, *cmd: str) -> list[str]:
        """cmd as a host client of this daemon runs it: in the daemon's network namespace."""
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else list(cmd)


class VicdDaemon(Daemon):
    """A vicd of our own in ``base`` (removed at stop, with every QEMU it started)."""

    def __init__(self, base: Path, extra: Sequence[str] = (), name: str = "vicd",
                 net: tuple[str, ...] = ()) -> None:
        self.name = name
        self.base = base
        self.extra = list(extra)
        self.net = net
        self.sock = base / "d.sock"
        self.data_root = base / "data"
        self.log = base / "vicd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "vicd.cli", "serve", "--host", self.host,
               "--data-root", str(self.data_root), "--guest-dir", str(GUEST_DIR), *self.extra]
        logf = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, start_new_session=True,
                                     cwd=REPO)
        wait_for_ping(self.proc, self.sock, self.log, self.name)

    def accelerator(self) -> str:
        """The accelerator vicd chose (kvm, tcg), from its log; '?' if not logged yet."""
        m = re.search(r"accelerator (\w+)", self.log.read_text(errors="replace"))
        return m[1] if m else "?"

    def qemu_pids(self) -> dict[str, int]:
        """VM directory name (a container id prefix) -> QEMU pid, from the pid files."""
        return qemu_pids(self.data_root)

    def stop(self) -> None:
        stop_process(self.proc, 30)
        kill_vms(self.data_root)  # vicd's VMs outlive the daemon by design
        shutil.rmtree(self.base, ignore_errors=True)


class DockerdDaemon(Daemon):
    """The reference dockerd 20.10 (``tests/refdockerd.py``): no bridge, ``--network none``.

    ``bridged=True``: dockerd with its real networking (default bridge, iptables, docker-proxy)
    in a network namespace of its own, ``rdnet-<pid>``, made at start and removed at stop, so
    nothing changes on the host's interfaces; ``on_host`` runs a client there.
    """

    name = "dockerd"

    def __init__(self, bridged: bool = False) -> None:
        self.netns = f"rdnet-{os.getpid()}" if bridged else None
        self.net = () if bridged else NET
        self.ref = RefDockerd(netns=self.netns)
        self.sock = self.ref.sock

    def start(self) -> None:
        if self.netns:
            subprocess.run(["ip", "netns", "add", self.netns], check=True)
            subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
        self.ref.start()

    def stop(self) -> None:
        self.ref.stop()
        if self.netns:  # its bridges, veths and iptables rules go with it
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


# --- set-up and clean-up -----------------------------------------------------------------------


def add_shared_args(ap: argparse.ArgumentParser,
                    vicd_help: str = "extra argument for 'vicd serve' (repeatable)") -> None:
    """The options every benchmark takes: extra vicd flags and a raw-samples file."""
    ap.add_argument("--vicd-arg", action="append", default=[], metavar="ARG", help=vicd_help)
    ap.add_argument("--json", metavar="FILE", help="also write the raw samples here")


def parse_with_rounds(doc: str, quick: int, full: int, size_mb: tuple[int, str]
                      ) -> argparse.Namespace:
    """The command line of a script whose docstring is doc: ``-n/--rounds`` (full, or quick
    with ``--quick``), ``--size-mb`` (default and help from size_mb) and the shared options.

    Exits with status 2 when the reference dockerd cannot run here.
    """
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=size_mb[0], help=f"{size_mb[1]} ({size_mb[0]})")
    ap.add_argument("-n", "--rounds", type=int, help=f"rounds per daemon ({full})")
    ap.add_argument("--quick", action="store_true", help=f"n={quick}")
    add_shared_args(ap)
    a = ap.parse_args()
    if a.rounds is None:
        a.rounds = quick if a.quick else full
    if reference_missing():
        sys.exit(2)
    return a


def write_json(a: argparse.Namespace, **samples: object) -> None:
    """The raw samples and the options to ``--json FILE`` (``add_shared_args``), if asked for."""
    if a.json:
        Path(a.json).write_text(json.dumps({**samples, "args": vars(a)}, indent=1))


def reference_missing() -> bool:
    """True (after saying why) when the reference dockerd cannot run here."""
    if dockerd_available():
        return False
    print("reference dockerd or /usr/local/bin/docker missing (or not root)", file=sys.stderr)
    return True


def build_guest() -> None:
    """The guest kernel + tether (a no-op when up to date)."""
    subprocess.run(["bash", str(REPO / "contrib/guest/build.sh"), str(GUEST_DIR)], check=True)


def busybox_rootfs(dest: Path) -> Path:
    subprocess.run(["bash", str(REPO / "contrib/guest/mkrootfs-busybox.sh"), str(dest)],
                   check=True, capture_output=True)
    return dest


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A short temp dir (AF_UNIX path limit) removed at the end."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def running(daemons: Sequence[Daemon]) -> Iterator[None]:
    """Start the daemons; stop every one at the end, also on an error, Ctrl-C or SIGTERM."""

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        for d in daemons:
            d.start()
        yield
    finally:
        for d in daemons:
            try:
                d.stop()
            except Exception as e:  # noqa: BLE001
                print(f"stopping {d.name}: {e}", file=sys.stderr)
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def vicd_and_dockerd(prefix: str, vicd_args: Sequence[str]
                     ) -> Iterator[tuple[Path, VicdDaemon, list[Daemon]]]:
    """(work dir, vicd, [vicd, dockerd]): the guest built, a work dir, a vicd in it and the
    reference dockerd running (``running``), each with busybox:latest imported and run once
    untimed (vicd builds its VM template for the shape then)."""
    build_guest()
    with workdir(prefix) as work:
        vicd = VicdDaemon(work / "v", vicd_args)
        daemons: list[Daemon] = [vicd, DockerdDaemon()]
        rootfs = busybox_rootfs(work / "busybox.tar")
        with running(daemons):
            for d in daemons:
                d.docker("import", str(rootfs), "busybox:latest")
                d.docker("run", "--rm", *d.net, "busybox", "true")
            yield work, vicd, daemons


# --- measuring and reporting -------------------------------------------------------------------


T = TypeVar("T")


def interleave(daemons: Sequence[Daemon], rounds: int, fn: Callable[[Daemon, int], T]
               ) -> dict[str, list[T]]:
    """fn(daemon, i) for i in range(rounds), daemons taking turns, order reversed every round."""
    out: dict[str, list[T]] = {d.name: [] for d in daemons}
    for i in range(rounds):
        order = list(daemons) if i % 2 == 0 else list(daemons)[::-1]
        for d in order:
            out[d.name].append(fn(d, i))
    return out


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup as {field: kB} (Rss, Pss, ...); {} if the process is gone."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return out
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[-1] == "kB":
            out[key.strip()] = int(parts[0])
    return out


def fmt_s(x: float) -> str:
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def fmt_mb(x: float) -> str:
    """x in bytes."""
    return f"{x / 2**20:.1f} MiB"


Row = tuple[str, dict[str, float], Callable[[float], str]]


def stat_rows(label: str, samples: dict[str, list[float]], show: Callable[[float], str],
              stats: Sequence[str] = ("median", "min", "max")) -> list[Row]:
    """A row per statistic ("LABEL, median", ...) of each daemon's samples."""
    fns: dict[str, Callable[[list[float]], float]] = {
        "median": statistics.median, "min": min, "max": max}
    return [(f"{label}, {s}", {k: fns[s](v) for k, v in samples.items() if v}, show)
            for s in stats]


def print_table(rows: Sequence[Row], names: Sequence[str],
                ratios: Sequence[tuple[str, str, str]]) -> None:
    """One line per row: a column per daemon, then each ratio (header, numerator, denominator).

    A value missing from a row shows as '-', and so do the ratios that need it.
    """
    w = max(len(r[0]) for r in rows)
    cw = max(10, *(len(n) for n in names))
    rw = max(12, *(len(h) for h, _, _ in ratios))
    print(f"{'measure':<{w}}" + "".join(f"  {n:>{cw}}" for n in names)
          + "".join(f"  {h:>{rw}}" for h, _, _ in ratios))
    print("-" * (w + (cw + 2) * len(names) + (rw + 2) * len(ratios)))
    for label, values, show in rows:
        line = f"{label:<{w}}"
        line += "".join(f"  {show(values[n]) if n in values else '-':>{cw}}" for n in names)
        for _, a, b in ratios:
            ok = a in values and b in values and values[b] != 0
            line += f"  {f'{values[a] / values[b]:.2f}x' if ok else '-':>{rw}}"
        print(line)
