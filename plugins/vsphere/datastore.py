"""Image base disks on the datastore, over vCenter's datastore HTTP interface.

Each image's ext4 disk is converted once to a sparse VMDK (only allocated
grains: a few MB for busybox) and uploaded with ``PUT /folder/<path>?dcPath=
&dsName=`` under ``vicd-images/`` on the datastore, authenticated by the SOAP
session's cookie. ESXi cannot back a VM's disk with that hosted format, so
``CopyVirtualDisk_Task`` turns it into a native thin disk under a temporary
name, ``MoveVirtualDisk_Task`` puts that in place (a base that exists is
always whole) and the upload is deleted. The container VM names the base in
extraConfig (``vicd.image_vmdk``) and gets a child disk of it as its root
disk (``disks.root_disk_change``). Small files (volume records) are read and
written here too.
"""

from __future__ import annotations

import http.client
import logging
import re
import ssl
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from pyVmomi import vim, vmodl

from vicd.plugins.vsphere.client import VimClient, VSphereError, fault_message

log = logging.getLogger(__name__)


def image_file(image_id: str, stage: str = "") -> str:
    """The image's base disk; with ``stage``, one of its intermediates."""
    return f"vicd-images/{image_id.split(':')[-1][:64]}{stage}.vmdk"


class DatastoreFiles:
    def __init__(self, client: VimClient, cache: Path, owner: str = "vicd") -> None:
        self.client = client
        self.cache = cache
        # Names this daemon's intermediates, so two daemons making the same
        # base at once do not write into each other's files.
        self.owner = re.sub(r"[^A-Za-z0-9_-]", "_", owner)
        self.copy_spec = True  # vCenter refuses CopyVirtualDisk's destSpec: then False
        self.http_calls = 0
        self.known: set[tuple[int, str]] = set()  # (session generation, datastore path)

    def _conn(self) -> http.client.HTTPConnection:
        s = self.client.settings
        if s.scheme == "https":
            ctx = ssl.create_default_context()
            if s.insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(s.host, s.port, context=ctx, timeout=300)
        return http.client.HTTPConnection(s.host, s.port, timeout=300)

    def _request(self, method: str, path: str, dc: str, ds: str, body: object = None,
                 length: int | None = None) -> int:
        return self._exchange(method, path, dc, ds, body, length)[0]

    def _exchange(self, method: str, path: str, dc: str, ds: str, body: object = None,
                  length: int | None = None) -> tuple[int, bytes]:
        query = urlencode({"dcPath": dc, "dsName": ds})
        headers = {"Cookie": self.client.si._stub.cookie or ""}
        if length is not None:
            headers["Content-Length"] = str(length)
            headers["Content-Type"] = "application/octet-stream"
        conn = self._conn()
        try:
            conn.request(method, f"/folder/{quote(path)}?{query}", body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.http_calls += 1
            return resp.status, data
        finally:
            conn.close()

    def read(self, path: str, dc: str, ds: str) -> bytes | None:
        """A small file's content (None if missing)."""
        status, data = self._exchange("GET", path, dc, ds)
        if status == 404:
            return None
        if status != 200:
            raise VSphereError(f"vsphere: reading [{ds}] {path} failed: HTTP {status}")
        return data

    def write(self, path: str, data: bytes, dc: str, ds: str) -> None:
        status = self._request("PUT", path, dc, ds, body=data, length=len(data))
        if status not in (200, 201, 204):
            raise VSphereError(f"vsphere: writing [{ds}] {path} failed: HTTP {status}")

    def ensure_image(self, image_id: str, disk: Path, dc: str, ds: str, datacenter: Any,
                     adapter: str) -> str:
        """The image's base disk on the datastore (made if missing): ``[ds] path``.
        ``adapter``: the VirtualDiskAdapterType of the controller its children use."""
        path = image_file(image_id)
        key = (self.client.generation, f"{ds}/{path}")
        if key in self.known:
            return f"[{ds}] {path}"
        # Only a finished move makes the base's name exist: a daemon killed
        # half-way leaves intermediates, which the next attempt replaces.
        if self._request("HEAD", path, dc, ds) != 200:
            self._make_base(image_id, disk, dc, ds, datacenter, adapter)
        self.known.add(key)
        return f"[{ds}] {path}"

    def _make_base(self, image_id: str, disk: Path, dc: str, ds: str, datacenter: Any,
                   adapter: str) -> None:
        base = f"[{ds}] {image_file(image_id)}"
        upload = image_file(image_id, f".{self.owner}.upload")
        tmp = f"[{ds}] {image_file(image_id, f'.{self.owner}.tmp')}"
        vmdk = self._convert(image_id, disk)
        size = vmdk.stat().st_size
        with open(vmdk, "rb") as f:
            status = self._request("PUT", upload, dc, ds, body=f, length=size)
        if status not in (200, 201, 204):
            raise VSphereError(f"vsphere: upload of the image disk to [{ds}] {upload} "
                               f"failed: HTTP {status}")
        mgr = self.client.content.virtualDiskManager
        try:
            try:
                self._copy(f"[{ds}] {upload}", tmp, datacenter, adapter)
            except vim.fault.FileAlreadyExists:
                # Left by a daemon killed mid-way (the API ignores force): redo it.
                self._task(lambda: mgr.DeleteVirtualDisk_Task(name=tmp, datacenter=datacenter))
                self._copy(f"[{ds}] {upload}", tmp, datacenter, adapter)
            try:
                self._task(lambda: mgr.MoveVirtualDisk_Task(
                    sourceName=tmp, sourceDatacenter=datacenter, destName=base,
                    destDatacenter=datacenter, force=False))
            except vim.fault.FileAlreadyExists:
                # Another daemon put the same image's base in place first.
                self._task(lambda: mgr.DeleteVirtualDisk_Task(name=tmp, datacenter=datacenter))
        except vim.fault.FileFault as e:
            raise VSphereError(f"vsphere: cannot make the image disk {base}: "
                               f"{fault_message(e)}") from None
        finally:
            self._delete_file(f"[{ds}] {upload}", datacenter)
        log.info("vsphere: image disk %s made (%.1f MiB uploaded, converted to thin)",
                 base, size / 2**20)

    def _copy(self, src: str, dst: str, datacenter: Any, adapter: str) -> None:
        """The hosted sparse upload as an ESXi-native disk: thin, with the
        clones' adapter type. vCenter (unlike ESXi) refuses a destSpec, and
        then makes the copy in its default format."""
        mgr = self.client.content.virtualDiskManager
        spec = vim.VirtualDiskManager.VirtualDiskSpec(diskType="thin", adapterType=adapter)
        if self.copy_spec:
            try:
                self._task(lambda: mgr.CopyVirtualDisk_Task(
                    sourceName=src, sourceDatacenter=datacenter, destName=dst,
                    destDatacenter=datacenter, destSpec=spec))
                return
            except vmodl.fault.NotImplemented:
                log.info("vsphere: the server takes no destSpec in CopyVirtualDisk_Task "
                         "(vCenter); image disks get its default format")
                self.copy_spec = False
        self._task(lambda: mgr.CopyVirtualDisk_Task(
            sourceName=src, sourceDatacenter=datacenter, destName=dst,
            destDatacenter=datacenter))

    def _delete_file(self, name: str, datacenter: Any) -> None:
        """Delete an intermediate; a failure only leaves it for the next attempt."""
        fm = self.client.content.fileManager
        try:
            self._task(lambda: fm.DeleteDatastoreFile_Task(name=name, datacenter=datacenter))
        except (vim.fault.FileFault, VSphereError) as e:
            log.warning("vsphere: cannot delete %s: %s", name, fault_message(e))

    def _task(self, start: Any) -> Any:
        return self.client.wait_task(self.client.call(start), by_parts=True)

    def _convert(self, image_id: str, disk: Path) -> Path:
        out = self.cache / Path(image_file(image_id)).name
        if out.exists():
            return out
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        r = subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk",
                            "-o", "subformat=monolithicSparse", str(disk), str(tmp)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise VSphereError(f"vsphere: cannot convert the image disk: {r.stderr.strip()}")
        tmp.rename(out)
        return out
