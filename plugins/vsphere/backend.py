"""The vSphere compute backend: every container is a VM in this daemon's folder.

- One daemon = one container host: a resource pool and a VM folder of its
  own (created on first start), a template VM (the tether inside, see
  contrib/photon/README.md) with a snapshot.
- ``create``: an Instant Clone of a per-shape parent VM (frozen in the
  tether) when the server offers it, else a linked clone of the template's
  snapshot. The VM is ``<container-name>-<short id>``; its annotation names
  the container and image; extraConfig carries ``vicd.id`` and the
  container record (``vicd.record.N`` chunks), so ``recover_containers``
  rebuilds ``docker ps -a`` from vCenter alone.
- stdio, exec, signals travel over the VM's network serial port to
  ``serial.SerialListener`` (the tether protocol); power operations map to
  start/stop/kill/pause.
- ``view.FolderView`` mirrors the folder through the PropertyCollector, so
  lookups and ``docker ps`` cost no SOAP call, and a VM powered off or
  destroyed by an admin shows up as a container exit or removal.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyVmomi import vim, vmodl

from vicd.backend import OutputSink, StartError, VMSpec
from vicd.config import Config
from vicd.errors import InvalidParameter
from vicd.plugins.microvm.guest import TetherGuest, process_fields, slot_iface
from vicd.plugins.microvm.tether import (
    TetherConnection,
    TetherError,
    TetherProcess,
)
from vicd.plugins.vsphere.client import (
    CONNECTION_ERRORS,
    VimClient,
    VSphereError,
    fault_message,
)
from vicd.plugins.vsphere.datastore import DatastoreFiles
from vicd.plugins.vsphere.disks import (
    adapter_type,
    attach_changes,
    detach_changes,
    guest_mounts,
    root_disk_change,
    volume_disks,
)
from vicd.plugins.vsphere.nics import NIC_SLOTS, NicPlugger, nic_slots_of
from vicd.plugins.vsphere.serial import SerialListener
from vicd.plugins.vsphere.settings import VSphereSettings
from vicd.plugins.vsphere.view import FolderView, VMState

log = logging.getLogger(__name__)
T = TypeVar("T")

ON, OFF, SUSPENDED = "poweredOn", "poweredOff", "suspended"
CHUNK = 4000  # extraConfig values stay well under vCenter's per-value limit
RECORD_KEY = "vicd.record"
VOLATILE = {"state", "restart_count", "stopped_by_user", "has_been_started", "exec_ids", "nic"}
# Faults that say "this server has no InstantClone": fall back to linked clones.
NO_INSTANT_CLONE = (vmodl.fault.MethodNotFound, vmodl.fault.NotSupported,
                    vmodl.fault.NotImplemented)


@dataclass
class Infra:
    generation: int
    datacenter: Any
    vm_folder: Any
    folder: Any
    pool: Any
    datastore: Any
    ds_name: str
    network: Any
    template: Any
    snapshot: Any
    serial_key: int
    nic: Any
    # The template's devices, which clones start from (free SCSI units).
    devices: list[Any] = field(default_factory=list)


def record_chunks(record: dict[str, Any]) -> dict[str, str]:
    """The record as extraConfig values. What changes with every run (state,
    exec ids, NIC, counters) is left out: recovery derives the state from the
    power state and exit code, so only a rename costs a reconfigure at start."""
    data = {k: v for k, v in record.items() if k not in VOLATILE}
    text = base64.b64encode(json.dumps(data, sort_keys=True).encode()).decode()
    parts = [text[i:i + CHUNK] for i in range(0, len(text), CHUNK)] or [""]
    out = {f"{RECORD_KEY}.n": str(len(parts))}
    out.update({f"{RECORD_KEY}.{i}": p for i, p in enumerate(parts)})
    return out


def read_record(extra: dict[str, str]) -> dict[str, Any] | None:
    try:
        n = int(extra.get(f"{RECORD_KEY}.n", "0"))
        text = "".join(extra[f"{RECORD_KEY}.{i}"] for i in range(n))
        return json.loads(base64.b64decode(text)) if n else None
    except (KeyError, ValueError):
        return None


class VSphereVM(TetherGuest):
    def __init__(self, backend: VSphereBackend, cid: str, moid: str, conn: TetherConnection,
                 ephemeral: bool, volumes: bool = False) -> None:
        self.backend = backend
        self.cid = cid
        self.moid = moid
        self.conn = conn
        # Volumes outlive the container: only a VM without them may end unflushed.
        self.ephemeral = ephemeral and not volumes
        self.volumes = volumes  # volume disks to detach once the VM is off
        self.pid = 0  # no host process: the VM runs on an ESXi host
        self.main: TetherProcess
        self.next_chan = 2
        self.off: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._killed = False

    def process_ends(self) -> tuple[asyncio.Future[Any], ...]:
        return (self.off,)  # the VM powered off (by us or an admin)

    async def pause(self) -> None:
        await self.backend.power(self.moid, "suspend")

    async def resume(self) -> None:
        await self.backend.power(self.moid, "on")

    async def connect_nic(self, nic: dict[str, Any]) -> None:
        # vSphere hot-adds the vmxnet3 NIC; the tether finds it by its MAC.
        vm = self.backend._vm(self.moid)
        await asyncio.to_thread(self.backend.nics.apply, vm, [nic], set())
        try:
            await self.configure_nic(nic)
        except BaseException:
            await asyncio.to_thread(self.backend.nics.apply, vm, [], {int(nic["slot"])})
            raise

    async def disconnect_nic(self, slot: int) -> None:
        with contextlib.suppress(TetherError):  # the NIC goes all the same
            await self.unconfigure_nic(slot)
        await asyncio.to_thread(self.backend.nics.apply, self.backend._vm(self.moid), [],
                                {slot})

    async def kill(self) -> None:
        """SIGKILL the container's process; the guest then syncs its disks and
        powers off (``wait``), so a stop that timed out loses no write still in
        the guest's page cache. A guest that does not answer is powered off."""
        try:
            await asyncio.wait_for(self.main.signal(9), 5)
        except (TetherError, TimeoutError, OSError) as e:
            log.warning("container %s: SIGKILL not delivered (%s); powering the VM off",
                        self.cid[:12], e)
            self._killed = True
            await self.backend.power(self.moid, "off")

    async def power_off(self) -> None:
        """End a VM started with ``hold`` (a stopped container's files for docker
        cp, export, diff): the guest syncs, unmounts and ends, the VM is off."""
        with contextlib.suppress(Exception):
            self.conn.send_ctrl({"op": "poweroff"})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.off), 15)
        await self.backend.ensure_off(self.moid)
        if self.volumes:
            await self.backend.reconfigure_off(self.moid, detach=True)
        await self.conn.close()
        self.backend.vms.pop(self.cid, None)

    async def wait(self) -> int:
        code = await self.main.wait()
        if self._killed or not self.main.channel.exit.done():
            code = 137
        # The view may report a power-off late (a stale event from an earlier
        # run): trust it only once the VM itself says so.
        gone = self.off.done() and await self.backend.is_off(self.moid)
        if not gone:
            if self.ephemeral or self._killed:
                await self.backend.power(self.moid, "off")  # nothing to flush
            else:
                # The guest syncs and unmounts, then ends: ESXi powers the VM off.
                with contextlib.suppress(Exception):
                    self.conn.send_ctrl({"op": "poweroff"})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.off), 15)
                await self.backend.ensure_off(self.moid)
            if not self.ephemeral:
                await self.backend.note_exit(self.moid, code, detach=self.volumes)
        elif self.volumes:
            await self.backend.note_exit(self.moid, code, detach=True)
        await self.conn.close()
        self.backend.vms.pop(self.cid, None)
        return code


