"""Container VMs' vNICs on driver networks: a VirtualVmxnet3 per network, on a
distributed port group (an NSX segment as vCenter shows it).

The NIC backings come from network drivers (``NicSpec.backing``):

- ``{"kind": "nsx-segment", "logical_switch_uuid": ..., "attachment_id": ...}``
  from the ``nsx`` driver: NSX realizes a segment as a DVPortgroup whose
  ``config.logicalSwitchUuid`` is the segment's ``unique_id``; the vNIC's
  ``externalId`` is the segment port's VIF attachment id, which is how NSX
  binds the vNIC to that port (its tags, its firewall group).
- ``{"kind": "portgroup", "name": ...}``: any distributed port group by name.

Which NIC is which slot lives in the VM's extraConfig (``vicd.nic.<slot>`` =
MAC), so a restarted daemon (or ``docker network disconnect`` after one)
finds it. Every change is one ``ReconfigVM_Task`` (devices and extraConfig
together): at start (NICs added before power-on, or hot-added to a running
instant clone) and live for connect/disconnect; vSphere hot-adds and
hot-removes vmxnet3 NICs.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim, vmodl

from vicd.errors import InvalidParameter
from vicd.plugins.vsphere.client import VimClient, VSphereError

log = logging.getLogger(__name__)

NIC_KEY = "vicd.nic."
# vmxnet3: 10 NICs per VM; the first is the built-in one (the template's network).
NIC_SLOTS = 9


@dataclass
class PortGroup:
    ref: Any
    key: str
    name: str
    switch_uuid: str


def nic_slots_of(extra: dict[str, str]) -> dict[int, str]:
    """slot -> MAC of the driver NICs recorded in a VM's extraConfig."""
    out = {}
    for k, v in extra.items():
        if k.startswith(NIC_KEY) and v and k[len(NIC_KEY):].isdigit():
            out[int(k[len(NIC_KEY):])] = v.lower()
    return out


class NicPlugger:
    def __init__(self, client: VimClient, realize_timeout: float = 30.0) -> None:
        self.client = client
        self.realize_timeout = realize_timeout
        self._cache: dict[str, tuple[PortGroup, int]] = {}  # backing id -> (pg, generation)
        self._locks: dict[str, threading.Lock] = {}  # VM id -> its NIC changes, one at a time
        self._locks_lock = threading.Lock()

    # --- port groups ----------------------------------------------------------------------

    def portgroup(self, backing: dict[str, Any]) -> PortGroup:
        kind = backing.get("kind")
        if kind == "nsx-segment":
            field, want = "config.logicalSwitchUuid", str(backing.get("logical_switch_uuid", ""))
            what = f"NSX segment {backing.get('segment_path', '')} (logicalSwitchUuid {want})"
        elif kind == "portgroup":
            field, want = "name", str(backing.get("name", ""))
            what = f"port group {want!r}"
        else:
            raise InvalidParameter(f"vsphere: cannot attach a NIC of kind {kind!r}")
        cached = self._cache.get(f"{field}={want}")
        if cached is not None and cached[1] == self.client.generation:
            return cached[0]
        # NSX realizes a segment in vCenter asynchronously: wait for its port group.
        deadline = time.monotonic() + self.realize_timeout
        while True:
            pg = self._find(field, want)
            if pg is not None:
                self._cache[f"{field}={want}"] = (pg, self.client.generation)
                return pg
            if time.monotonic() > deadline:
                raise VSphereError(f"vsphere: no distributed port group for {what} appeared "
                                   f"within {self.realize_timeout:.0f} s (is the transport "
                                   "zone's switch in this vCenter?)")
            time.sleep(0.5)

    def _find(self, field: str, want: str) -> PortGroup | None:
        c = self.client
        view = c.call(lambda: c.content.viewManager.CreateContainerView(
            c.content.rootFolder, [vim.dvs.DistributedVirtualPortgroup], True))
        try:
            pc = vmodl.query.PropertyCollector
            spec = pc.FilterSpec(
                objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[pc.TraversalSpec(
                    type=vim.view.ContainerView, path="view", skip=False)])],
                propSet=[pc.PropertySpec(type=vim.dvs.DistributedVirtualPortgroup, pathSet=[
                    "name", "key", "config.logicalSwitchUuid",
                    "config.distributedVirtualSwitch"])])
            res = c.call(lambda: c.content.propertyCollector.RetrieveContents([spec])) or []
        finally:
            c.call(view.Destroy)
        for oc in res:
            props = {p.name: p.val for p in oc.propSet or []}
            if props.get(field) == want and props.get("config.distributedVirtualSwitch"):
                dvs = props["config.distributedVirtualSwitch"]
                uuid = c.props(dvs, ["uuid"]).get("uuid", "")
                return PortGroup(oc.obj, props["key"], props.get("name", ""), uuid)
        return None

    # --- reconfiguration --------------------------------------------------------------------

    def plan(self, devices: list[Any], extra: dict[str, str], add: list[dict[str, Any]],
             remove: set[int]) -> Any | None:
        """The ConfigSpec that removes the NICs in ``remove`` slots and adds ``add``
        (a NIC already there on the right port group is kept); None: nothing to do."""
        op = vim.vm.device.VirtualDeviceSpec.Operation
        by_mac = {d.macAddress.lower(): d for d in devices
                  if isinstance(d, vim.vm.device.VirtualEthernetCard) and d.macAddress}
        recorded = nic_slots_of(extra)
        changes: list[Any] = []
        keys: dict[str, str] = {}
        gone: set[str] = set()

        def drop(slot: int) -> None:
            mac = recorded.get(slot)
            dev = by_mac.get(mac or "")
            if dev is not None and mac not in gone:
                changes.append(vim.vm.device.VirtualDeviceSpec(operation=op.remove, device=dev))
                gone.add(mac or "")
            keys[f"{NIC_KEY}{slot}"] = ""

        for slot in sorted(remove):
            if slot in recorded:
                drop(slot)
        for nic in add:
            slot, mac = int(nic["slot"]), str(nic["mac"]).lower()
            if not 1 <= slot <= NIC_SLOTS:
                raise InvalidParameter(f"vsphere: NIC slot {slot} out of range 1..{NIC_SLOTS}")
            pg = self.portgroup(nic.get("backing") or {})
            have = by_mac.get(mac)
            if (have is not None and mac not in gone and recorded.get(slot) == mac
                    and getattr(getattr(have.backing, "port", None), "portgroupKey", "")
                    == pg.key):
                continue  # plugged already (a restart of the same container)
            if slot in recorded:
                drop(slot)
            if have is not None and mac not in gone:  # the MAC moves to another port group
                changes.append(vim.vm.device.VirtualDeviceSpec(operation=op.remove,
                                                               device=have))
                gone.add(mac)
            changes.append(vim.vm.device.VirtualDeviceSpec(
                operation=op.add, device=self._vnic(nic, pg, -100 - slot)))
            keys[f"{NIC_KEY}{slot}"] = mac
        stale = {k: v for k, v in keys.items()
                 if recorded.get(int(k[len(NIC_KEY):])) != (v or None)}
        if not changes and not stale:
            return None
        return vim.vm.ConfigSpec(deviceChange=changes, extraConfig=[
            vim.option.OptionValue(key=k, value=v) for k, v in keys.items()])

    @staticmethod
    def _vnic(nic: dict[str, Any], pg: PortGroup, key: int) -> Any:
        backing = nic.get("backing") or {}
        return vim.vm.device.VirtualVmxnet3(
            key=key, macAddress=str(nic["mac"]).lower(), addressType="manual",
            externalId=backing.get("attachment_id") or None, wakeOnLanEnabled=False,
            backing=vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
                port=vim.dvs.PortConnection(switchUuid=pg.switch_uuid,
                                            portgroupKey=pg.key)),
            connectable=vim.vm.device.VirtualDevice.ConnectInfo(
                startConnected=True, connected=True, allowGuestControl=True),
            deviceInfo=vim.Description(label=f"vicd {nic.get('network', '')}",
                                       summary=pg.name))

    def apply(self, vm: Any, add: list[dict[str, Any]], remove: set[int],
              sync: bool = False) -> None:
        """Reconfigure ``vm``: with ``sync``, the recorded NICs not in ``add`` go too."""
        with self._locks_lock:
            lock = self._locks.setdefault(vm._moId, threading.Lock())
        with lock:  # a VM's NIC changes one at a time keep its slots consistent
            props = self.client.props(vm, ["config.hardware.device", "config.extraConfig"])
            devices = props.get("config.hardware.device") or []
            extra = {o.key: str(o.value) for o in props.get("config.extraConfig") or []}
            if sync:
                remove = remove | (set(nic_slots_of(extra)) - {int(n["slot"]) for n in add})
            spec = self.plan(devices, extra, add, remove)
            if spec is None:
                return
            self.client.wait_task(self.client.call(lambda: vm.ReconfigVM_Task(spec)))
            log.info("vsphere: VM %s NICs: +%s -%s", vm._moId,
                     [n["slot"] for n in add], sorted(remove))
