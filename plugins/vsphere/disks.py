"""The disks of a container VM: docker volumes (VMDKs on a datastore) attached
as independent-persistent disks, and detached again, with ``ReconfigVM_Task``.

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


def guest_mounts(disks: list[DiskSpec]) -> list[dict[str, Any]]:
    """The run request's mounts for the volume disks, in attach order."""
    return [
        {"device": f"/dev/vd{chr(ord('b') + i)}", "fstype": "ext4", "target": d.target,
         "readonly": d.read_only, "copy_up": d.copy_up, "mkfs": d.mkfs}
        for i, d in enumerate(disks)
    ]
