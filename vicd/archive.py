"""A container's files: docker cp (stat, get, put) and export.

A running container's VM serves them (tether archive ops). A stopped one is
started for the request with ``hold``: the guest mounts its disks (root and
volumes) and runs no process; the VM is powered off afterwards. The
container's runtime lock is held meanwhile, so a ``docker start`` waits.
See docs/tether.md "Archives" for why a VM rather than reading the qcow2.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vicd import container as cs
from vicd.backend import VM, BindSpec, GuestPathError
from vicd.container import Container
from vicd.errors import Conflict, InvalidParameter, NotFound, VicdError

if TYPE_CHECKING:
    from vicd.engine import Engine

log = logging.getLogger(__name__)


class Forbidden(VicdError):
    status = 403


def _map_error(e: GuestPathError, path: str, ref: str) -> VicdError:
    if e.kind == "not_found":
        return NotFound(f"Could not find the file {path} in container {ref}")
    if e.kind == "not_dir":
        return InvalidParameter("extraction point is not a directory")
    if e.kind == "read_only":
        return Forbidden("mounted volume is marked read-only")
    return VicdError(e.message)


@contextlib.asynccontextmanager
async def container_vm(engine: Engine, c: Container) -> AsyncIterator[VM]:
    """The VM that serves the container's files: its own, or a held one."""
    rt = engine.rt(c)
    if c.state.status == cs.PAUSED and rt.vm is not None:
        # A paused VM's vCPUs are stopped and its tether cannot answer: run the
        # VM meanwhile; the container's processes stay stopped (engine.pause).
        vm = rt.vm
        await vm.resume()
        try:
            yield vm
        finally:
            if c.state.status == cs.PAUSED:
                await vm.pause()
        return
    if c.state.running and rt.vm is not None:
        yield rt.vm
        return
    if c.state.status == cs.REMOVING:
        raise Conflict(f"removal of container {c.id} is already in progress")
    async with rt.lock:
        if c.state.running and rt.vm is not None:  # started meanwhile
            yield rt.vm
            return
        vm = await _start_held(engine, c)
        try:
            yield vm
        finally:
            await vm.power_off()  # type: ignore[attr-defined]
            _release_volumes(engine, c)


def _release_volumes(engine: Engine, c: Container) -> None:
    for m in c.mounts:
        if m.get("Type", "volume") != "volume":
            continue
        with contextlib.suppress(VicdError):
            v = engine.volumes.get(m["Name"])
            engine.volumes.driver(v.driver).unmount(v.name, c.id)


async def _start_held(engine: Engine, c: Container) -> VM:
    if not getattr(engine.backend, "supports_hold", False):
        # Booting it would run the container's process: refuse instead.
        raise Conflict(f"Container {c.id} is not running: the {engine.backend.name} backend "
                       "serves a container's files only while it runs")
    spec = await engine._vm_spec(c)
    spec.hold = True
    spec.ephemeral = False
    spec.disks = engine._attach_volumes(c)
    # Bind mounts too, so a copy into a bound path reaches the host folder as it
    # does while the container runs.
    spec.binds = [BindSpec(Path(m["Source"]), m["Destination"], not m["RW"])
                  for m in c.mounts if m.get("Type") == "bind"]
    vm = await engine.backend.start(spec, lambda _s, _d: None)
    # A new volume was copied up by the held guest: a later start must not again.
    for m in c.mounts:
        if m.get("Type", "volume") != "volume" or not m["RW"]:
            continue
        with contextlib.suppress(VicdError):
            v = engine.volumes.get(m["Name"])
            if not v.initialized:
                v.initialized = True
                engine.volumes.save(v)
    return vm


def _need(vm: VM, op: str) -> None:
    if not hasattr(vm, op):
        raise VicdError("this backend's VMs do not serve container files (docker cp, export, "
                        "diff, commit)")


def check_path(path: str | None) -> str:
    if not path:
        raise InvalidParameter("Path cannot be empty")
    return path


async def stat(engine: Engine, ref: str, path: str) -> dict[str, Any]:
    c = engine.get(ref)
    async with container_vm(engine, c) as vm:
        _need(vm, "stat_path")
        try:
            return await vm.stat_path(path)
        except GuestPathError as e:
            raise _map_error(e, path, ref) from None


@contextlib.asynccontextmanager
async def get(engine: Engine, ref: str, path: str
              ) -> AsyncIterator[tuple[dict[str, Any], AsyncIterator[bytes]]]:
    """The stat and the tar stream; the VM stays up while the caller reads."""
    c = engine.get(ref)
    async with container_vm(engine, c) as vm:
        _need(vm, "get_archive")
        try:
            st, data = await vm.get_archive(path)
        except GuestPathError as e:
            raise _map_error(e, path, ref) from None
        try:
            yield st, data
        finally:
            with contextlib.suppress(Exception):
                await data.aclose()  # type: ignore[attr-defined]


async def put(engine: Engine, ref: str, path: str, data: AsyncIterator[bytes],
              no_overwrite_dir_non_dir: bool, copy_uid_gid: bool = False) -> None:
    c = engine.get(ref)
    if c.host_config.get("ReadonlyRootfs"):
        # dockerd refuses unless the target is in a writable volume.
        in_volume = any(path == m["Destination"] or path.startswith(m["Destination"].rstrip("/")
                        + "/") for m in c.mounts if m["RW"])
        if not in_volume:
            raise Forbidden("container rootfs is marked read-only")
    async with container_vm(engine, c) as vm:
        try:
            # docker cp -a: the container's user owns the files (dockerd's tarCopyOptions).
            _need(vm, "put_archive")
            owner = (c.config.get("User") or "") if copy_uid_gid else ""
            await vm.put_archive(path, data, no_overwrite_dir_non_dir, owner)
        except GuestPathError as e:
            raise _map_error(e, path, ref) from None
    engine.events.publish("container", "extract-to-dir", c.id, **engine._attrs(c))


@contextlib.asynccontextmanager
async def export(engine: Engine, ref: str) -> AsyncIterator[AsyncIterator[bytes]]:
    """The container's whole filesystem, volumes' contents left out (as dockerd)."""
    c = engine.get(ref)
    excludes = [m["Destination"] for m in c.mounts]
    async with container_vm(engine, c) as vm:
        _need(vm, "get_archive")
        _, data = await vm.get_archive("/", rebase="", excludes=excludes)
        try:
            yield data
        finally:
            with contextlib.suppress(Exception):
                await data.aclose()  # type: ignore[attr-defined]
    engine.events.publish("container", "export", c.id, **engine._attrs(c))
