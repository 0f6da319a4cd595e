"""What the engine asks of a compute backend, and the VM spec it hands over.

The engine knows these types only; how a VM is made (QEMU, vSphere) lives
in the backend plugins.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vicd.errors import VicdError

# Output from a guest process: (stream, data) with stream 1 = stdout, 2 = stderr.
OutputSink = Callable[[int, bytes], None]


@dataclass
class ProcessSpec:
    args: list[str]
    env: list[str] = field(default_factory=list)
    cwd: str = "/"
    user: str = ""
    tty: bool = False
    stdin: bool = False
    rows: int = 0
    cols: int = 0


@dataclass
class DiskSpec:
    """An extra disk for the VM (volumes). ``target`` is where the guest mounts it."""

    path: Path
    target: str
    read_only: bool = False
    fmt: str = "raw"
    # A new volume: the guest copies the image's files at target into it first.
    copy_up: bool = False
    # The disk may be blank (made by the storage, not by vicd): the guest
    # makes its filesystem on first use.
    mkfs: bool = False


@dataclass
class BindSpec:
    """A host path shared into the VM (``-v /host:/ctr``)."""

    source: Path
    target: str
    read_only: bool = False


@dataclass
class VMSpec:
    container_id: str
    name: str
    image_id: str
    image_disk: Path
    hostname: str
    process: ProcessSpec
    memory_mb: int
    cpus: int
    # The CPU quota inside the guest (quota µs, period µs), vicd/cpus.py.
    cpu_max: tuple[int, int] | None = None
    disks: list[DiskSpec] = field(default_factory=list)
    binds: list[BindSpec] = field(default_factory=list)
    # tmpfs mounts: (target, options as --tmpfs takes them).
    tmpfs: list[tuple[str, str]] = field(default_factory=list)
    nics: list[dict[str, Any]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    # The container is removed when it exits (--rm): its disk need not be
    # flushed, so the backend may end the VM at once.
    ephemeral: bool = False
    # The container's stored record (Container.to_dict()): a backend that
    # keeps state outside the data root (vSphere extraConfig) saves it.
    record: dict[str, Any] = field(default_factory=dict)
    # /etc/hosts and /etc/resolv.conf as the guest must see them.
    hosts: str = ""
    resolv: str = ""
    # Mount the disks but start no process: a stopped container's files
    # for the archive ops (docker cp, export, diff, commit).
    hold: bool = False


@dataclass
class GuestStats:
    """Figures sampled inside the guest, raw, for the engine to turn into Docker's shape."""

    cpu_ns: int
    system_ns: int
    online_cpus: int
    mem_total: int
    mem_used: int
    mem_cache: int
    pids: int


class GuestProcess(Protocol):
    """A process in a VM: the container's main one or an exec."""

    pid: int

    def write_stdin(self, data: bytes) -> None: ...
    def close_stdin(self) -> None: ...
    async def signal(self, signum: int) -> None: ...
    async def resize(self, rows: int, cols: int) -> None: ...
    async def wait(self) -> int: ...


class VM(Protocol):
    """A running container VM as the engine sees it."""

    main: GuestProcess
    pid: int  # the host-side process (QEMU) id, for inspect's State.Pid

    async def exec(self, spec: ProcessSpec, sink: OutputSink) -> GuestProcess: ...
    async def ps(self) -> list[dict[str, Any]]: ...
    async def stats(self) -> GuestStats: ...
    async def pause(self) -> None: ...
    async def resume(self) -> None: ...

    # Files of the container (docker cp, export). Paths are resolved inside
    # the container's root, symlinks rooted there. GuestPathError if the
    # path is missing, not a directory (put) or read-only.
    async def stat_path(self, path: str) -> dict[str, Any]:
        """docker's ContainerPathStat: name, size, mode (Go FileMode), mtime, linkTarget."""
        ...

    async def get_archive(self, path: str, rebase: str | None = None,
                          excludes: list[str] | None = None, listing: bool = False,
                          only: list[str] | None = None, only_trees: list[str] | None = None,
                          ) -> tuple[dict[str, Any], AsyncIterator[bytes]]:
        """The stat and a tar stream of the path (docker's containerArchivePath).
        ``listing``: JSON lines {p, m, s, t, u, g, l} instead of a tar (diff);
        ``only``: just these container paths, directories not recursively, and
        all of ``only_trees`` (commit)."""
        ...

    async def freeze(self, frozen: bool) -> None:
        """Stop or continue the container's processes (commit --pause)."""
        ...

    async def put_archive(self, path: str, data: AsyncIterator[bytes],
                          no_overwrite_dir_non_dir: bool = False, chown_user: str = "") -> None:
        """Extract a tar stream into the directory at path; with ``chown_user``
        (a container user spec) every file becomes that user's (docker cp -a)."""
        ...
    async def connect_nic(self, nic: dict[str, Any]) -> None:
        """Plug a ``NicSpec`` (as a dict) into the running VM's slot ``nic["slot"]``
        and configure it in the guest (docker network connect)."""
        ...

    async def disconnect_nic(self, slot: int) -> None:
        """Unplug the NIC in ``slot`` and take it down in the guest."""
        ...

    async def kill(self) -> None:
        """End the VM at once (the process exit code becomes 137)."""
        ...

    async def wait(self) -> int:
        """Wait until the VM ended; returns the main process's exit code."""
        ...


class ComputeBackend(Protocol):
    name: str
    # How many NICs on driver networks a VM can have besides the built-in
    # egress NIC (microvm: fixed slots in the template's device layout).
    nic_slots: int

    async def setup(self) -> None:
        """Once at daemon start: probe accelerators, check the guest build."""
        ...

    def info(self) -> dict[str, Any]:
        """Facts for ``docker info``: kernel of the guest, accelerator, ..."""
        ...

    async def create(self, spec: VMSpec) -> None:
        """Make the container's disks (its copy-on-write root)."""
        ...

    async def start(self, spec: VMSpec, sink: OutputSink) -> VM:
        """Boot the VM and start its main process; output goes to ``sink``."""
        ...

    async def reattach(self, container_id: str, sink: OutputSink) -> VM | None:
        """After a daemon restart: the container's VM if it still runs, else None."""
        ...

    async def recover_containers(self) -> list[dict[str, Any]]:
        """Container records the backend keeps itself (vSphere: in each VM's
        extraConfig), for a daemon whose data root lost them. [] if none."""
        ...

    def disk_usage(self, container_id: str) -> int:
        """Bytes the container wrote to its own disk (``SizeRw``); 0 if unknown."""
        ...

    async def running_ids(self) -> set[str]:
        """Containers whose VMs run now (to reconcile records and reap orphans)."""
        ...

    async def destroy(self, container_id: str) -> None:
        """Kill an orphan VM that has no record."""
        ...

    async def remove(self, container_id: str) -> None:
        """Delete the container's disks and VM files."""
        ...




class StartError(VicdError):
    """The guest could not start the process; ``exit_code`` is 127/126/1 as runc gives."""

    status = 400

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class GuestPathError(VicdError):
    """A path in the container could not be used: ``kind`` is ``not_found``,
    ``not_dir`` (extraction point), ``read_only`` or ``other``."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind
