"""The host emulation's virtual switch: what ESXi and the distributed switch do
for container VMs' vNICs on port groups (NSX segments), so packets flow in tests.

Every microVM the emulation boots gets NIC slots (taps, as on the microvm
backend: ``plugins/microvm/netns.py``) in a network namespace of the
emulation's own. A vNIC the daemon added to the simulated VM
(``VirtualEthernetCard`` with a DVS port backing, recorded as
``vicd.nic.<slot>`` = MAC in extraConfig) puts that slot's tap on a Linux
bridge per port group (``pg-<key number>``): VMs on one port group share an
L2 segment, VMs on different ones do not. A vNIC removed takes the tap off
the bridge. Only the first ``SLOTS`` slots are emulated (ESXi takes 9).

Not emulated: NSX's distributed firewall (rules are checked as NSX received
them, not enforced), the uplinks and overlay between hosts.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from pyVmomi import vim

from vicd.plugins.microvm.netns import NetNS, NetNSError, tap_name
from vicd.plugins.vsphere.nics import nic_slots_of

log = logging.getLogger("hostemu.net")
SLOTS = 3


class HostSwitch:
    def __init__(self, work: Path) -> None:
        digest = hashlib.sha256(str(work.resolve()).encode()).hexdigest()[:10]
        self.ns = NetNS(f"vicd-emu-{digest}")
        self.plumbed: dict[str, dict[int, str]] = {}  # VM id -> slot -> bridge
        self.bridges: set[str] = set()

    @staticmethod
    def usable() -> bool:
        return NetNS.usable()

    def start(self) -> None:
        self.ns.ensure()

    def close(self) -> None:
        self.ns.remove()

    def open_taps(self, moid: str) -> list[int]:
        """The slot taps of a microVM about to boot (QEMU gets the fds)."""
        self.plumbed[moid] = {}
        return [self.ns.open_tap(tap_name(moid, slot)) for slot in range(1, SLOTS + 1)]

    def forget(self, moid: str) -> None:
        self.plumbed.pop(moid, None)  # its taps went with its QEMU

    def plumb(self, moid: str, devices: list[Any], extra: dict[str, str]) -> None:
        """Put each slot's tap on the bridge of its vNIC's port group; cheap when
        nothing changed (no ip calls)."""
        have = self.plumbed.get(moid)
        if have is None:
            return  # no microVM (yet)
        by_mac = {d.macAddress.lower(): d for d in devices
                  if isinstance(d, vim.vm.device.VirtualEthernetCard) and d.macAddress}
        want: dict[int, str] = {}
        for slot, mac in nic_slots_of(extra).items():
            port = getattr(getattr(by_mac.get(mac), "backing", None), "port", None)
            if port is not None and slot <= SLOTS:
                want[slot] = f"pg-{str(port.portgroupKey).rsplit('-', 1)[-1]}"
        if want == have:
            return
        try:
            for slot in set(have) - set(want):
                self.ns.ip("link", "set", tap_name(moid, slot), "nomaster", "down",
                           check=False)
            for slot, bridge in want.items():
                if have.get(slot) == bridge:
                    continue
                self._bridge(bridge)
                self.ns.ip("link", "set", tap_name(moid, slot), "master", bridge, "up")
        except NetNSError as e:
            log.warning("hostemu: %s NICs: %s", moid, e.message)
            return
        log.info("hostemu: %s NIC slots on %s", moid, want or "nothing")
        self.plumbed[moid] = want

    def _bridge(self, name: str) -> None:
        if name in self.bridges:
            return
        self.ns.ip("link", "add", "name", name, "type", "bridge", check=False)  # may exist
        self.ns.ip("link", "set", name, "up")
        self.bridges.add(name)
