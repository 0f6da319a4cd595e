"""QEMU microvm command lines, host facts, and the QEMU process itself."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QEMU = "qemu-system-x86_64"

# Measured in ../shared/specs/microvm-notes.md: these save ~0.3-0.7 s of boot.
BASE_CMDLINE = (
    "console=ttyS0 quiet panic=-1 reboot=t cryptomgr.notests mitigations=off "
    "8250.nr_uarts=1 i8042.noaux i8042.nokbd"
)


@dataclass
class VMFiles:
    """Where one VM keeps its sockets, logs and disk.

    AF_UNIX paths are limited to 107 bytes, and a data root can be deep: with
    ``run_dir`` the two sockets live there instead (a short folder per data
    root under /run), named after the VM folder.
    """

    dir: Path
    run_dir: Path | None = None

    def _sock(self, kind: str) -> Path:
        if self.run_dir is None:
            return self.dir / f"{kind}.sock"
        return self.run_dir / f"{self.dir.name}.{kind}"

    @property
    def ctl(self) -> Path:
        return self._sock("ctl")

    @property
    def qmp(self) -> Path:
        return self._sock("qmp")

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def root_disk(self) -> Path:
        return self.dir / "root.qcow2"


@functools.cache
def host_tsc_khz() -> int | None:
    """The host TSC rate; microvm under TCG hangs ~1 boot in 20 without it."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)
    return int(float(m.group(1)) * 1000) if m else None


@functools.cache
def qemu_version() -> str:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.split("\n")[0].strip()


def build_cmdline(
    *,
    files: VMFiles,
    kernel: Path,
    initrd: Path,
    accel: str,
    memory_mb: int,
    cpus: int,
    disks: list[tuple[Path, str, bool]],
    mem_path: Path | None = None,
    mem_shared: bool = False,
    nic: dict[str, Any] | None = None,
    taps: list[int] | None = None,
    exports: list[tuple[str, Path, bool]] | None = None,
) -> list[str]:
    """The QEMU argv. ``disks`` are (path, format, read_only), the root first (vda).

    With ``mem_path`` the guest RAM is that file: shared while a template is
    built (so the snapshot can leave RAM out), private copy-on-write in a
    clone restored from it. Everything else must be identical between a
    template and its clones: the device layout is part of the snapshot.
    """
    append = BASE_CMDLINE
    if accel == "tcg":
        khz = host_tsc_khz()
        if khz:
            append += f" tsc_early_khz={khz}"
    machine = "microvm,pit=off,pic=off,isa-serial=on,rtc=on"
    memory: list[str] = []
    if mem_path is not None:
        machine += ",memory-backend=mem"
        share = "on" if mem_shared else "off"
        memory = ["-object", f"memory-backend-file,id=mem,size={memory_mb}M,"
                  f"mem-path={mem_path},share={share}"]
    argv = [
        QEMU,
        "-M", machine,
        *memory,
        "-accel", accel,
        "-cpu", "host" if accel == "kvm" else "max",
        "-m", str(memory_mb),
        "-smp", str(cpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", append,
        "-serial", f"file:{files.console}",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=ctl,path={files.ctl},server=on,wait=off",
        "-device", "virtserialport,chardev=ctl,name=vicd.0",
        "-qmp", f"unix:{files.qmp},server=on,wait=off",
        # Host entropy for the guest RNG: clones of one template must not
        # share their random state.
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-device,rng=rng0",
        # docker update --memory of a running container: the balloon takes
        # memory back from the guest (and gives it again, up to the boot size).
        "-device", "virtio-balloon-device,id=balloon0",
        "-pidfile", str(files.pidfile),
    ]
    argv += netdev_args(nic)
    argv += tap_args(taps or [])
    for i, (path, fmt, ro) in enumerate(disks):
        drive = f"id=d{i},file={path},format={fmt},if=none,cache=unsafe"
        if ro:
            drive += ",readonly=on"
        argv += ["-drive", drive, "-device", f"virtio-blk-device,drive=d{i}"]
    return argv + ninep_args(exports or [])


def netdev_args(nic: dict[str, Any] | None) -> list[str]:
    """eth0: always present (templates need a fixed device layout), on slirp.

    Published ports become slirp host forwards; ``none`` restricts the
    netdev so nothing leaves the VM (the guest also keeps eth0 down).
    """
    netdev = "user,id=net0,net=10.0.2.0/24"
    mac = "02:42:00:00:00:01"
    if nic is not None:
        mac = nic.get("mac") or mac
        if nic.get("network") == "none":
            netdev += ",restrict=on"
        for p in nic.get("ports") or []:
            netdev += (f",hostfwd={p['proto']}:{p['host_ip']}:{p['host_port']}"
                       f"-:{p['container_port']}")
    return ["-netdev", netdev, "-device", f"virtio-net-device,netdev=net0,mac={mac}"]


def slot_mac(slot: int) -> str:
    """The MAC a NIC slot's device boots with: the tether finds the slot by it
    (and then gives the NIC the endpoint's own MAC)."""
    return f"02:42:00:00:01:{slot:02x}"


def tap_args(taps: list[int]) -> list[str]:
    """NIC slots eth1..: taps (open fds) the daemon plugs into network bridges.

    Always all of them, connected or not: microvm cannot hot-add a NIC, and
    the template's device layout must match its clones'.
    """
    argv: list[str] = []
    for i, fd in enumerate(taps, start=1):
        argv += ["-netdev", f"tap,id=net{i},fd={fd},vhost=off",
                 "-device", f"virtio-net-device,netdev=net{i},mac={slot_mac(i)}"]
    return argv


def ninep_args(exports: list[tuple[str, Path, bool]]) -> list[str]:
    """One virtio-9p device per (mount tag, host folder, read-only).

    passthrough: QEMU (root) creates files with the guest's owners and modes,
    so the host sees what dockerd would leave there; multidevs=remap keeps
    inode numbers unique when the folder spans several filesystems (-v /:/h).
    Only the device and its tag are part of a snapshot; the folder is given
    anew at each restore.
    """
    argv = []
    for i, (tag, path, ro) in enumerate(exports):
        fsdev = (f"local,id=fs{i},path={str(path).replace(',', ',,')},"
                 "security_model=passthrough,multidevs=remap")
        if ro:
            fsdev += ",readonly=on"
        argv += ["-fsdev", fsdev, "-device", f"virtio-9p-device,fsdev=fs{i},mount_tag={tag}"]
    return argv


class QemuProcess:
    """A QEMU process we started or found again after a restart; watched via a pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            self._fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._fd = None
            self._done()
            return
        asyncio.get_running_loop().add_reader(self._fd, self._done)

    @classmethod
    def spawn(cls, argv: list[str], files: VMFiles, pass_fds: tuple[int, ...] = ()) -> QemuProcess:
        with open(files.qemu_log, "ab") as logf:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,  # the VM outlives the daemon
                close_fds=True,
                pass_fds=pass_fds,
            )
        return cls(proc.pid)

    def _done(self) -> None:
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        # Reap it if it is our child; after a daemon restart it is not.
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(self.pid, os.WNOHANG)
        if not self.exited.done():
            self.exited.set_result(None)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    async def wait(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout)
            return True
        except TimeoutError:
            return False


def live_qemu_pid(files: VMFiles) -> int | None:
    """The pid in the VM's pidfile if that process is still our QEMU for this VM."""
    try:
        pid = int(files.pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if str(files.ctl).encode() in cmdline else None
