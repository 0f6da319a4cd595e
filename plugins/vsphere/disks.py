"""The disks of a container VM: its root, a child disk of the image's base
disk; docker volumes (VMDKs on a datastore) attached as independent-persistent
disks, and detached again, with ``ReconfigVM_Task``.

Independent-persistent disks are left out of snapshots, so an instant clone
or a linked clone never captures a volume, and detaching (a ``remove``
device change without ``fileOperation``) keeps the file: ``docker rm``
destroys the VM, never the volume. The guest finds volume disks in the
order of their unit numbers on the VM's SCSI controller, after its root
disk; the run request names them (``/dev/vdb``, ... in the host emulation,
whose QEMU attaches them as virtio disks in that order).
"""

from __future__ import annotations

from typing import Any

from pyVmomi import vim

from vicd.backend import DiskSpec
from vicd.plugins.vsphere.client import VSphereError

VOLUME_MODE = "independent_persistent"
SCSI_SELF_UNIT = 7  # a SCSI controller's own unit number
UNITS = [u for u in range(16) if u != SCSI_SELF_UNIT]
op = vim.vm.device.VirtualDeviceSpec.Operation


def is_volume(dev: Any) -> bool:
    return (isinstance(dev, vim.vm.device.VirtualDisk)
            and getattr(dev.backing, "diskMode", "") == VOLUME_MODE)


def volume_disks(devices: list[Any]) -> list[Any]:
    """The volume disks attached, in the order the guest sees them."""
    return sorted((d for d in devices if is_volume(d)),
                  key=lambda d: (d.controllerKey, d.unitNumber or 0))


def scsi_controller(devices: list[Any]) -> Any:
    for d in devices:
        if isinstance(d, vim.vm.device.VirtualSCSIController):
            return d
    raise VSphereError("vsphere: the template VM has no SCSI controller to attach "
                       "volume disks to")


def adapter_type(devices: list[Any]) -> str:
    """The VirtualDiskAdapterType of the SCSI controller disks are put on."""
    if isinstance(scsi_controller(devices), vim.vm.device.VirtualBusLogicController):
        return "busLogic"
    return "lsiLogic"  # LSI Logic, LSI SAS and PVSCSI disks all say lsiLogic


def detach_changes(devices: list[Any]) -> list[Any]:
    """Remove the volume disks from the VM, keeping their files."""
    return [vim.vm.device.VirtualDeviceSpec(operation=op.remove, device=d)
            for d in volume_disks(devices)]


def attach_changes(devices: list[Any], disks: list[DiskSpec]) -> list[Any]:
    """Add ``disks`` (datastore paths) in order on free units of the SCSI
    controller; volume disks still attached (a crash) are detached first."""
    ctl = scsi_controller(devices)
    stale = {d.key for d in volume_disks(devices)}
    used = {d.unitNumber for d in devices
            if d.controllerKey == ctl.key and d.key not in stale}
    free = [u for u in UNITS if u not in used]
    if len(free) < len(disks):
        raise VSphereError(f"vsphere: no room for {len(disks)} volume disks on the VM's "
                           f"SCSI controller ({len(free)} free units)")
    changes = detach_changes(devices)
    for i, (d, unit) in enumerate(zip(disks, free, strict=False)):
        disk = vim.vm.device.VirtualDisk(
            key=-(100 + i), controllerKey=ctl.key, unitNumber=unit,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=str(d.path), diskMode=VOLUME_MODE, thinProvisioned=True))
        changes.append(vim.vm.device.VirtualDeviceSpec(operation=op.add, device=disk))
    return changes


def root_disk_change(devices: list[Any], image_vmdk: str, datastore: str) -> Any:
    """A new child (delta) disk of the image's base disk: the container's root,
    its writes its own, the base shared by every container of the image. An
    empty file name puts it in the VM's folder."""
    ctl = scsi_controller(devices)
    used = {d.unitNumber for d in devices if d.controllerKey == ctl.key}
    unit = next(u for u in UNITS if u not in used)
    disk = vim.vm.device.VirtualDisk(
        key=-99, controllerKey=ctl.key, unitNumber=unit,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName=f"[{datastore}]", diskMode="persistent", thinProvisioned=True,
            parent=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=image_vmdk, diskMode="persistent")))
    return vim.vm.device.VirtualDeviceSpec(operation=op.add, fileOperation="create",
                                           device=disk)


def root_disk(devices: list[Any]) -> Any:
    """The VM's child disk of an image (``root_disk_change``), if any."""
    for d in devices:
        if (isinstance(d, vim.vm.device.VirtualDisk)
                and getattr(d.backing, "parent", None) is not None
                and "vicd-images/" in (d.backing.parent.fileName or "")):
            return d
    return None


def guest_mounts(disks: list[DiskSpec]) -> list[dict[str, Any]]:
    """The run request's mounts for the volume disks, in attach order."""
    return [
        {"device": f"/dev/vd{chr(ord('b') + i)}", "fstype": "ext4", "target": d.target,
         "readonly": d.read_only, "copy_up": d.copy_up, "mkfs": d.mkfs}
        for i, d in enumerate(disks)
    ]
