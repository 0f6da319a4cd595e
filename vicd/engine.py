"""The container engine: state machine, restart policies, names, attach and exec.

It knows neither HTTP nor how a VM is made: the API layer calls it, and it
calls a compute backend (``vicd.backend``) and the plugin hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from vicd import container as cs
from vicd import health
from vicd.backend import (
    VM,
    BindSpec,
    ComputeBackend,
    DiskSpec,
    GuestProcess,
    ProcessSpec,
    StartError,
    VMSpec,
)
from vicd.config import Config
from vicd.container import Container
from vicd.container_networks import ContainerNetworks, configured
from vicd.cpus import cpu_max, vcpus_needed
from vicd.errors import Conflict, InvalidParameter, NotFound, NotModified, VicdError
from vicd.events import EventBus
from vicd.image_store import ImageStore
from vicd.logs import LogWriter
from vicd.mounts import plan_mounts, volumes_from
from vicd.names import check_name, new_id, random_name
from vicd.network import GUEST_IP, hosts_file, make_nic, network_mode, resolv_file
from vicd.networks import Network, NetworkManager
from vicd.plugin_manager import call_broadcast
from vicd.ports import allocate, plan_ports
from vicd.signals import parse_signal
from vicd.store import ContainerStore
from vicd.timefmt import rfc3339_now
from vicd.volumes import VolumeManager

log = logging.getLogger(__name__)

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RESTART_POLICIES = {"", "no", "always", "unless-stopped", "on-failure"}

# An attachment receives (stream, data); None marks the end of the output.
Chunk = tuple[int, bytes] | None


@dataclass
class Attachment:
    streams: set[int]
    queue: asyncio.Queue[Chunk] = field(default_factory=asyncio.Queue)


@dataclass
class Runtime:
    """What exists only while the daemon runs: the VM handle, log writer, waiters."""

    vm: VM | None = None
    log: LogWriter | None = None
    monitor: asyncio.Task[None] | None = None
    attachments: list[Attachment] = field(default_factory=list)
    stdin_buffer: list[bytes] = field(default_factory=list)
    stdin_closed: bool = False
    exit_waiters: list[asyncio.Future[int]] = field(default_factory=list)
    removed_waiters: list[asyncio.Future[int]] = field(default_factory=list)
    running: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class Exec:
    id: str
    container_id: str
    config: dict[str, Any]
    running: bool = False
    exit_code: int | None = None
    pid: int = 0
    process: GuestProcess | None = None
    attachment: Attachment | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Engine:
    def __init__(
        self,
        config: Config,
        pm: pluggy.PluginManager,
        backend: ComputeBackend,
        images: ImageStore,
        events: EventBus,
        volumes: VolumeManager | None = None,
        networks: NetworkManager | None = None,
    ) -> None:
        self.config = config
        self.volumes = volumes or VolumeManager(config.data_root / "volumes", {})
        self.networks = networks or NetworkManager(config.data_root / "networks", {})
        self.networks.names_of = self._dns_names
        self.nets = ContainerNetworks(self.networks, backend)
        self.pm = pm
        self.backend = backend
        self.images = images
        self.events = events
        self.store = ContainerStore(config.data_root / "containers")
        self.containers: dict[str, Container] = {}
        self.runtimes: dict[str, Runtime] = {}
        self.execs: dict[str, Exec] = {}
        self._name_lock = asyncio.Lock()

    # --- lookup ---------------------------------------------------------------

    def get(self, ref: str) -> Container:
        """By full id, name (with or without slash), or unique id prefix, like dockerd."""
        if ref in self.containers:
            return self.containers[ref]
        name = ref.lstrip("/")
        for c in self.containers.values():
            if c.name == name:
                return c
        if ref:
            hits = [c for c in self.containers.values() if c.id.startswith(ref)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise InvalidParameter(f"multiple IDs found with provided prefix: {ref}")
        raise NotFound(f"No such container: {ref}")

    def _dns_names(self, cid: str) -> list[str]:
        c = self.containers.get(cid)
        return [c.name, c.short_id, c.config.get("Hostname") or ""] if c else []

    def rt(self, c: Container) -> Runtime:
        return self.runtimes.setdefault(c.id, Runtime())

    def image_user(self, image_id: str) -> str | None:
        """The id of a container made from the image, for rmi's conflict messages."""
        return next((c.id for c in self.containers.values() if c.image_id == image_id), None)

    def image_running_user(self, image_id: str) -> str | None:
        return next((c.id for c in self.containers.values()
                     if c.image_id == image_id and c.state.running), None)

    # --- startup and reconciliation ------------------------------------------

    async def load(self) -> None:
        """Read stored records and reconcile them with the VMs that really run."""
        # A backend that watches its VMs (vSphere) reports ones deleted behind our back.
        on_removed = getattr(self.backend, "set_removed_callback", None)
        if on_removed:
            on_removed(self._removed_by_backend)
        for c in self.store.load_all():
            self.containers[c.id] = c
        self.networks.load()
        await self.networks.restore()
        # A stateless backend (vSphere) rebuilds records the data root lacks.
        recover = getattr(self.backend, "recover_containers", None)
        for data in await recover() if recover else []:
            if data.get("id") and data["id"] not in self.containers:
                c = Container.from_dict(data)
                self.containers[c.id] = c
                self.store.save(c)
                log.info("container %s: record recovered from the backend", c.short_id)
        running = await self.backend.running_ids()
        for cid in running - set(self.containers):
            log.warning("destroying orphan VM of unknown container %s", cid)
            await self.backend.destroy(cid)
        for c in list(self.containers.values()):
            if c.state.status == cs.REMOVING:
                await self._finish_remove(c)
                continue
            if not c.state.running:
                continue
            vm = None
            if c.id in running:
                vm = await self.backend.reattach(c.id, self._sink(c))
            if vm is None:
                log.info("container %s: VM gone while the daemon was down", c.short_id)
                await self._exited(c, 137, "VM ended while the daemon was down")
                await self._apply_restart_policy(c, 137)
                continue
            rt = self.rt(c)
            rt.vm = vm
            rt.log = LogWriter(self.log_path(c))
            rt.running.set()
            if c.state.status == cs.RESTARTING:
                c.state.status = cs.RUNNING
                self.store.save(c)
            rt.monitor = asyncio.create_task(self._monitor(c, vm))
            health.start(self, c, reattached=True)
            log.info("container %s: reattached to its running VM", c.short_id)
        for c in self.containers.values():  # endpoints of VMs that ended while we were away
            if not c.state.running:
                await self.nets.release(c)
        for c in list(self.containers.values()):
            policy = c.restart_policy[0]
            if c.state.running or not c.has_been_started:
                continue
            # dockerd starts these when it starts; unless-stopped only if not stopped by hand.
            if policy == "always" or (policy == "unless-stopped" and not c.stopped_by_user):
                asyncio.create_task(self._restart_quietly(c))

    async def shutdown(self) -> None:
        """Leave VMs running (they survive the daemon); stop watching them."""
        self.networks.close()
        for rt in self.runtimes.values():
            if rt.monitor:
                rt.monitor.cancel()
            if rt.log:
                rt.log.flush_partial()
            detach = getattr(rt.vm, "detach", None)
            if detach is not None:
                # Free each VM's channel now: the next daemon may connect
                # before this one has finished closing its HTTP connections.
                with contextlib.suppress(Exception):
                    await detach()

    # --- networks ---------------------------------------------------------------

    async def create_network(self, name: str, driver: str, **kw: Any) -> Network:
        n = await self.networks.create(name, driver, **kw)
        self.events.publish("network", "create", n.id, name=n.name, type=n.driver)
        return n

    async def remove_network(self, ref: str) -> None:
        running = {c.id for c in self.containers.values() if c.state.running}
        n = await self.networks.remove(ref, running)
        self.events.publish("network", "destroy", n.id, name=n.name, type=n.driver)

    async def prune_networks(self, keep: Callable[[Network], bool]) -> list[str]:
        """Remove user-defined networks no container is configured on."""
        used = {name for c in self.containers.values() for name in configured(c)}
        out = []
        for n in list(self.networks.networks.values()):
            if n.name in used or keep(n):
                continue
            await self.remove_network(n.id)
            out.append(n.name)
        return out

    async def connect_network(self, ref: str, container: str,
                              settings: dict[str, Any] | None) -> None:
        await self._change_networks("connect", container, lambda c, vm: self.nets.connect(
            c, vm, ref, settings))

    async def disconnect_network(self, ref: str, container: str, force: bool = False) -> None:
        await self._change_networks("disconnect", container, lambda c, vm: self.nets.disconnect(
            c, vm, ref))

    async def _change_networks(self, action: str, container: str,
                               change: Callable[[Container, VM | None], Awaitable[str]]) -> None:
        """docker network connect/disconnect: under the container's lock, stored, announced."""
        c = self.get(container)
        rt = self.rt(c)
        async with rt.lock:
            if c.state.status == cs.PAUSED:
                raise Conflict(f"Container {c.id} is paused, unpause the container before "
                               f"{action}ing it")
            name = await change(c, rt.vm if c.state.running else None)
            self.store.save(c)
        self._network_event(action, name, c)

    def _network_event(self, action: str, name: str, c: Container) -> None:
        n = self.networks.find(name)
        self.events.publish("network", action, n.id if n else name, container=c.id, name=name,
                            type=n.driver if n else "bridge")

    def log_path(self, c: Container) -> Any:
        return self.store.dir_for(c.id) / f"{c.id}-json.log"

    # --- create ---------------------------------------------------------------

    async def create(
        self, name: str | None, cfg: dict[str, Any], host_config: dict[str, Any],
        networking: dict[str, Any] | None = None,
    ) -> tuple[Container, list[str]]:
        image_ref = cfg.get("Image") or ""
        if not image_ref:
            raise InvalidParameter("config cannot be empty in order to create a container")
        image = self.images.get(image_ref)
        warnings: list[str] = []
        host_config = dict(host_config or {})
        _validate_host_config(host_config)
        merged = _merge_image_config(cfg, image.config.get("config") or {})
        mode = network_mode(host_config)
        networks = self.nets.plan(host_config, networking)
        plan_ports(merged, host_config)  # a bad -p is refused at create, as dockerd does
        hosts_file("x", mode, host_config.get("ExtraHosts"))
        entrypoint = merged.get("Entrypoint") or []
        cmd = merged.get("Cmd") or []
        argv = list(entrypoint) + list(cmd)
        if not argv:
            raise InvalidParameter("No command specified")
        lent: list[dict[str, Any]] = []
        for spec_ in host_config.get("VolumesFrom") or []:
            source = self.get(spec_.partition(":")[0])
            lent += volumes_from(spec_, source.mounts)[1]
        mounts = plan_mounts(merged, host_config, lent)
        for m in mounts:
            self.volumes.driver(m["Driver"] or "local")  # unknown: fail before anything exists
        async with self._name_lock:
            cid = new_id()
            if name:
                name = check_name(name)
                self._check_name_free(name)
            else:
                name = self._unique_random_name()
            merged["Hostname"] = merged.get("Hostname") or cid[:12]
            c = Container(
                id=cid,
                name=name,
                created=rfc3339_now(),
                image_id=image.id,
                image_ref=image_ref,
                path=argv[0],
                args=argv[1:],
                config=merged,
                host_config=host_config,
                networks=networks,
            )
            self.containers[cid] = c
            self.store.save(c)
        try:
            c.mounts = await self._create_volumes(c, mounts)
            self.store.save(c)
            spec = await self._vm_spec(c)
            await self.backend.create(spec)
        except BaseException:
            self.containers.pop(cid, None)
            self.store.delete(cid)
            raise
        self.events.publish("container", "create", c.id, **self._attrs(c))
        await call_broadcast(self.pm, "container_created", container=c)
        return c, warnings

    async def _create_volumes(self, c: Container, mounts: list[dict[str, Any]]
                              ) -> list[dict[str, Any]]:
        """Create the named volumes that are missing and the anonymous ones."""
        out = []
        for m in mounts:
            if m["Type"] != "volume":
                out.append(m)
                continue
            v, created = await asyncio.to_thread(
                self.volumes.create, m["Name"] or None, m["Driver"], m.get("DriverOpts"),
                m.get("Labels"), m.get("Anonymous", False))
            if created:
                self.events.publish("volume", "create", v.name, driver=v.driver)
            view = self.volumes.view(v)
            out.append(dict(m, Name=v.name, Source=view["Mountpoint"], Driver=v.driver))
        return out

    def volume_users(self, name: str, running_only: bool = False) -> list[str]:
        return [c.id for c in self.containers.values()
                if any(m["Type"] == "volume" and m["Name"] == name for m in c.mounts)
                and (c.state.running or not running_only)]

    def _attach_volumes(self, c: Container) -> list[DiskSpec]:
        disks = []
        for m in _volume_mounts(c):
            others = [o for o in self.volume_users(m["Name"], running_only=True) if o != c.id]
            if others:
                # One ext4 disk cannot be mounted by two VMs at once.
                raise Conflict(f"volume {m['Name']} is in use by running container "
                               f"{others[0][:12]}: a volume disk is attached to one VM at a time")
            v = self.volumes.get(m["Name"])
            disk = self.volumes.driver(v.driver).mount(v.name, c.id)
            disk.target = m["Destination"]
            disk.read_only = not m["RW"]
            disk.copy_up = not v.initialized and m["RW"]
            disks.append(disk)
        return disks

    def _volumes_started(self, c: Container) -> None:
        for m in _volume_mounts(c):
            v = self.volumes.get(m["Name"])
            if not v.initialized and m["RW"]:
                v.initialized = True
                self.volumes.save(v)
            self.events.publish("volume", "mount", v.name, container=c.id,
                                destination=m["Destination"], driver=v.driver,
                                propagation="", **{"read/write": str(m["RW"]).lower()})

    def _volumes_stopped(self, c: Container) -> None:
        for m in _volume_mounts(c):
            try:
                v = self.volumes.get(m["Name"])
                self.volumes.driver(v.driver).unmount(v.name, c.id)
            except VicdError:
                continue
            self.events.publish("volume", "unmount", v.name, container=c.id, driver=v.driver)

    def _check_name_free(self, name: str, exclude: str | None = None) -> None:
        for other in self.containers.values():
            if other.name == name and other.id != exclude:
                raise Conflict(
                    f'Conflict. The container name "/{name}" is already in use by container '
                    f'"{other.id}". You have to remove (or rename) that container to be able '
                    "to reuse that name."
                )

    def _unique_random_name(self) -> str:
        taken = {c.name for c in self.containers.values()}
        while True:
            n = random_name()
            if n not in taken:
                return n
            n = f"{n}{len(taken)}"
            if n not in taken:
                return n

    async def _vm_spec(self, c: Container) -> VMSpec:
        cfg, hc = c.config, c.host_config
        size = self.config.rootfs_size_mb * 1024 * 1024
        disk = await asyncio.to_thread(self.images.rootfs_disk, c.image_id, size)
        memory = int(hc.get("Memory") or 0)
        mem_mb = self.config.vm_memory_mb if memory <= 0 else math.ceil(memory / 2**20)
        mem_mb = max(mem_mb, self.config.vm_min_memory_mb)
        console = hc.get("ConsoleSize") or [0, 0]
        return VMSpec(
            container_id=c.id,
            name=c.name,
            image_id=c.image_id,
            image_disk=disk,
            hostname=cfg.get("Hostname") or c.id[:12],
            process=ProcessSpec(
                args=[c.path, *c.args],
                env=list(cfg.get("Env") or []),
                cwd=cfg.get("WorkingDir") or "/",
                user=cfg.get("User") or "",
                tty=bool(cfg.get("Tty")),
                stdin=bool(cfg.get("OpenStdin")),
                rows=int(console[0] or 0),
                cols=int(console[1] or 0),
            ),
            memory_mb=mem_mb,
            cpus=vcpus_needed(hc),
            cpu_max=cpu_max(hc),
            labels=dict(cfg.get("Labels") or {}),
            ephemeral=bool(hc.get("AutoRemove")),
            record=c.to_dict(),
        )

    # --- start and the life of a VM ---------------------------------------------

    def _sink(self, c: Container) -> Callable[[int, bytes], None]:
        def sink(stream: int, data: bytes) -> None:
            rt = self.rt(c)
            if rt.log:
                rt.log.write(stream, data)
            for a in rt.attachments:
                if stream in a.streams:
                    a.queue.put_nowait((stream, data))

        return sink

    async def start(self, ref: str) -> None:
        c = self.get(ref)
        rt = self.rt(c)
        async with rt.lock:
            if c.state.status == cs.PAUSED:
                raise Conflict("cannot start a paused container, try unpause instead")
            if c.state.running:
                raise NotModified("container already started")
            if c.state.status == cs.REMOVING:
                raise Conflict(f"container is marked for removal and cannot be started: {c.id}")
            c.stopped_by_user = False
            try:
                await self._start_vm(c)
            except VicdError:
                if c.host_config.get("AutoRemove"):
                    # dockerd removes an --rm container whose start failed.
                    asyncio.create_task(self._remove_quietly(c))
                raise

    async def _start_vm(self, c: Container) -> None:
        rt = self.rt(c)
        spec = await self._vm_spec(c)
        mode = self.nets.egress_mode(c)
        ports = allocate(plan_ports(c.config, c.host_config), f"{c.name} ({c.id[:12]})")
        nic = make_nic(c.id, mode, ports)
        slots = await self.nets.plug(c)
        spec.nics = [nic.to_dict()] + [n.to_dict() for n in slots]
        own_ip = slots[0].address.split("/")[0] if slots else GUEST_IP
        spec.hosts = hosts_file(spec.hostname, mode, c.host_config.get("ExtraHosts"), own_ip)
        spec.resolv = resolv_file(c.host_config, mode, self.nets.resolver(slots))
        spec.disks = self._attach_volumes(c)
        spec.binds = [BindSpec(Path(m["Source"]), m["Destination"], not m["RW"])
                      for m in c.mounts if m["Type"] == "bind"]
        spec.tmpfs = [(m["Destination"], m.get("Options", ""))
                      for m in c.mounts if m["Type"] == "tmpfs"]
        await call_broadcast(self.pm, "before_start", container=c, spec=spec)
        if rt.log is None:
            rt.log = LogWriter(self.log_path(c))
        try:
            vm = await self.backend.start(spec, self._sink(c))
        except StartError as e:
            await self._exited(c, e.exit_code, e.message)
            raise InvalidParameter(e.message) from e
        except BaseException:
            await self.nets.release(c)
            raise
        rt.vm = vm
        self._volumes_started(c)
        for slot in slots:
            self._network_event("connect", slot.network, c)
        c.nic = spec.nics[0]
        c.state = cs.State(status=cs.RUNNING, pid=vm.pid, started_at=rfc3339_now())
        c.has_been_started = True
        self.store.save(c)
        rt.running.set()
        for data in rt.stdin_buffer:
            vm.main.write_stdin(data)
        rt.stdin_buffer.clear()
        if rt.stdin_closed:
            vm.main.close_stdin()
        self.events.publish("container", "start", c.id, **self._attrs(c))
        rt.monitor = asyncio.create_task(self._monitor(c, vm))
        health.start(self, c)

    async def _monitor(self, c: Container, vm: VM) -> None:
        try:
            code = await vm.wait()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the VM's end is always recorded
            log.exception("container %s: monitor failed", c.short_id)
            code, err = 137, str(e)
        else:
            err = ""
        await self._exited(c, code, err)
        await call_broadcast(self.pm, "after_stop", container=c, exit_code=code)
        if c.host_config.get("AutoRemove"):
            await self._remove_quietly(c)
            return
        await self._apply_restart_policy(c, code)

    async def _exited(self, c: Container, code: int, error: str) -> None:
        rt = self.rt(c)
        rt.vm = None
        rt.running.clear()
        health.stop(c)
        if rt.log:
            rt.log.flush_partial()
        c.state.status = cs.EXITED
        c.state.pid = 0
        if c.nic is not None:
            self._volumes_stopped(c)
        c.nic = None
        for n, _ in self.networks.endpoints_of(c.id):
            self._network_event("disconnect", n.name, c)
        await self.nets.release(c)
        c.state.exit_code = code
        c.state.error = error
        c.state.finished_at = rfc3339_now()
        self.store.save(c)
        for a in rt.attachments:
            a.queue.put_nowait(None)
        rt.attachments.clear()
        rt.stdin_buffer.clear()
        rt.stdin_closed = False
        self.events.publish("container", "die", c.id, exitCode=str(code), **self._attrs(c))
        for f in rt.exit_waiters:
            if not f.done():
                f.set_result(code)
        rt.exit_waiters.clear()
        for e in self.execs.values():
            if e.container_id == c.id and e.running:
                e.running = False
                e.exit_code = e.exit_code if e.exit_code is not None else 137

    async def _apply_restart_policy(self, c: Container, code: int) -> None:
        policy, max_retries = c.restart_policy
        if c.stopped_by_user or c.id not in self.containers:
            return
        want = (
            policy in ("always", "unless-stopped")
            or (policy == "on-failure" and code != 0
                and (max_retries == 0 or c.restart_count < max_retries))
        )
        if not want:
            return
        c.state.status = cs.RESTARTING
        self.store.save(c)
        # dockerd's backoff starts at 100 ms and doubles; a container that ran
        # for a while restarts at once.
        delay = min(0.1 * (2 ** min(c.restart_count, 8)), 60.0)
        await asyncio.sleep(delay)
        if c.id not in self.containers or c.stopped_by_user or c.state.status != cs.RESTARTING:
            return
        c.restart_count += 1
        await self._restart_quietly(c)

    async def _remove_quietly(self, c: Container) -> None:
        with contextlib.suppress(VicdError):
            await self.remove(c.id, force=True, volumes=True)

    async def _remove_anonymous_volumes(self, c: Container) -> None:
        """``rm -v`` and ``--rm``: the container's anonymous volumes go with it."""
        for m in c.mounts:
            if not m.get("Anonymous") or self.volume_users(m["Name"]):
                continue
            with contextlib.suppress(VicdError):
                await asyncio.to_thread(self.volumes.remove, m["Name"], [])
                self.events.publish("volume", "destroy", m["Name"], driver=m["Driver"])

    async def _restart_quietly(self, c: Container) -> None:
        rt = self.rt(c)
        async with rt.lock:
            if c.state.status == cs.RUNNING:
                return
            try:
                await self._start_vm(c)
                self.events.publish("container", "restart", c.id, **self._attrs(c))
            except VicdError as e:
                log.error("container %s: restart failed: %s", c.short_id, e.message)

    # --- stop, kill, restart, pause ----------------------------------------------

    async def stop(self, ref: str, timeout: int | None, sig: str | None = None) -> None:
        c = self.get(ref)
        if c.state.status == cs.RESTARTING:
            c.stopped_by_user = True
            await self._exited(c, c.state.exit_code, "")
            return
        if not c.state.running:
            raise NotModified("container already stopped")
        c.stopped_by_user = True
        self.store.save(c)
        await self._stop_running(c, timeout, sig)
        self.events.publish("container", "stop", c.id, **self._attrs(c))

    async def _stop_running(self, c: Container, timeout: int | None, sig: str | None) -> None:
        rt = self.rt(c)
        vm = rt.vm
        if vm is None:
            return
        if timeout is None:
            st = c.config.get("StopTimeout")
            timeout = 10 if st is None else int(st)
        signum = parse_signal(sig or c.config.get("StopSignal"), signal.SIGTERM)
        if c.state.status == cs.PAUSED:
            await vm.resume()
            c.state.status = cs.RUNNING
        waiter = self._exit_future(c)
        if timeout != 0:
            self.events.publish("container", "kill", c.id, signal=str(signum), **self._attrs(c))
            with contextlib.suppress(Exception):
                await vm.main.signal(signum)
            wait_for = None if timeout < 0 else timeout
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), wait_for)
                return
        self.events.publish("container", "kill", c.id, signal="9", **self._attrs(c))
        await vm.kill()
        await asyncio.shield(waiter)

    def _exit_future(self, c: Container) -> asyncio.Future[int]:
        f: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.rt(c).exit_waiters.append(f)
        return f

    async def kill(self, ref: str, sig: str | None) -> None:
        c = self.get(ref)
        signum = parse_signal(sig, signal.SIGKILL)
        vm = self.rt(c).vm
        if not c.state.running or c.state.status == cs.RESTARTING or vm is None:
            raise Conflict(f"Cannot kill container: {ref}: Container {c.id} is not running")
        self.events.publish("container", "kill", c.id, signal=str(signum), **self._attrs(c))
        if signum == signal.SIGKILL:
            c.stopped_by_user = True
            waiter = self._exit_future(c)
            if c.state.status == cs.PAUSED:
                await vm.kill()
            else:
                with contextlib.suppress(Exception):
                    await vm.main.signal(signum)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiter), 3)
                    return
                await vm.kill()
            await asyncio.shield(waiter)
            return
        await vm.main.signal(signum)

    async def restart(self, ref: str, timeout: int | None) -> None:
        c = self.get(ref)
        if c.state.running:
            c.stopped_by_user = True
            await self._stop_running(c, timeout, None)
        rt = self.rt(c)
        async with rt.lock:
            c.stopped_by_user = False
            if not c.state.running:
                await self._start_vm(c)
        self.events.publish("container", "restart", c.id, **self._attrs(c))

    async def pause(self, ref: str) -> None:
        c = self.get(ref)
        if not c.state.running:
            raise Conflict(f"Container {c.id} is not running")
        if c.state.status == cs.PAUSED:
            raise Conflict(f"Container {c.id} is already paused")
        vm = self.rt(c).vm
        assert vm is not None
        # The processes are stopped first (dockerd's freezer), then the vCPUs: a
        # paused VM may be resumed for a moment to serve `docker cp` while its
        # processes stay stopped.
        await vm.freeze(True)
        await vm.pause()
        c.state.status = cs.PAUSED
        self.store.save(c)
        self.events.publish("container", "pause", c.id, **self._attrs(c))

    async def unpause(self, ref: str) -> None:
        c = self.get(ref)
        if c.state.status != cs.PAUSED:
            raise Conflict(f"Container {c.id} is not paused")
        vm = self.rt(c).vm
        assert vm is not None
        await vm.resume()
        await vm.freeze(False)
        c.state.status = cs.RUNNING
        self.store.save(c)
        self.events.publish("container", "unpause", c.id, **self._attrs(c))

    async def rename(self, ref: str, new_name: str) -> None:
        c = self.get(ref)
        if not new_name:
            raise InvalidParameter("Neither old nor new names may be empty")
        new = check_name(new_name)
        async with self._name_lock:
            if new == c.name:
                raise Conflict("Renaming a container with the same name as its current name")
            self._check_name_free(new, exclude=c.id)
            old = c.name
            c.name = new
            self.store.save(c)
        # A backend that keeps the name outside the data root (vSphere: the VM's
        # name and extraConfig) follows.
        renamed = getattr(self.backend, "rename", None)
        if renamed is not None:
            await renamed(c.id, new, c.to_dict())
        self.events.publish("container", "rename", c.id, oldName=f"/{old}", **self._attrs(c))

    # --- remove -------------------------------------------------------------------

    async def remove(self, ref: str, force: bool = False, volumes: bool = False) -> None:
        c = self.get(ref)
        if c.state.status == cs.REMOVING:
            raise Conflict(f"removal of container {c.id} is already in progress")
        if c.state.running and c.state.status != cs.RESTARTING:
            if not force:
                verb = "paused" if c.state.status == cs.PAUSED else "running"
                raise Conflict(
                    f"You cannot remove a {verb} container {c.id}. "
                    f"{'Unpause and then stop' if verb == 'paused' else 'Stop'} the container "
                    "before attempting removal or force remove"
                )
            c.stopped_by_user = True
            vm = self.rt(c).vm
            if vm is not None:
                waiter = self._exit_future(c)
                self.events.publish("container", "kill", c.id, signal="9", **self._attrs(c))
                await vm.kill()
                await asyncio.shield(waiter)
        c.stopped_by_user = True
        c.state.status = cs.REMOVING
        self.store.save(c)
        await self._finish_remove(c, volumes)

    async def _removed_by_backend(self, cid: str) -> None:
        """The container's VM was destroyed outside vicd: remove the container (with events)."""
        c = self.containers.get(cid)
        if c is None or c.state.status == cs.REMOVING:
            return
        log.info("container %s: its VM was destroyed outside vicd; removing it", c.short_id)
        with contextlib.suppress(VicdError):
            await self.remove(cid, force=True)

    async def _finish_remove(self, c: Container, volumes: bool = False) -> None:
        rt = self.runtimes.pop(c.id, None)
        if rt and rt.log:
            rt.log.close()
        if rt and rt.monitor and rt.monitor is not asyncio.current_task():
            rt.monitor.cancel()
        await self.backend.remove(c.id)
        self.store.delete(c.id)
        self.containers.pop(c.id, None)
        for eid in c.exec_ids:
            self.execs.pop(eid, None)
        self.events.publish("container", "destroy", c.id, **self._attrs(c))
        if volumes:
            await self._remove_anonymous_volumes(c)
        await call_broadcast(self.pm, "container_removed", container=c)
        if rt:
            for f in rt.removed_waiters + rt.exit_waiters:
                if not f.done():
                    f.set_result(c.state.exit_code)

    async def prune(self, filters: dict[str, list[str]]) -> list[str]:
        from vicd.filters import container_matches

        removed = []
        for c in list(self.containers.values()):
            if c.state.running or c.state.status == cs.REMOVING:
                continue
            if not container_matches(c, filters, self, prune=True):
                continue
            with contextlib.suppress(VicdError):
                await self.remove(c.id)
                removed.append(c.id)
        return removed

    # --- wait ------------------------------------------------------------------------

    async def wait(self, ref: str, condition: str) -> asyncio.Future[int]:
        """A future for the exit code; resolved per Docker's wait conditions."""
        c = self.get(ref)
        rt = self.rt(c)
        loop = asyncio.get_running_loop()
        f: asyncio.Future[int] = loop.create_future()
        if condition in ("", "not-running"):
            if not c.state.running or c.state.status == cs.RESTARTING and rt.vm is None:
                f.set_result(c.state.exit_code)
            else:
                rt.exit_waiters.append(f)
        elif condition == "next-exit":
            rt.exit_waiters.append(f)
        elif condition == "removed":
            rt.removed_waiters.append(f)
        else:
            raise InvalidParameter(f"invalid condition: {condition!r}")
        return f

    # --- attach ------------------------------------------------------------------------

    def attach(self, ref: str, stdout: bool, stderr: bool) -> tuple[Container, Attachment]:
        c = self.get(ref)
        streams = set()
        if stdout:
            streams.add(1)
        if stderr:
            streams.add(2)
        a = Attachment(streams=streams)
        self.rt(c).attachments.append(a)
        self.events.publish("container", "attach", c.id, **self._attrs(c))
        return c, a

    def detach(self, c: Container, a: Attachment) -> None:
        rt = self.runtimes.get(c.id)
        if rt and a in rt.attachments:
            rt.attachments.remove(a)

    def write_stdin(self, c: Container, data: bytes) -> None:
        rt = self.rt(c)
        if not c.config.get("OpenStdin"):
            return
        if rt.vm is None:
            rt.stdin_buffer.append(data)
        else:
            rt.vm.main.write_stdin(data)

    def close_stdin(self, c: Container) -> None:
        """The attached client ended its input; with StdinOnce the process sees EOF."""
        if not c.config.get("StdinOnce"):
            return
        rt = self.rt(c)
        if rt.vm is None:
            rt.stdin_closed = True
        else:
            rt.vm.main.close_stdin()

    async def resize(self, ref: str, rows: int, cols: int) -> None:
        c = self.get(ref)
        vm = self.rt(c).vm
        if vm is None or not c.state.running:
            raise Conflict(f"Container {c.id} is not running")
        await vm.main.resize(rows, cols)
        self.events.publish(
            "container", "resize", c.id, height=str(rows), width=str(cols), **self._attrs(c)
        )

    # --- exec ---------------------------------------------------------------------------

    def exec_create(self, ref: str, cfg: dict[str, Any]) -> Exec:
        c = self.get(ref)
        if c.state.status == cs.PAUSED:
            raise Conflict(f"Container {c.id} is paused, unpause the container before exec")
        if not c.state.running or self.rt(c).vm is None:
            raise Conflict(f"Container {c.id} is not running")
        if not cfg.get("Cmd"):
            raise InvalidParameter("No exec command specified")
        e = Exec(id=new_id(), container_id=c.id, config=cfg)
        self.execs[e.id] = e
        c.exec_ids.append(e.id)
        cmd = " ".join(cfg["Cmd"])
        self.events.publish("container", f"exec_create: {cmd}", c.id, execID=e.id,
                            **self._attrs(c))
        return e

    def exec_get(self, exec_id: str) -> Exec:
        e = self.execs.get(exec_id)
        if e is None:
            raise NotFound(f"No such exec instance: {exec_id}")
        return e

    async def exec_start(self, exec_id: str, tty: bool | None) -> Exec:
        e = self.exec_get(exec_id)
        if e.running or e.exit_code is not None:
            raise Conflict(f"Exec command {exec_id} is already running")
        c = self.get(e.container_id)
        vm = self.rt(c).vm
        if vm is None or not c.state.running:
            raise Conflict(f"Container {c.id} is not running")
        cfg = e.config
        use_tty = bool(cfg.get("Tty")) if tty is None else bool(tty) or bool(cfg.get("Tty"))
        env = list(c.config.get("Env") or []) + list(cfg.get("Env") or [])
        spec = ProcessSpec(
            args=list(cfg["Cmd"]),
            env=env,
            cwd=cfg.get("WorkingDir") or c.config.get("WorkingDir") or "/",
            user=cfg.get("User") or c.config.get("User") or "",
            tty=use_tty,
            stdin=bool(cfg.get("AttachStdin")),
        )
        streams = set()
        if cfg.get("AttachStdout", True):
            streams.add(1)
        if cfg.get("AttachStderr", True):
            streams.add(2)
        e.attachment = Attachment(streams=streams)

        def sink(stream: int, data: bytes) -> None:
            if e.attachment and stream in e.attachment.streams:
                e.attachment.queue.put_nowait((stream, data))

        e.running = True
        try:
            proc = await vm.exec(spec, sink)
        except StartError as err:
            e.running = False
            e.exit_code = err.exit_code
            e.attachment.queue.put_nowait((2, (err.message + "\r\n").encode()))
            e.attachment.queue.put_nowait(None)
            e.done.set()
            return e
        e.process = proc
        e.pid = proc.pid
        cmd = " ".join(cfg["Cmd"])
        self.events.publish("container", f"exec_start: {cmd}", c.id, execID=e.id,
                            **self._attrs(c))
        asyncio.create_task(self._exec_monitor(c, e, proc))
        return e

    async def _exec_monitor(self, c: Container, e: Exec, proc: GuestProcess) -> None:
        try:
            code = await proc.wait()
        except Exception:
            code = 137
        e.running = False
        e.exit_code = code
        if e.attachment:
            e.attachment.queue.put_nowait(None)
        e.done.set()
        self.events.publish("container", "exec_die", c.id, execID=e.id, exitCode=str(code),
                            **self._attrs(c))

    async def exec_resize(self, exec_id: str, rows: int, cols: int) -> None:
        e = self.exec_get(exec_id)
        if e.process is None:
            raise Conflict(f"Exec {exec_id} is not running")
        await e.process.resize(rows, cols)

    # --- figures ----------------------------------------------------------------------------

    async def top(self, ref: str) -> list[dict[str, Any]]:
        c = self.get(ref)
        vm = self.rt(c).vm
        if vm is None or not c.state.running:
            raise Conflict(f"Container {c.id} is not running")
        procs = await vm.ps()
        self.events.publish("container", "top", c.id, **self._attrs(c))
        return procs

    async def stats_sample(self, c: Container) -> Any:
        vm = self.rt(c).vm
        if vm is None or c.state.status not in (cs.RUNNING, cs.PAUSED):
            return None
        try:
            return await asyncio.wait_for(vm.stats(), 5)
        except (TimeoutError, VicdError):
            return None

    # --- helpers ------------------------------------------------------------------------------

    def _attrs(self, c: Container) -> dict[str, str]:
        attrs = {str(k): str(v) for k, v in (c.config.get("Labels") or {}).items()}
        attrs.update(image=c.image_ref, name=c.name)
        return attrs

    def sizes(self, c: Container) -> tuple[int, int]:
        """(SizeRw, SizeRootFs): what the container wrote, and that plus its image."""
        usage = getattr(self.backend, "disk_usage", None)
        rw = usage(c.id) if usage else 0
        try:
            return rw, rw + self.images.get(c.image_id).size
        except NotFound:
            return rw, rw

    def counts(self) -> dict[str, int]:
        running = sum(1 for c in self.containers.values() if c.state.status == cs.RUNNING)
        paused = sum(1 for c in self.containers.values() if c.state.status == cs.PAUSED)
        total = len(self.containers)
        return {
            "Containers": total,
            "ContainersRunning": running,
            "ContainersPaused": paused,
            "ContainersStopped": total - running - paused,
        }


