"""Docker volumes as VMDKs in a datastore folder, with their records beside them.

- A volume ``NAME`` is ``[ds] <folder>/NAME.vmdk`` (folder default
  ``vicd/volumes``), made blank and thin by ``VirtualDiskManager.
  CreateVirtualDisk_Task``; the guest makes its ext4 on first use
  (``DiskSpec.mkfs``). The vsphere backend attaches it to the container's
  VM as an independent-persistent disk at start and detaches it when the VM
  ends, so snapshots and instant clones never capture it and ``docker rm``
  (Destroy_Task) never deletes it.
- Its record (driver options, labels, creation time, whether the image's
  files were copied in) is ``NAME.json`` beside it, written over the
  datastore's HTTP ``/folder`` interface. ``list_records`` finds them with
  ``HostDatastoreBrowser.SearchDatastore_Task``, so a daemon with an empty
  data root, or a second daemon, sees every volume from vCenter alone.
- ``docker volume rm``: ``DeleteVirtualDisk_Task`` and
  ``FileManager.DeleteDatastoreFile_Task`` for the record.

Settings: ``[plugins.vmdk]`` ``datastore`` (default: the vsphere backend's),
``folder``, ``default_size``; the connection is ``[plugins.vsphere]``'s, in
a session of the driver's own.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from pyVmomi import vim, vmodl

from vicd.backend import DiskSpec
from vicd.config import Config
from vicd.errors import Conflict, InvalidParameter
from vicd.plugins.microvm.volumes import parse_size
from vicd.plugins.vsphere.client import VimClient, VSphereError, fault_message
from vicd.plugins.vsphere.datastore import DatastoreFiles
from vicd.plugins.vsphere.settings import VSphereSettings

log = logging.getLogger(__name__)

OPTIONS = {"size"}
MIN_SIZE, MAX_SIZE = 8 << 20, 2 << 40  # vSphere's thin disks go far beyond; 2 TiB is plenty


class VmdkVolumeDriver:
    name = "vmdk"

    def __init__(self, config: Config) -> None:
        table = dict(config.plugins.get("vmdk") or {})
        unknown = sorted(set(table) - {"datastore", "folder", "default_size"})
        if unknown:
            raise InvalidParameter(f"unknown [plugins.vmdk] keys: {', '.join(unknown)}")
        self.settings = VSphereSettings.from_config(config.plugins.get("vsphere") or {})
        self.datastore = str(table.get("datastore") or self.settings.datastore)
        if not self.datastore:
            raise InvalidParameter("vmdk: no datastore ([plugins.vmdk] datastore or "
                                   "--vsphere-datastore)")
        self.folder = str(table.get("folder") or "vicd/volumes").strip("/")
        self.default_size = (parse_size(str(table["default_size"])) if "default_size" in table
                             else config.volume_size_mb << 20)
        self.client = VimClient(self.settings, "vmdk")
        self.files = DatastoreFiles(self.client, config.data_root / "vsphere" / "images")
        self._lock = threading.Lock()
        self._dc: Any = None
        self._browser: Any = None
        self._ready_gen = -1  # the session generation the folder was made in

    # --- vCenter ----------------------------------------------------------------

    def _ready(self) -> Any:
        """Log in on first use (the daemon may never need a volume), find the
        datacenter, make the folder once per session."""
        with self._lock:
            c = self.client
            if c.si is None:
                c.connect()
            if self._ready_gen != c.generation:
                self._dc = c.by_path(self.settings.datacenter)
                if not isinstance(self._dc, vim.Datacenter):
                    raise VSphereError(f"vmdk: datacenter {self.settings.datacenter!r} not found")
                ds = c.by_path(f"{self.settings.datacenter.strip('/')}/datastore/"
                               f"{self.datastore}")
                if not isinstance(ds, vim.Datastore):
                    raise VSphereError(f"vmdk: datastore {self.datastore!r} not found")
                self._browser = c.props(ds, ["browser"])["browser"]
                try:
                    c.call(lambda: c.content.fileManager.MakeDirectory(
                        name=self._ds_path(""), datacenter=self._dc,
                        createParentDirectories=True))
                except vim.fault.FileAlreadyExists:
                    pass
                self._ready_gen = c.generation
            return self._dc

    def _ds_path(self, file: str) -> str:
        return f"[{self.datastore}] {self.folder}/{file}".rstrip("/")

    def _run_task(self, start: Any) -> Any:
        return self.client.wait_task(self.client.call(start), by_parts=True)

    def _record_file(self, name: str) -> str:
        return f"{self.folder}/{name}.json"

    # --- Docker's volume-driver shape ------------------------------------------

    def capabilities(self) -> dict[str, Any]:
        return {"Scope": "global"}  # every daemon on this datastore sees it

    def create(self, name: str, opts: dict[str, str]) -> None:
        unknown = sorted(set(opts) - OPTIONS)
        if unknown:
            raise InvalidParameter(f"invalid option key: {unknown[0]!r}")
        size = parse_size(opts["size"]) if "size" in opts else self.default_size
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise InvalidParameter(f"volume size must be between 8MiB and 2TiB, not {size}")
        dc = self._ready()
        spec = vim.VirtualDiskManager.FileBackedVirtualDiskSpec(
            diskType="thin", adapterType="lsiLogic", capacityKb=size // 1024)
        mgr = self.client.content.virtualDiskManager
        try:
            self._run_task(lambda: mgr.CreateVirtualDisk_Task(
                name=self.path(name), datacenter=dc, spec=spec))
        except vim.fault.FileAlreadyExists:
            raise Conflict(f"volume {name}: {self.path(name)} exists already") from None
        except vim.fault.FileFault as e:
            raise VSphereError(f"vmdk: cannot create {self.path(name)}: "
                               f"{fault_message(e)}") from None
        log.info("vmdk: created %s (%d MiB, thin)", self.path(name), size >> 20)

    def remove(self, name: str) -> None:
        dc = self._ready()
        c = self.client
        try:
            self._run_task(lambda: c.content.virtualDiskManager.DeleteVirtualDisk_Task(
                name=self.path(name), datacenter=dc))
        except vim.fault.FileNotFound:
            pass  # removed by another daemon meanwhile
        except vim.fault.FileLocked:
            raise Conflict(f"remove {name}: volume is in use (its disk is attached "
                           "to a running VM)") from None
        try:
            self._run_task(lambda: c.content.fileManager.DeleteDatastoreFile_Task(
                name=self._ds_path(f"{name}.json"), datacenter=dc))
        except vim.fault.FileNotFound:
            pass
        log.info("vmdk: removed %s", self.path(name))

    def path(self, name: str) -> str:
        return self._ds_path(f"{name}.vmdk")

    def mount(self, name: str, container_id: str) -> DiskSpec:
        # The backend attaches it (ReconfigVM_Task): no round trip here.
        return DiskSpec(path=Path(self.path(name)), target="", fmt="datastore", mkfs=True)

    def unmount(self, name: str, container_id: str) -> None:
        pass  # detached by the backend when the VM ends

    def usage(self, name: str) -> int:
        return -1  # thin disks: the datastore's browser would tell; not worth a round trip

    # --- the records beside the disks -------------------------------------------

    def save_record(self, name: str, record: dict[str, Any]) -> None:
        self._ready()
        data = json.dumps(record, sort_keys=True).encode()
        self.files.write(self._record_file(name), data, self.settings.datacenter,
                         self.datastore)

    def list_records(self) -> list[dict[str, Any]]:
        self._ready()
        spec = vim.host.DatastoreBrowser.SearchSpec(matchPattern=["*.json"])
        try:
            result = self._run_task(lambda: self._browser.SearchDatastore_Task(
                datastorePath=self._ds_path(""), searchSpec=spec))
        except vim.fault.FileNotFound:
            return []
        except vmodl.MethodFault as e:
            raise VSphereError(f"vmdk: cannot list {self._ds_path('')}: "
                               f"{fault_message(e)}") from None
        out = []
        for f in result.file or []:
            if not f.path.endswith(".json"):
                continue
            data = self.files.read(f"{self.folder}/{f.path}", self.settings.datacenter,
                                   self.datastore)
            try:
                rec = json.loads(data or b"")
            except ValueError:
                log.warning("vmdk: %s is not a volume record; skipped", f.path)
                continue
            if isinstance(rec, dict) and rec.get("name") == f.path[:-len(".json")]:
                out.append(rec)
        return out
