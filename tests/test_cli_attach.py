"""Interactive use through a real pseudo-terminal: attach, exec -it, resize."""

from __future__ import annotations

import os
import pty
import select
import struct
import termios
import time
from fcntl import ioctl

from conftest import DOCKER, Vicd


class Term:
    """The docker CLI on a pty of its own, as a person at a terminal runs it."""

    def __init__(self, vicd: Vicd, *args: str, rows: int = 24, cols: int = 80) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            env = {**os.environ, "DOCKER_HOST": vicd.host, "TERM": "xterm"}
            os.execve(DOCKER, [DOCKER, *args], env)
        self.resize(rows, cols, signal_child=False)
        self.out = b""

    def resize(self, rows: int, cols: int, signal_child: bool = True) -> None:
        ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def read_until(self, needle: bytes, timeout: float = 60) -> bytes:
        deadline = time.time() + timeout
        while needle not in self.out and time.time() < deadline:
            r, _, _ = select.select([self.fd], [], [], 0.3)
            if r:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                self.out += chunk
        assert needle in self.out, self.out
        return self.out

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 60) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            r, _, _ = select.select([self.fd], [], [], 0.2)
            if r:
                try:
                    self.out += os.read(self.fd, 4096)
                except OSError:
                    pass
        raise AssertionError(f"docker did not exit: {self.out!r}")


def test_exec_it_shell_and_resize(vicd: Vicd):
    vicd.docker("run", "-d", "--name", "ti", "busybox", "sleep", "300")
    t = Term(vicd, "exec", "-it", "ti", "sh", rows=30, cols=100)
    t.read_until(b"# ")
    t.send(b"stty size\r")
    t.read_until(b"30 100")
    t.resize(40, 120)
    time.sleep(1)  # the CLI forwards SIGWINCH as a resize call
    t.send(b"stty size; exit 3\r")
    t.read_until(b"40 120")
    assert t.wait() == 3
    vicd.docker("rm", "-f", "ti")


def test_attach_and_detach_keys(vicd: Vicd):
    vicd.docker("run", "-d", "-it", "--name", "att", "busybox", "sh")
    t = Term(vicd, "attach", "att")
    time.sleep(1)
    t.send(b"echo attached-$((2+3))\r")
    t.read_until(b"attached-5")
    t.send(b"\x10\x11")  # ctrl-p ctrl-q: detach, the container keeps running
    t.read_until(b"read escape sequence")
    t.wait()
    assert vicd.inspect("att")["State"]["Running"] is True
    t = Term(vicd, "attach", "att")
    time.sleep(1)
    t.send(b"exit 9\r")
    assert t.wait() == 9
    assert vicd.inspect("att")["State"]["ExitCode"] == 9
    vicd.docker("rm", "att")


def test_run_it_resize_reaches_the_guest(vicd: Vicd):
    t = Term(vicd, "run", "-it", "--rm", "busybox", "sh", rows=33, cols=101)
    t.read_until(b"# ")
    t.send(b"stty size\r")
    t.read_until(b"33 101")
    t.send(b"exit\r")
    assert t.wait() == 0