def _volume_mounts(c: Container) -> list[dict[str, Any]]:
    return [m for m in c.mounts if m["Type"] == "volume"]


def _validate_host_config(hc: dict[str, Any]) -> None:
    rp = hc.get("RestartPolicy") or {}
    name = rp.get("Name") or ""
    if name not in RESTART_POLICIES:
        raise InvalidParameter(f"invalid restart policy '{name}'")
    retries = int(rp.get("MaximumRetryCount") or 0)
    if retries < 0:
        raise InvalidParameter("maximum retry count cannot be negative")
    if retries and name != "on-failure":
        raise InvalidParameter(f"maximum retry count cannot be used with restart policy '{name}'")
    if hc.get("AutoRemove") and name not in ("", "no"):
        raise InvalidParameter("can't create 'AutoRemove' container with restart policy")
    memory = int(hc.get("Memory") or 0)
    if 0 < memory < 6 * 1024 * 1024:
        raise InvalidParameter("Minimum memory limit allowed is 6MB")
    if int(hc.get("NanoCpus") or 0) < 0:
        raise InvalidParameter("invalid CPU value: must be positive")
    nano = int(hc.get("NanoCpus") or 0)
    import os

    if nano > (os.cpu_count() or 1) * 1_000_000_000:
        raise InvalidParameter(
            f"Range of CPUs is from 0.01 to {os.cpu_count()}.00, as there are only "
            f"{os.cpu_count()} CPUs available"
        )


