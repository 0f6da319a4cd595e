"""Host emulation for the vCenter simulator: the part of ESXi that runs VMs.

vcsim only keeps inventory. This watches it (PropertyCollector, like the
daemon) and, for every container VM (extraConfig ``vicd.id``) powered on,
boots the same microVM the embedded backend uses (plugins/microvm/qemu.py:
the guest from .cache/guest, the VM's root disk: its child disk of the
image's VMDK uploaded to the datastore (made a real delta VMDK on first
boot; without one, a qcow2 overlay over the daemon's local ext4,
``vicd.image_disk``); then the VM's
independent-persistent disks, docker volumes, straight from the datastore
files). The guest's channel connects
where the VM's VirtualSerialPort URI points (``tcp://host:port``, QEMU as
the client, reconnecting like ESXi does), and the kernel command line tells
the tether its id (on ESXi: guestinfo). When the guest ends, the simulated
VM is powered off; a VM powered off, suspended, resumed or destroyed in the
simulator stops, pauses, continues or kills its microVM.

    python contrib/vcsim/hostemu.py --url http://u:p@127.0.0.1:PORT/sdk \\
        --guest-dir .cache/guest --work /tmp/hostemu
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hostnet import HostSwitch
from pyVmomi import vim

from vicd.plugins.microvm.qemu import QemuProcess, VMFiles, build_cmdline
from vicd.plugins.microvm.qmp import QMP, QMPError
from vicd.plugins.vsphere.client import VimClient
from vicd.plugins.vsphere.disks import root_disk, volume_disks
from vicd.plugins.vsphere.settings import VSphereSettings
from vicd.plugins.vsphere.view import PROPS, FolderView, VMState

log = logging.getLogger("hostemu")


class HostEmu:
    def __init__(self, url: str, guest_dir: Path, work: Path, accel: str) -> None:
        settings = VSphereSettings(url=url)
        settings._load_credentials()
        self.client = VimClient(settings, "hostemu")
        self.watch = VimClient(settings, "hostemu-view")
        self.guest_dir = guest_dir
        self.work = work
        self.accel = accel
        self.qemus: dict[str, QemuProcess] = {}
        self.paused: set[str] = set()
        self.stopping: set[str] = set()
        self.booting: set[str] = set()
        self.booted_for: dict[str, str] = {}  # VM id -> the bootTime its microVM serves
        self.booted_disks: dict[str, tuple[str, ...]] = {}  # VM id -> its volume files
        self.view: FolderView | None = None
        # vNICs on port groups (NSX segments): bridges and taps (root only).
        self.switch = HostSwitch(work) if HostSwitch.usable() else None

    async def run(self) -> None:
        await asyncio.to_thread(self.client.connect)
        await asyncio.to_thread(self.watch.connect)
        if self.switch is not None:
            await asyncio.to_thread(self.switch.start)
        loop = asyncio.get_running_loop()
        # The whole inventory: container VMs may live in any daemon's folder.
        self.view = FolderView(self.watch, lambda c: c.content.rootFolder, loop, self._changed,
                               props=[*PROPS, "config.hardware.device",
                                      "config.hardware.numCPU", "config.hardware.memoryMB"])
        self.view.start()
        await asyncio.to_thread(self.view.synced.wait)
        for st in list(self.view.vms.values()):
            self._changed("enter", None, st)
        log.info("hostemu: watching %s", self.client.settings.safe_url)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            # A safety net for updates lost over session expiry or reconnects
            # (reads the view only: no SOAP).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1)
            for moid, st in list(self.view.vms.items()):
                if st.container_id:
                    self._reconcile(moid)
        self.kill_all()

    def _changed(self, kind: str, before: VMState | None, after: VMState | None) -> None:
        st = after or before
        if st is not None and st.container_id:
            self._reconcile(st.moid)

    def _reconcile(self, moid: str) -> None:
        """Make the microVM match the VM's newest state. Events may be stale or
        coalesced, so act on the view, and tell power-ons apart by bootTime."""
        st = self.view.vms.get(moid) if self.view else None
        q = self.qemus.get(moid)
        if st is None:
            if q:
                self._kill(moid)
            elif moid not in self.booting:
                shutil.rmtree(self.work / moid, ignore_errors=True)
            return
        boot_id = str(st.raw.get("summary.runtime.bootTime"))
        if st.power == "poweredOn":
            if q is None:
                if moid not in self.booting and self.booted_for.get(moid) != boot_id:
                    self.booting.add(moid)  # now: more events may come before _boot runs
                    self.booted_for[moid] = boot_id
                    asyncio.ensure_future(self._boot(st))
            else:
                if (self.booted_for.get(moid) != boot_id and moid not in self.paused
                        and _volume_files(st) != self.booted_disks.get(moid)):
                    # A power cycle whose power-off the view coalesced away, with
                    # other disks now: boot again with them (the end of the old
                    # microVM reconciles once more).
                    self._kill(moid)
                    return
                # A running microVM is never rebooted on a new bootTime otherwise:
                # that is also what a resume from suspended looks like.
                self.booted_for[moid] = boot_id
                if self.switch is not None:
                    self.switch.plumb(moid, st.raw.get("config.hardware.device") or [],
                                      st.extra)
                if moid in self.paused:
                    asyncio.ensure_future(self._qmp(moid, "cont"))
        elif st.power == "suspended":
            if q is not None and moid not in self.paused:
                asyncio.ensure_future(self._qmp(moid, "stop"))
        elif q is not None:
            self._kill(moid)

    def _kill(self, moid: str) -> None:
        q = self.qemus.get(moid)
        if q:
            self.stopping.add(moid)
            q.kill()

    async def _qmp(self, moid: str, cmd: str) -> None:
        try:
            qmp = await QMP.connect(str(VMFiles(self.work / moid).qmp))
            try:
                await qmp.execute(cmd)
            finally:
                qmp.close()
        except (QMPError, OSError) as e:
            log.warning("hostemu: %s %s: %s", moid, cmd, e)
            return
        if cmd == "stop":
            self.paused.add(moid)
        else:
            self.paused.discard(moid)
        self._reconcile(moid)

    async def _boot(self, st: VMState) -> None:
        moid = st.moid
        try:
            if not await self._boot_vm(st):
                self.booted_for.pop(moid, None)  # not ready (devices lag): the next event retries
        except Exception:  # noqa: BLE001 - logged; the reconcile loop tries again
            log.exception("hostemu: booting %s failed", moid)
            self.booted_for.pop(moid, None)
        finally:
            self.booting.discard(moid)

    async def _boot_vm(self, st: VMState) -> bool:
        moid = st.moid
        if self.view is not None:
            st = self.view.vms.get(moid, st)  # the newest picture, not the event's
        files = VMFiles(self.work / moid)
        files.dir.mkdir(parents=True, exist_ok=True)
        # The VM's devices as they are now (ESXi knows its VM's configuration
        # at power-on; the view may lag behind a reconfigure just before).
        devices = await asyncio.to_thread(self._devices, moid)
        if devices is None:
            devices = st.raw.get("config.hardware.device") or []
        if st.extra.get("vicd.image_vmdk"):
            # The root disk: the VM's child disk of the image's base disk, both on
            # the datastore. ESXi would see it hot-added to a running instant
            # clone; QEMU's microvm cannot hot-add, so the boot waits for it.
            root = await asyncio.to_thread(self._root_disk, moid, devices)
            if root is None:
                return False
        else:
            # A daemon without a datastore disk: an overlay of its local ext4.
            root = (files.root_disk, "qcow2", False)
            if not files.root_disk.exists():
                r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                                    "-b", st.extra.get("vicd.image_disk", ""),
                                    str(files.root_disk)], capture_output=True, text=True)
                if r.returncode != 0:
                    log.error("hostemu: %s: cannot make the disk: %s", moid, r.stderr.strip())
                    return False
        # Volume disks (independent-persistent VMDKs on the datastore) follow
        # the root disk, in unit-number order: vdb, vdc, ... in the guest.
        disks = [root]
        for d in volume_disks(devices):
            local = await asyncio.to_thread(self._datastore_file, d.backing.fileName)
            if local is None or not local.exists():
                log.error("hostemu: %s: volume disk %s not found", moid, d.backing.fileName)
                return False
            disks.append((local, "vmdk", False))
        uri = _serial_uri(devices)
        if not uri:
            log.warning("hostemu: %s has no network serial port (yet)", moid)
            return False
        u = urlsplit(uri)
        mem = min(max(int(st.raw.get("config.hardware.memoryMB") or 256), 128), 2048)
        cpus = min(max(int(st.raw.get("config.hardware.numCPU") or 1), 1), 2)
        taps = await asyncio.to_thread(self.switch.open_taps, moid) if self.switch else []
        argv = build_cmdline(files=files, kernel=self.guest_dir / "vmlinux",
                             initrd=self.guest_dir / "initrd.img", accel=self.accel,
                             memory_mb=mem, cpus=cpus, disks=disks, taps=taps)
        for i, a in enumerate(argv):
            if a.startswith("socket,id=ctl,"):
                # ESXi's side of a URI-backed serial port, direction client.
                argv[i] = f"socket,id=ctl,host={u.hostname},port={u.port},reconnect=1"
            if i > 0 and argv[i - 1] == "-append":
                argv[i] = f"{a} vicd.id={st.container_id} vicd.transport=virtio"
        for sock in (files.ctl, files.qmp):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        try:
            q = QemuProcess.spawn(argv, files, pass_fds=tuple(taps))
        finally:
            for fd in taps:
                os.close(fd)
        self.qemus[moid] = q
        self.booted_disks[moid] = tuple(d.backing.fileName for d in volume_disks(devices))
        self.booting.discard(moid)
        self.stopping.discard(moid)
        self.paused.discard(moid)
        log.info("hostemu: %s (%s) booted, pid %d, serial %s, disks %s", moid, st.name, q.pid,
                 uri, " ".join(str(p) for p, _, _ in disks))
        self._reconcile(moid)  # vNICs the VM has already: on their bridges
        await q.wait()
        self.qemus.pop(moid, None)
        if self.switch is not None:
            self.switch.forget(moid)
        if moid in self.stopping:
            self.stopping.discard(moid)
            self._reconcile(moid)
            return True
        # The guest powered itself off: so does the VM.
        try:
            tail = files.console.read_text(errors="replace")[-300:].strip()
        except OSError:
            tail = ""
        log.info("hostemu: %s guest ended; powering the VM off (console: ...%s)", moid,
                 tail.replace("\n", " | "))
        vm = vim.VirtualMachine(moid, self.client.si._stub)
        try:
            await asyncio.to_thread(
                lambda: self.client.wait_task(self.client.call(vm.PowerOffVM_Task)))
        except Exception as e:  # noqa: BLE001 - the VM may be gone or off already
            log.info("hostemu: power off %s: %s", moid, type(e).__name__)
        self._reconcile(moid)
        return True

    def _devices(self, moid: str) -> list[Any] | None:
        """The VM's devices read now (None if it is gone)."""
        vm = vim.VirtualMachine(moid, self.client.si._stub)
        devices = self.client.props(vm, ["config.hardware.device"]).get("config.hardware.device")
        return list(devices) if devices else None

    def _root_disk(self, moid: str, devices: Any) -> tuple[Path, str, bool] | None:
        """The child disk's file, made a real delta VMDK over the image's base
        the first time (the simulator creates an empty file, as for any new disk)."""
        disk = root_disk(devices)
        if disk is None:
            return None  # not attached yet
        child = self._datastore_file(disk.backing.fileName)
        parent = self._datastore_file(disk.backing.parent.fileName)
        if child is None or parent is None or not parent.exists():
            log.error("hostemu: %s: root disk %s or its parent missing", moid,
                      disk.backing.fileName)
            return None
        if not child.exists() or child.stat().st_size == 0:
            r = subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-F", "vmdk", "-b",
                                str(parent), str(child)], capture_output=True, text=True)
            if r.returncode != 0:
                log.error("hostemu: %s: cannot make the child disk: %s", moid,
                          r.stderr.strip())
                return None
        return (child, "vmdk", False)

    def _datastore_file(self, ds_path: str) -> Path | None:
        """``[ds] path`` to a local file: vcsim's datastores are local directories."""
        name, _, rel = ds_path.partition("] ")
        name = name.lstrip("[")
        c = self.client
        view = c.call(lambda: c.content.viewManager.CreateContainerView(
            c.content.rootFolder, [vim.Datastore], True))
        try:
            for ds in view.view:
                p = c.props(ds, ["name", "info.url"])
                if p.get("name") == name and p.get("info.url"):
                    return Path(p["info.url"]) / rel
        finally:
            view.Destroy()
        return None

    def kill_all(self) -> None:
        for q in self.qemus.values():
            q.kill()
        if self.switch is not None:
            self.switch.close()


def _volume_files(st: VMState) -> tuple[str, ...]:
    return tuple(d.backing.fileName
                 for d in volume_disks(st.raw.get("config.hardware.device") or []))


def _serial_uri(devices: Any) -> str:
    for d in devices or []:
        if isinstance(d, vim.vm.device.VirtualSerialPort) and isinstance(
                d.backing, vim.vm.device.VirtualSerialPort.URIBackingInfo):
            return str(d.backing.serviceURI)
    return ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--guest-dir", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--accel", default="tcg")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    emu = HostEmu(a.url, a.guest_dir, a.work, a.accel)
    try:
        asyncio.run(emu.run())
    finally:
        emu.kill_all()  # the microVMs run in sessions of their own: end them with us
    return 0


if __name__ == "__main__":
    sys.exit(main())
