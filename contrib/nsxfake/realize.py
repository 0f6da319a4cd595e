"""What NSX Manager does in vCenter when a segment is created: the fake's
realization of segments as NSX-backed distributed port groups.

With NSX-T 3.x on a vSphere 7 VDS, NSX (registered with vCenter as a
compute manager) realizes every overlay segment as a DVPortgroup on the VDS
that the transport zone's hosts use: named after the segment's
``display_name``, ``config.backingType = "nsx"`` and
``config.logicalSwitchUuid`` = the segment's ``unique_id``. Deleting the
segment removes the port group. vCenter administrators see it, and VMs
attach to it with an ordinary DVS port backing.

Here the fake does this against govmomi's simulator through pyvmomi
(``AddDVPortgroup_Task``, ``Destroy_Task``); the simulator keeps both
fields. Real NSX also programs the hosts' datapath (overlay, DFW), which
no part of the test setup does.
"""

from __future__ import annotations

import logging
from typing import Any

from pyVmomi import vim

from vicd.plugins.vsphere.client import VimClient

log = logging.getLogger("nsxfake.realize")


class Realizer:
    def __init__(self, client: VimClient, datacenter: str) -> None:
        self.client = client
        self.datacenter = datacenter.strip("/")

    def connect(self) -> None:
        self.client.connect()

    def _dvs(self, name: str) -> Any:
        dvs = self.client.by_path(f"{self.datacenter}/network/{name}")
        if not isinstance(dvs, vim.DistributedVirtualSwitch):
            raise LookupError(f"distributed switch {name!r} not found in {self.datacenter}")
        return dvs

    def find_portgroup(self, logical_switch: str) -> Any:
        c = self.client
        view = c.call(lambda: c.content.viewManager.CreateContainerView(
            c.content.rootFolder, [vim.dvs.DistributedVirtualPortgroup], True))
        try:
            pc = vim.PropertyCollector
            spec = pc.FilterSpec(
                objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[pc.TraversalSpec(
                    type=vim.view.ContainerView, path="view", skip=False)])],
                propSet=[pc.PropertySpec(type=vim.dvs.DistributedVirtualPortgroup,
                                         pathSet=["config.logicalSwitchUuid"])])
            for oc in c.call(lambda: c.content.propertyCollector.RetrieveContents([spec])) or []:
                if any(p.val == logical_switch for p in oc.propSet or []):
                    return oc.obj
            return None
        finally:
            c.call(view.Destroy)

    def create(self, segment: dict[str, Any], dvs_name: str) -> None:
        if self.find_portgroup(segment["unique_id"]) is not None:
            return  # realized already (a PATCH of an existing segment)
        dvs = self._dvs(dvs_name)
        spec = vim.dvs.DistributedVirtualPortgroup.ConfigSpec(
            name=segment["display_name"], type="earlyBinding", numPorts=8, autoExpand=True,
            logicalSwitchUuid=segment["unique_id"], backingType="nsx",
            description=f"NSX segment {segment['path']}")
        self.client.wait_task(self.client.call(lambda: dvs.AddDVPortgroup_Task([spec])))
        log.info("realized segment %s as port group %r on %s", segment["path"],
                 segment["display_name"], dvs_name)

    def delete(self, segment: dict[str, Any]) -> None:
        pg = self.find_portgroup(segment["unique_id"])
        if pg is not None:
            self.client.wait_task(self.client.call(pg.Destroy_Task))
            log.info("removed the port group of segment %s", segment["path"])
