"""The network namespace vicd owns: bridges of user-defined networks, VM taps.

Nothing touches the host's own interfaces: every bridge and tap lives in
one namespace per data root (``vicd-<digest>``). QEMU stays in the host's
namespace (slirp's published ports must bind there), so a tap is opened by
a thread that entered the namespace and handed to QEMU as a file
descriptor; it disappears with the QEMU process that holds it.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from vicd.errors import VicdError

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
NETNS_DIR = Path("/run/netns")

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


class NetNSError(VicdError):
    """The namespace or one of its links could not be set up."""


class NetNS:
    def __init__(self, name: str) -> None:
        self.name = name
        self.path = NETNS_DIR / name
        self._lock = threading.Lock()

    @staticmethod
    def usable() -> bool:
        """Root (CAP_NET_ADMIN) and iproute2: else no user-defined networks."""
        return os.geteuid() == 0 and os.path.exists("/dev/net/tun") and _has_ip()

    def ensure(self) -> None:
        with self._lock:
            if self.path.exists():
                return
            self._host_ip("netns", "add", self.name)
            self.ip("link", "set", "lo", "up")
            log.info("network namespace %s created", self.name)

    def remove(self) -> None:
        with self._lock:
            if self.path.exists():
                self._host_ip("netns", "delete", self.name)

    def ip(self, *args: str, check: bool = True) -> str:
        """``ip -n NS ARGS``: iproute2 inside the namespace."""
        return self._host_ip("-n", self.name, *args, check=check)

    @staticmethod
    def _host_ip(*args: str, check: bool = True) -> str:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        if check and proc.returncode != 0:
            raise NetNSError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def run_inside(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` on a thread that entered the namespace (setns is per thread)."""
        result: list[T] = []
        error: list[BaseException] = []

        def target() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise NetNSError(f"setns {self.name}: {os.strerror(err)}")
                finally:
                    os.close(fd)
                result.append(fn())
            except BaseException as e:  # handed to the caller's thread
                error.append(e)

        t = threading.Thread(target=target, name=f"netns-{self.name}")
        t.start()
        t.join()
        if error:
            raise error[0]
        return result[0]

    def open_tap(self, name: str) -> int:
        """A new tap ``name`` in the namespace; the caller owns the fd (inheritable)."""

        def make() -> int:
            fd = os.open("/dev/net/tun", os.O_RDWR)
            try:
                ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
                fcntl.ioctl(fd, TUNSETIFF, ifr)
            except OSError as e:
                os.close(fd)
                raise NetNSError(f"tap {name}: {e.strerror}") from None
            os.set_inheritable(fd, True)
            return fd

        return self.run_inside(make)

    def udp_socket(self, address: str, port: int) -> socket.socket:
        """A UDP socket bound to ``address:port`` inside the namespace."""

        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((address, port))
            except OSError:
                s.close()
                raise
            s.setblocking(False)
            return s

        return self.run_inside(make)


def _has_ip() -> bool:
    return any(os.access(os.path.join(d, "ip"), os.X_OK)
               for d in os.environ.get("PATH", "/usr/sbin:/sbin").split(os.pathsep)
               + ["/usr/sbin", "/sbin", "/bin"])


def root_digest(data_root: Path) -> str:
    """A short stable name for a data root (socket folder, namespace)."""
    return hashlib.sha256(str(data_root.resolve()).encode()).hexdigest()[:12]


def namespace_for(data_root: Path) -> NetNS:
    return NetNS(f"vicd-{root_digest(data_root)}")


def tap_name(container_id: str, slot: int) -> str:
    return f"t{container_id[:10]}.{slot}"  # IFNAMSIZ: at most 15 characters


def plug_tap(ns: NetNS, container_id: str, nic: dict[str, Any]) -> None:
    """Put a VM's slot tap on the bridge its NIC's network backing names."""
    backing = nic.get("backing") or {}
    if backing.get("kind") != "linux-bridge":
        raise NetNSError(f"the microvm backend cannot plug a NIC backed by {backing!r}")
    ns.ip("link", "set", tap_name(container_id, nic["slot"]), "master", backing["bridge"], "up")


def unplug_tap(ns: NetNS, container_id: str, slot: int) -> None:
    ns.ip("link", "set", tap_name(container_id, slot), "nomaster", "down", check=False)