def _merge_image_config(cfg: dict[str, Any], img: dict[str, Any]) -> dict[str, Any]:
    """Docker's merge of the image's defaults under the create request."""
    out = dict(cfg)
    env = list(img.get("Env") or [])
    keys = {e.split("=", 1)[0] for e in cfg.get("Env") or []}
    out["Env"] = [e for e in env if e.split("=", 1)[0] not in keys] + list(cfg.get("Env") or [])
    if not any(e.startswith("PATH=") for e in out["Env"]):
        out["Env"].insert(0, DEFAULT_PATH)
    if not cfg.get("Entrypoint") and cfg.get("Entrypoint") != [""]:
        out["Entrypoint"] = img.get("Entrypoint")
        if not cfg.get("Cmd"):
            out["Cmd"] = img.get("Cmd")
    elif cfg.get("Entrypoint") == [""]:
        out["Entrypoint"] = None
    for key in ("WorkingDir", "User", "StopSignal"):
        if not cfg.get(key) and img.get(key):
            out[key] = img[key]
    labels = dict(img.get("Labels") or {})
    labels.update(cfg.get("Labels") or {})
    out["Labels"] = labels
    for key in ("ExposedPorts", "Volumes"):
        merged = dict(img.get(key) or {})
        merged.update(cfg.get(key) or {})
        out[key] = merged or None
    if "Healthcheck" not in out and img.get("Healthcheck"):
        out["Healthcheck"] = img["Healthcheck"]
    return out

