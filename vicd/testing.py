"""Helpers shared by the tests and the benchmarks: start, probe and stop daemons.

They drive real processes (vicd, the reference dockerd, a registry) the
same way everywhere, so a fix to how a daemon is waited for lands once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def ping_unix(sock: Path) -> bool:
    """Whether a Docker-API daemon answers ``GET /_ping`` with 200 on ``sock``."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(str(sock))
            s.sendall(b"GET /_ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(100).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def wait_for_ping(proc: subprocess.Popen[bytes], sock: Path, log: Path, name: str,
                  timeout: float = 120) -> None:
    """Wait until the daemon answers; raise with its log's tail if it dies or never does."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: {log.read_text()[-3000:]}")
        if ping_unix(sock):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not answer: {log.read_text()[-3000:]}")


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL to its whole session if it does not end in time."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


def qemu_pids(data_root: Path) -> dict[str, int]:
    """VM directory name (a container id prefix) -> QEMU pid, from the microvm pid files."""
    out = {}
    for pidfile in data_root.glob("microvm/vms/*/qemu.pid"):
        with contextlib.suppress(OSError, ValueError):
            out[pidfile.parent.name] = int(pidfile.read_text().strip())
    return out


def kill_vms(data_root: Path) -> None:
    """Kill every QEMU a vicd started (VMs outlive their daemon by design)."""
    for pid in qemu_pids(data_root).values():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    # The daemon's network namespace (bridges, taps) outlives it like its VMs.
    from vicd.plugins.microvm.netns import NetNS, namespace_for

    if NetNS.usable():
        with contextlib.suppress(Exception):
            namespace_for(data_root).remove()


def tar_bytes(files: dict[str, bytes]) -> bytes:
    """A small tar archive (PAX, fixed mtime and mode) of name -> content."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()
