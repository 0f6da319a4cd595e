"""The reference daemon: Debian's dockerd 20.10, started in a temp dir for comparisons.

Test modules use it with ``from refdockerd import dockerd  # noqa: F401``. The class
``RefDockerd`` has no pytest dependency beyond this module's import, so
``benchmarks/bench.py`` reuses it.

dockerd here runs with ``--iptables=false --bridge=none``: there is no default bridge, so every
container must be created with ``--network none`` (``RefDockerd.NET`` is those two arguments).
``RefDockerd(netns=NAME)`` instead runs it with its real networking (default bridge, iptables,
userland proxy) inside the existing network namespace ``NAME`` (``benchmarks/bench_network.py``),
so its bridges and rules never touch the host's own interfaces.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vicd.testing import stop_process, wait_for_ping

DOCKERD = shutil.which("dockerd") or "/usr/sbin/dockerd"
DOCKER_CLI = "/usr/local/bin/docker"


def dockerd_available() -> bool:
    return os.access(DOCKERD, os.X_OK) and os.access(DOCKER_CLI, os.X_OK) and os.geteuid() == 0


class RefDockerd:
    """One dockerd with its data, exec root, socket and pid file in a short /tmp dir."""

    NET = ("--network", "none")

    def __init__(self, base: Path | None = None, netns: str | None = None) -> None:
        # AF_UNIX paths are limited to 108 bytes and containerd puts sockets under exec-root.
        self.dir = base or Path(tempfile.mkdtemp(prefix="rd", dir="/tmp"))
        self.netns = netns
        self.sock = self.dir / "docker.sock"
        self.log = self.dir / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"

    def start(self, timeout: float = 60) -> None:
        d = self.dir
        cmd = [DOCKERD, "--host", self.host, "--data-root", str(d / "data"),
               "--exec-root", str(d / "exec"), "--pidfile", str(d / "pid")]
        if self.netns:
            # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup mounts
            # dockerd needs ("Devices cgroup isn't mounted"); nsenter changes only the netns.
            cmd = ["nsenter", f"--net=/run/netns/{self.netns}", *cmd]
        else:
            cmd += ["--iptables=false", "--bridge=none"]
        logf = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, start_new_session=True)
        try:
            wait_for_ping(self.proc, self.sock, self.log, "dockerd", timeout)
        except RuntimeError:
            self.stop()
            raise

    def docker(self, *args: str, input: bytes | None = None, check: bool = True,
               timeout: float = 180, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "DOCKER_HOST": self.host, **(env or {})}
        full_env.pop("DOCKER_API_VERSION", None)
        full_env.pop("DOCKER_CONTEXT", None)
        r = subprocess.run([DOCKER_CLI, *args], input=input, capture_output=True,
                           timeout=timeout, env=full_env)
        out = subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"),
                                          r.stderr.decode(errors="replace"))
        if check and r.returncode != 0:
            raise AssertionError(f"[dockerd] docker {' '.join(args)} -> {r.returncode}\n"
                                 f"{out.stdout}\n{out.stderr}")
        return out

    def stop(self) -> None:
        """Stop dockerd (it stops its containers and its managed containerd) and remove the dir."""
        stop_process(self.proc, 30)
        # Leftover containerd/shims in dockerd's session (normally none after a clean stop).
        if self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        # overlay2 / shm mounts left behind would make rmtree fail: unmount lazily, deepest first.
        prefix = str(self.dir) + "/"
        try:
            table = Path("/proc/self/mounts").read_text().splitlines()
            mounts = [line.split()[1] for line in table]
        except OSError:
            mounts = []
        for m in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def dockerd(busybox_tar: Path) -> Iterator[RefDockerd]:
    """The reference dockerd for the session, with the busybox rootfs imported as busybox:latest."""
    if not dockerd_available():
        pytest.skip(f"reference dockerd not available ({DOCKERD}, {DOCKER_CLI}, root)")
    d = RefDockerd()
    try:
        d.start()
        d.docker("import", str(busybox_tar), "busybox:latest")
    except Exception:
        d.stop()
        raise
    yield d
    d.stop()