class VSphereBackend:
    name = "vsphere"
    nic_slots = NIC_SLOTS  # vSphere hot-adds NICs: every slot is usable live
    # VMSpec.hold is honoured: a stopped container's files (docker cp, export,
    # diff) are served by its VM started without the container's process.
    supports_hold = True

    def __init__(self, config: Config) -> None:
        self.config = config
        self.settings = VSphereSettings.from_config(config.plugins.get("vsphere") or {})
        self.client = VimClient(self.settings, "main")
        self.view_client = VimClient(self.settings, "view")
        self.listener = SerialListener(self.settings.serial_listen)
        self.files = DatastoreFiles(self.client, config.data_root / "vsphere" / "images",
                                    owner=self.settings.folder)
        self.nics = NicPlugger(self.client)
        self.view: FolderView | None = None
        self.infra: Infra | None = None
        self.instant: bool | None = None if self.settings.clone == "auto" else (
            self.settings.clone == "instant")
        self.vms: dict[str, VSphereVM] = {}  # running containers
        self.moids: dict[str, str] = {}  # cid -> VM id, until the view has it
        self.parents: dict[str, tuple[str, int]] = {}  # name -> (VM id, session generation)
        self.powered_on: set[str] = set()  # just instant-cloned: on, though the view may lag
        self.removing: set[str] = set()
        self.removed_callback: Callable[[str], Awaitable[None]] | None = None
        self._infra_lock = asyncio.Lock()
        self._sync_lock = __import__("threading").Lock()
        self._keepalive: asyncio.Task[None] | None = None

    # --- setup ---------------------------------------------------------------------

    async def setup(self) -> None:
        await asyncio.to_thread(self.client.connect)
        await asyncio.to_thread(self.view_client.connect)
        # Inventory first: a wrong name is the likelier mistake, reported as such.
        await asyncio.to_thread(self._infra_sync)
        try:
            await self.listener.start()
        except OSError as e:
            raise VSphereError(f"vsphere: cannot listen for serial ports on "
                               f"{self.settings.serial_listen}: {e.strerror}") from None
        loop = asyncio.get_running_loop()
        self.view = FolderView(self.view_client, self._resolve_folder, loop, self._on_change)
        self.view.start()
        if not await asyncio.to_thread(self.view.synced.wait, 60):
            raise VSphereError("vsphere: the inventory view did not sync within 60 s")
        self._keepalive = asyncio.create_task(self._keepalive_loop())
        log.info("vsphere backend: %s, folder %s, pool %s, template %s, clone %s",
                 self.settings.safe_url, self.settings.folder, self.settings.resource_pool,
                 self.settings.template, self._clone_mode())

    def set_removed_callback(self, cb: Callable[[str], Awaitable[None]]) -> None:
        """The engine's hook for a VM destroyed behind the daemon's back."""
        self.removed_callback = cb

    def _clone_mode(self) -> str:
        return {None: "auto", True: "instant", False: "linked"}[self.instant]

    async def _keepalive_loop(self) -> None:
        period = max(min(self.settings.keepalive_seconds / 2, 60.0), 0.5)
        while True:
            await asyncio.sleep(period)
            try:
                await asyncio.to_thread(self.client.keepalive)
            except Exception as e:  # noqa: BLE001 - logged; the next call re-logs in
                log.warning("vsphere keep-alive: %s", fault_message(e))

    def info(self) -> dict[str, Any]:
        view = self.view.vms if self.view else {}
        return {
            "backend": "vsphere",
            "accelerator": "esxi",
            "vcenter": self.settings.safe_url,
            "api_version": self.client.content.about.apiVersion if self.client.content else "",
            "clone": self._clone_mode(),
            "folder": self.settings.folder,
            "resource_pool": self.settings.resource_pool,
            "vms": sum(1 for st in view.values() if st.container_id),
            "soap_calls": self.client.calls,
            "soap_calls_view": self.view_client.calls,
            "datastore_http_calls": self.files.http_calls,
            "logins": self.client.logins,
        }

    # --- inventory (sync: run in threads) -----------------------------------------------

    def _dc_path(self, *parts: str) -> str:
        return "/".join([self.settings.datacenter.strip("/"), *parts])

    def _resolve_folder(self, c: VimClient) -> Any:
        return c.by_path(self._dc_path("vm", self.settings.folder))

    def _infra_sync(self) -> Infra:
        """Find (or create) everything the daemon works in; cached per session generation,
        since a restarted server may have lost what we created."""
        with self._sync_lock:
            if self.infra is not None and self.infra.generation == self.client.generation:
                return self.infra
            self.infra = self._resolve_infra()
            return self.infra

    def _resolve_infra(self) -> Infra:
        c, s = self.client, self.settings
        gen = c.generation
        dc = c.by_path(s.datacenter)
        if not isinstance(dc, vim.Datacenter):
            raise VSphereError(f"vsphere: datacenter {s.datacenter!r} not found")
        dcp = c.props(dc, ["vmFolder"])
        vm_folder = dcp["vmFolder"]
        template = c.by_path(self._dc_path("vm", s.template))
        if not isinstance(template, vim.VirtualMachine):
            raise VSphereError(f"vsphere: template VM {s.template!r} not found in "
                               f"{s.datacenter}/vm")
        tp = c.props(template, ["snapshot", "config.hardware.device", "resourcePool",
                                "datastore"])
        if s.cluster:
            compute = c.by_path(self._dc_path("host", s.cluster))
            if compute is None:
                raise VSphereError(f"vsphere: cluster {s.cluster!r} not found")
            root_pool = c.props(compute, ["resourcePool"]).get("resourcePool")
        else:
            root_pool = tp.get("resourcePool")
        if root_pool is None:
            raise VSphereError("vsphere: no resource pool (set --vsphere-cluster)")
        pool = self._ensure_child(root_pool, s.resource_pool, lambda: root_pool.CreateResourcePool(
            s.resource_pool, _pool_spec()))
        folder = self._ensure_child(vm_folder, s.folder,
                                    lambda: vm_folder.CreateFolder(s.folder))
        datastore = None
        if s.datastore:
            datastore = c.by_path(self._dc_path("datastore", s.datastore))
            if not isinstance(datastore, vim.Datastore):
                raise VSphereError(f"vsphere: datastore {s.datastore!r} not found")
        ds_name = s.datastore
        if not ds_name and tp.get("datastore"):
            ds_name = str(c.props(tp["datastore"][0], ["name"]).get("name", ""))
        network = None
        if s.network:
            network = c.by_path(self._dc_path("network", s.network))
            if network is None:
                raise VSphereError(f"vsphere: network {s.network!r} not found")
        devices = tp.get("config.hardware.device") or []
        serial_key = next(
            (d.key for d in devices if isinstance(d, vim.vm.device.VirtualSerialPort)), -1)
        nic = next((d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)), None)
        snap = tp.get("snapshot")
        snapshot = snap.currentSnapshot if snap is not None else None
        if snapshot is None:
            # Linked clones need a snapshot to share the template's disks.
            log.info("vsphere: template %s has no snapshot; creating vicd-base", s.template)
            task = c.call(lambda: template.CreateSnapshot_Task(
                "vicd-base", "base of vicd's linked clones", False, False))
            snapshot = c.wait_task(task)
        return Infra(gen, dc, vm_folder, folder, pool, datastore, ds_name, network, template,
                     snapshot, serial_key, nic, devices=list(devices))

    def _ensure_child(self, parent: Any, name: str, create: Callable[[], Any]) -> Any:
        found = self.client.find_child(parent, name)
        if found is not None:
            return found
        try:
            made = self.client.call(create, retry=False)
            log.info("vsphere: created %s %r", type(made).__name__, name)
            return made
        except vim.fault.DuplicateName:
            return self.client.find_child(parent, name)  # made meanwhile (a retry)

    def _device_changes(self, infra: Infra) -> list[Any]:
        """Point the serial port at our listener (and the NIC at the network)."""
        uri = self.settings.serial_uri or f"tcp://{self.listener.host}:{self.listener.port}"
        dev = vim.vm.device.VirtualSerialPort(
            key=infra.serial_key, yieldOnPoll=True,
            backing=vim.vm.device.VirtualSerialPort.URIBackingInfo(direction="client",
                                                                   serviceURI=uri),
            connectable=vim.vm.device.VirtualDevice.ConnectInfo(
                startConnected=True, connected=True, allowGuestControl=False))
        op = vim.vm.device.VirtualDeviceSpec.Operation
        changes = [vim.vm.device.VirtualDeviceSpec(
            operation=op.edit if infra.serial_key >= 0 else op.add, device=dev)]
        if infra.network is not None and infra.nic is not None:
            nic = infra.nic
            nic.backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                deviceName=self.settings.network, network=infra.network)
            changes.append(vim.vm.device.VirtualDeviceSpec(operation=op.edit, device=nic))
        return changes

    def _vm(self, moid: str) -> Any:
        return vim.VirtualMachine(moid, self.client.si._stub)

    # --- create ---------------------------------------------------------------------------

    def vm_name(self, spec: VMSpec) -> str:
        return f"{spec.name}-{spec.container_id[:12]}"

    def _extra(self, spec: VMSpec) -> dict[str, str]:
        return {
            "vicd.id": spec.container_id,
            "vicd.image": spec.image_id,
            # The daemon's copy of the image disk (the test emulation boots it;
            # on ESXi the base disk is the template's VMDK on the datastore).
            "vicd.image_disk": str(spec.image_disk),
            "guestinfo.vicd.id": spec.container_id,
            "guestinfo.vicd.transport": "serial",
            **record_chunks(spec.record),
        }

    def _annotation(self, spec: VMSpec) -> str:
        return _annotation(spec.name, spec.container_id, spec.record)

    async def rename(self, container_id: str, name: str, record: dict[str, Any]) -> None:
        """``docker rename``: the VM's name, annotation and stored record follow
        (Rename_Task, then one ReconfigVM_Task), so vCenter admins and a daemon
        recovering from vCenter see the new name."""
        moid = self._moid(container_id)
        if moid is None:
            return
        st = self.view.vms.get(moid) if self.view else None
        want = record_chunks(record)
        stale = {k: "" for k in (st.extra if st else {})
                 if k.startswith(RECORD_KEY) and k not in want}
        cfg = vim.vm.ConfigSpec(
            annotation=_annotation(name, container_id, record),
            extraConfig=[vim.option.OptionValue(key=k, value=v)
                         for k, v in {**stale, **want}.items()])

        def run() -> None:
            vm = self._vm(moid)
            new = f"{name}-{container_id[:12]}"
            self.client.wait_task(self.client.call(lambda: vm.Rename_Task(new)))
            self._reconfig(vm, cfg)

        try:
            await asyncio.to_thread(run)
        except (vmodl.MethodFault, VSphereError, *CONNECTION_ERRORS) as e:
            # The container is renamed all the same; the next start stores the record.
            log.warning("vsphere: cannot rename the VM of %s: %s", container_id[:12],
                        fault_message(e))

    async def create(self, spec: VMSpec) -> None:
        _refuse_published_ports(spec)
        moid = await self._with_infra(lambda infra: self._create_sync(infra, spec))
        self.moids[spec.container_id] = moid

    async def _with_infra(self, fn: Callable[[Infra], T]) -> T:
        """Run ``fn`` in a thread; once more with fresh inventory if a server restart
        made our cached objects stale."""
        def run() -> T:
            infra = self._infra_sync()
            try:
                return fn(infra)
            except vmodl.fault.ManagedObjectNotFound as e:
                # Our folder, pool or parent vanished (deleted, or a server that
                # restarted without them): find or make them again, once.
                log.info("vsphere: %s; resolving the inventory again", fault_message(e))
                with self._sync_lock:
                    self.infra = None
                self.parents.clear()
                return fn(self._infra_sync())
        return await asyncio.to_thread(run)

    def _create_sync(self, infra: Infra, spec: VMSpec) -> str:
        st = self.view.by_container(spec.container_id) if self.view else None
        if st is not None:
            return st.moid  # a retried create: the VM is there already
        name = self.vm_name(spec)
        extra = self._extra(spec)
        disk_changes = []
        if infra.ds_name:
            # The image's base disk, uploaded once; the VM gets a child disk of
            # it of its own, its root disk (the container's writes).
            image_vmdk = self.files.ensure_image(
                spec.image_id, spec.image_disk, self.settings.datacenter, infra.ds_name,
                infra.datacenter, adapter_type(infra.devices))
            extra["vicd.image_vmdk"] = image_vmdk
            disk_changes = [root_disk_change(infra.devices, image_vmdk, infra.ds_name)]
        # An instant clone runs from birth; a container with volumes boots cold
        # with its disks attached at start anyway (see _attach_volumes), so it
        # gets a powered-off linked clone and no power cycle.
        if self.instant is not False and not _has_volumes(spec):
            try:
                parent = self._ensure_parent(infra, spec.cpus, spec.memory_mb)
                ic = vim.vm.InstantCloneSpec(
                    name=name,
                    location=vim.vm.RelocateSpec(pool=infra.pool, folder=infra.folder,
                                                 datastore=infra.datastore),
                    config=[vim.option.OptionValue(key=k, value=v) for k, v in extra.items()])
                vm = self._clone(infra, name, spec.container_id,
                                 lambda: parent.InstantClone_Task(spec=ic))
                self.instant = True
                # Instant clones inherit the parent's configuration: name the
                # container; its root disk is hot-added (the tether mounts it at run).
                self._reconfig(vm, vim.vm.ConfigSpec(annotation=self._annotation(spec),
                                                     deviceChange=disk_changes))
                self.powered_on.add(vm._moId)  # an instant clone runs from birth
                return vm._moId
            except NO_INSTANT_CLONE as e:
                if self.instant:
                    raise
                log.info("vsphere: no InstantClone on this server (%s); using linked clones",
                         fault_message(e))
                self.instant = False
        cs = vim.vm.CloneSpec(
            location=vim.vm.RelocateSpec(pool=infra.pool, datastore=infra.datastore,
                                         diskMoveType="createNewChildDiskBacking"),
            snapshot=infra.snapshot, powerOn=False, template=False,
            config=vim.vm.ConfigSpec(
                numCPUs=spec.cpus, memoryMB=spec.memory_mb,
                annotation=self._annotation(spec),
                extraConfig=[vim.option.OptionValue(key=k, value=v) for k, v in extra.items()],
                deviceChange=self._device_changes(infra) + disk_changes))
        vm = self._clone(infra, name, spec.container_id,
                         lambda: infra.template.CloneVM_Task(folder=infra.folder, name=name,
                                                             spec=cs))
        return vm._moId

    def _clone(self, infra: Infra, name: str, cid: str, start: Callable[[], Any]) -> Any:
        """Clone without ever making two VMs: when a request's fate is unknown
        (timeout, dropped connection), look for the VM by name before retrying."""
        c = self.client
        for attempt in range(3):
            try:
                task = c.call(start, retry=False)
                return c.wait_task(task)
            except vim.fault.DuplicateName:
                found = c.find_child(infra.folder, name)
                if found is not None and self._is_ours(found, cid):
                    return found
                raise VSphereError(f"vsphere: a VM named {name!r} exists already") from None
            except (vim.fault.NotAuthenticated, *CONNECTION_ERRORS) as e:
                if attempt == 2:
                    raise VSphereError(f"vsphere: clone of {name} failed: "
                                       f"{fault_message(e)}") from None
                log.info("vsphere: clone of %s interrupted (%s); checking before retrying",
                         name, type(e).__name__)
                c._relogin_until_ok()
                found = c.find_child(infra.folder, name)
                if found is not None and self._is_ours(found, cid):
                    return found
        raise AssertionError("unreachable")

    def _is_ours(self, vm: Any, cid: str) -> bool:
        extra = {o.key: o.value for o in self.client.props(vm, ["config.extraConfig"]).get(
            "config.extraConfig") or []}
        return extra.get("vicd.id") == cid

    def _ensure_parent(self, infra: Infra, cpus: int, memory_mb: int) -> Any:
        """The powered-on parent of one shape's instant clones (the tether in it freezes)."""
        name = f"vicd-parent-{cpus}cpu-{memory_mb}mb"
        c = self.client
        cached = self.parents.get(name)
        if cached is not None and cached[1] == infra.generation:
            st = self.view.vms.get(cached[0]) if self.view else None
            if st is None or st.power == ON:
                return self._vm(cached[0])  # known for this session: no round trip
        found = c.find_child(infra.folder, name)
        if found is not None:
            if c.props(found, ["runtime.powerState"]).get("runtime.powerState") != ON:
                c.wait_task(c.call(lambda: found.PowerOnVM_Task()))
            self.parents[name] = (found._moId, infra.generation)
            return found
        cs = vim.vm.CloneSpec(
            location=vim.vm.RelocateSpec(pool=infra.pool, datastore=infra.datastore,
                                         diskMoveType="createNewChildDiskBacking"),
            snapshot=infra.snapshot, powerOn=True, template=False,
            config=vim.vm.ConfigSpec(
                numCPUs=cpus, memoryMB=memory_mb,
                annotation=f"vicd instant-clone parent ({cpus} CPU, {memory_mb} MB)",
                extraConfig=[vim.option.OptionValue(key="guestinfo.vicd.parent", value="1"),
                             vim.option.OptionValue(key="vicd.role", value="parent")],
                deviceChange=self._device_changes(infra)))
        log.info("vsphere: creating instant-clone parent %s", name)
        vm = self._clone(infra, name, "", lambda: infra.template.CloneVM_Task(
            folder=infra.folder, name=name, spec=cs))
        self.parents[name] = (vm._moId, infra.generation)
        return vm

    def _reconfig(self, vm: Any, spec: Any) -> None:
        self.client.wait_task(self.client.call(lambda: vm.ReconfigVM_Task(spec)))

    # --- power ------------------------------------------------------------------------------

    async def power(self, moid: str, op: str) -> None:
        def run() -> None:
            vm = self._vm(moid)
            start = {"on": vm.PowerOnVM_Task, "off": vm.PowerOffVM_Task,
                     "suspend": vm.SuspendVM_Task}[op]
            try:
                self.client.wait_task(self.client.call(start))
            except vim.fault.InvalidPowerState:
                pass  # already there
            except vmodl.fault.ManagedObjectNotFound:
                if op != "off":
                    raise VSphereError("vsphere: the container's VM no longer exists") from None
        await asyncio.to_thread(run)

    async def is_off(self, moid: str) -> bool:
        def run() -> bool:
            try:
                return self.client.props(self._vm(moid), ["runtime.powerState"]).get(
                    "runtime.powerState") in (OFF, None)
            except vmodl.fault.ManagedObjectNotFound:
                return True
        return await asyncio.to_thread(run)

    async def ensure_off(self, moid: str, timeout: float = 15) -> None:
        """Wait (reading the power state itself: the view may report a stale
        power-off) until the guest has powered the VM off; then power it off."""
        def run() -> bool:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    state = self.client.props(self._vm(moid), ["runtime.powerState"]).get(
                        "runtime.powerState")
                except vmodl.fault.ManagedObjectNotFound:
                    return True
                if state in (OFF, None):  # None: the VM is gone
                    return True
                time.sleep(0.5)
            log.warning("vsphere: VM %s did not power off; powering it off", moid)
            return False
        if not await asyncio.to_thread(run):
            await self.power(moid, "off")

    async def note_exit(self, moid: str, code: int, detach: bool = False) -> None:
        """Keep the exit code with the VM, for a daemon that recovers from vCenter;
        with ``detach``, take the volume disks off the VM (powered off) in the same
        reconfigure."""
        await self.reconfigure_off(moid, detach, extra={
            "vicd.exit_code": str(code), "vicd.finished_at": _rfc3339(time.time())})

    async def reconfigure_off(self, moid: str, detach: bool,
                              extra: dict[str, str] | None = None) -> None:
        """One ReconfigVM_Task on a VM that is off: extraConfig values and/or the
        volume disks taken off (their files stay)."""
        spec = vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key=k, value=v)
                                              for k, v in (extra or {}).items()])

        def run() -> None:
            vm = self._vm(moid)
            if detach:
                devices = self.client.props(vm, ["config.hardware.device"]).get(
                    "config.hardware.device") or []
                spec.deviceChange = detach_changes(devices)
            self._reconfig(vm, spec)

        try:
            await asyncio.to_thread(run)
        except (vmodl.MethodFault, VSphereError, *CONNECTION_ERRORS) as e:
            log.warning("vsphere: cannot reconfigure the stopped VM: %s", fault_message(e))

    # --- start ------------------------------------------------------------------------------

    def _moid(self, cid: str) -> str | None:
        st = self.view.by_container(cid) if self.view else None
        return st.moid if st else self.moids.get(cid)

    def _power_of(self, moid: str) -> str:
        if moid in self.powered_on:
            self.powered_on.discard(moid)
            return ON
        st = self.view.vms.get(moid) if self.view else None
        if st is not None:
            return st.power
        return str(self.client.props(self._vm(moid), ["runtime.powerState"]).get(
            "runtime.powerState", ""))

    async def start(self, spec: VMSpec, sink: OutputSink) -> VSphereVM:
        cid = spec.container_id
        if spec.binds:
            # Refused rather than silently left out (docs/vsphere.md).
            raise InvalidParameter("the vsphere backend does not support bind mounts: the "
                                   "container's VM runs on an ESXi host and cannot see this "
                                   "machine's files; use a vmdk volume (docker volume create "
                                   "-d vmdk NAME)")
        if any(d.fmt != "datastore" for d in spec.disks):
            raise InvalidParameter("on the vsphere backend volumes need the vmdk driver "
                                   "(docker volume create -d vmdk NAME)")
        moid = self._moid(cid)
        if moid is None:  # destroyed meanwhile: make it again
            await self.create(spec)
            moid = self.moids[cid]
        st = self.view.vms.get(moid) if self.view else None
        want = record_chunks(spec.record)
        if st is not None and any(st.extra.get(k) != v for k, v in want.items()):
            # The record changed since it was stored (rename, restart): refresh it.
            stale = {k: "" for k in st.extra if k.startswith(RECORD_KEY) and k not in want}
            cfg = vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key=k, value=v)
                                                 for k, v in {**stale, **want}.items()])
            await asyncio.to_thread(self._reconfig, self._vm(moid), cfg)
        # NICs on driver networks (spec.nics[0] is the built-in one: the template's
        # network): added before power-on, or hot-added to a running instant clone;
        # ones left from an earlier run on other networks go.
        nics = spec.nics[1:]
        if nics or (st is not None and nic_slots_of(st.extra)):
            await asyncio.to_thread(self.nics.apply, self._vm(moid), nics, set(), True)
        power = await asyncio.to_thread(self._power_of, moid)
        if spec.disks:
            await asyncio.to_thread(self._attach_volumes, moid, spec.disks, power)
            power = OFF
        self.listener.forget(cid)  # a connection from an earlier run is stale
        if power != ON:
            await self.power(moid, "on")
        t0 = time.monotonic()
        arrival = await self._arrive(cid, spec)
        if arrival.hello.get("state") != "waiting":
            # A guest left over from an earlier run: boot it afresh.
            await arrival.conn.close()
            await self.power(moid, "off")
            await self.power(moid, "on")
            arrival = await self._arrive(cid, spec)
        conn = arrival.conn
        vm = VSphereVM(self, cid, moid, conn, spec.ephemeral, volumes=bool(spec.disks))
        channel = arrival.attach(sink)
        config = {"root": "/dev/vda", "fstype": "ext4", "hostname": spec.hostname,
                  "time_ns": time.time_ns(), "seed": base64.b64encode(os.urandom(64)).decode(),
                  # The first NIC is the port group's (vSphere's network, not vicd's
                  # slirp); NICs on driver networks (nsx) get their endpoint's address.
                  "network": {"interfaces": [slot_iface(n) for n in spec.nics[1:]],
                              "hosts": getattr(spec, "hosts", ""),
                              "resolv": getattr(spec, "resolv", "")},
                  "mounts": guest_mounts(spec.disks) + [
                      {"device": "tmpfs", "fstype": "tmpfs", "target": target, "options": opts}
                      for target, opts in spec.tmpfs],
                  **process_fields(spec.process),
                  "hold": spec.hold}
        try:
            reply = await conn.request("run", config=config, timeout=30)
        except TetherError as e:
            code = (getattr(e, "reply", None) or {}).get("exit_code", 1)
            await conn.close()
            asyncio.create_task(self.power(moid, "off"))
            raise StartError(_runtime_error(e.message), int(code)) from None
        vm.main = TetherProcess(vm.conn, 1, channel, int(reply.get("pid", 0)), (vm.off,))
        self.vms[cid] = vm
        if self.view and self.view.vms.get(moid) and self.view.vms[moid].power == OFF:
            pass  # the view lags; the power-on above is authoritative
        log.info("container %s: VM %s %s, guest up in %.0f ms", cid[:12], moid,
                 self.vm_name(spec), (time.monotonic() - t0) * 1000)
        return vm

    def _attach_volumes(self, moid: str, disks: list[Any], power: str) -> None:
        """Attach the volume disks to the powered-off VM (one ReconfigVM_Task).
        A fresh instant clone runs already, its tether waiting for ``run``:
        ESXi could hot-add the disks, the host emulation's QEMU cannot, so it
        is powered off and boots cold with them (docs/vsphere.md)."""
        vm = self._vm(moid)
        c = self.client
        if power != OFF:
            with contextlib.suppress(vim.fault.InvalidPowerState):
                c.wait_task(c.call(lambda: vm.PowerOffVM_Task()))
        devices = c.props(vm, ["config.hardware.device"]).get("config.hardware.device") or []
        self._reconfig(vm, vim.vm.ConfigSpec(deviceChange=attach_changes(devices, disks)))

    async def _arrive(self, cid: str, spec: VMSpec) -> Any:
        try:
            return await self.listener.wait_for(cid, self.settings.boot_timeout)
        except TetherError as e:
            raise VSphereError(f"the container VM did not come up: {e.message}") from None

    # --- reattach, recovery, removal ----------------------------------------------------

    async def reattach(self, container_id: str, sink: OutputSink) -> VSphereVM | None:
        st = self.view.by_container(container_id) if self.view else None
        if st is None or st.power == OFF:
            return None
        try:
            arrival = await self.listener.wait_for(container_id, 30)
        except TetherError as e:
            log.warning("container %s: %s; powering its VM off", container_id[:12], e.message)
            await self.power(st.moid, "off")
            return None
        if arrival.hello.get("state") == "waiting":
            # The daemon died between boot and run: that start never happened.
            await arrival.conn.close()
            await self.power(st.moid, "off")
            return None
        vm = VSphereVM(self, container_id, st.moid, arrival.conn, False)
        channel = arrival.attach(sink)
        vm.main = TetherProcess(vm.conn, 1, channel, int(arrival.hello.get("pid", 0) or 0),
                                (vm.off,))
        self.vms[container_id] = vm
        return vm

    async def recover_containers(self) -> list[dict[str, Any]]:
        out = []
        for st in list(self.view.vms.values()) if self.view else []:
            rec = read_record(st.extra)
            if not st.container_id or rec is None:
                continue
            rec["id"] = st.container_id
            code = st.extra.get("guestinfo.vicd.exit_code") or st.extra.get("vicd.exit_code")
            state: dict[str, Any] = {"status": "created"}
            if st.power != OFF:
                boot = st.raw.get("summary.runtime.bootTime")
                state = {"status": "paused" if st.power == SUSPENDED else "running",
                         "started_at": _rfc3339(boot.timestamp() if boot else time.time())}
                rec["has_been_started"] = True
            elif code is not None:
                state = {"status": "exited", "exit_code": int(code),
                         "finished_at": st.extra.get("vicd.finished_at",
                                                     "0001-01-01T00:00:00Z")}
                rec["has_been_started"] = True
            rec["state"] = state
            out.append(rec)
        return out

    async def running_ids(self) -> set[str]:
        if not self.view:
            return set()
        return {st.container_id for st in self.view.vms.values()
                if st.container_id and st.power != OFF}

    async def destroy(self, container_id: str) -> None:
        await self.remove(container_id)

    async def remove(self, container_id: str) -> None:
        moid = self._moid(container_id)
        self.listener.forget(container_id)
        self.moids.pop(container_id, None)
        if moid is None:
            return
        self.removing.add(container_id)

        def run() -> None:
            vm = self._vm(moid)
            c = self.client
            try:
                with contextlib.suppress(vim.fault.InvalidPowerState):
                    if self._power_of(moid) != OFF:
                        c.wait_task(c.call(lambda: vm.PowerOffVM_Task()))
                # Destroy_Task deletes every disk of the VM: take the volumes off
                # first (normally done when it stopped; not after a crash).
                devices = c.props(vm, ["config.hardware.device"]).get(
                    "config.hardware.device") or []
                if volume_disks(devices):
                    self._reconfig(vm, vim.vm.ConfigSpec(deviceChange=detach_changes(devices)))
                c.wait_task(c.call(lambda: vm.Destroy_Task()))
            except vmodl.fault.ManagedObjectNotFound:
                pass  # gone already

        try:
            await asyncio.to_thread(run)
        finally:
            asyncio.get_running_loop().call_later(30, self.removing.discard, container_id)

    # --- what the view reports --------------------------------------------------------------

    def _on_change(self, kind: str, before: VMState | None, after: VMState | None) -> None:
        cid = (after or before).container_id if (after or before) else ""
        if not cid:
            return
        vm = self.vms.get(cid)
        if kind == "leave" or (after is not None and after.power == OFF):
            # Events reach the loop late: trust the view's newest state, so a
            # stale power-off cannot end a VM that was started again.
            now = self.view.vms.get((after or before).moid) if self.view else None
            gone = now is None or now.power == OFF
            if (gone and vm is not None and vm.moid == (after or before).moid
                    and not vm.off.done()):
                vm.off.set_result(None)
        if kind == "leave" and cid not in self.removing and self.removed_callback:
            log.info("container %s: its VM was destroyed outside vicd", cid[:12])
            asyncio.ensure_future(self.removed_callback(cid))


def _annotation(name: str, cid: str, record: dict[str, Any]) -> str:
    return (f"vicd container {name} ({cid})\n"
            f"image {record.get('image_ref') or ''} ({record.get('image_id') or ''})")


def _refuse_published_ports(spec: VMSpec) -> None:
    """-p/-P ask the daemon's host to forward its ports; on vSphere the
    container is a VM with an address of its own on the port group, where its
    ports are reachable as they are (docs/vsphere.md, "Ports")."""
    hc = spec.record.get("host_config") or {}
    exposed = (spec.record.get("config") or {}).get("ExposedPorts")
    if any(hc.get("PortBindings") or {}) or (hc.get("PublishAllPorts") and exposed):
        raise InvalidParameter(
            "the vsphere backend does not publish ports (-p/-P): each container is a VM "
            "with its own address on the port group, where its ports are reachable "
            "directly; run it without -p")


def _has_volumes(spec: VMSpec) -> bool:
    return any(m.get("Type") == "volume" for m in spec.record.get("mounts") or [])


def _pool_spec() -> Any:
    def alloc() -> Any:
        return vim.ResourceAllocationInfo(
            reservation=0, expandableReservation=True, limit=-1,
            shares=vim.SharesInfo(level=vim.SharesInfo.Level.normal, shares=0))
    return vim.ResourceConfigSpec(cpuAllocation=alloc(), memoryAllocation=alloc())


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


def _runtime_error(msg: str) -> str:
    return ("failed to create task for container: failed to create shim task: "
            f"OCI runtime create failed: {msg}: unknown")
