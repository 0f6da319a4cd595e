"""Image base disks on the datastore, over vCenter's datastore HTTP interface.

Each image's ext4 disk is converted once to a sparse VMDK (only allocated
grains: a few MB for busybox) and uploaded with ``PUT /folder/<path>?dcPath=
&dsName=`` under ``vicd-images/`` on the datastore, authenticated by the SOAP
session's cookie. The container VM names it in extraConfig
(``vicd.image_vmdk``) and gets a child disk of it as its root disk
(``disks.root_disk_change``). On ESXi the sparse upload would first be copied
to a VMFS disk (CopyVirtualDisk_Task, docs/vsphere.md). Small files (volume
records) are read and written here too.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import subprocess
from pathlib import Path
from urllib.parse import quote, urlencode

from vicd.plugins.vsphere.client import VimClient, VSphereError

log = logging.getLogger(__name__)


def image_file(image_id: str) -> str:
    return f"vicd-images/{image_id.split(':')[-1][:64]}.vmdk"


class DatastoreFiles:
    def __init__(self, client: VimClient, cache: Path) -> None:
        self.client = client
        self.cache = cache
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

    def ensure_image(self, image_id: str, disk: Path, dc: str, ds: str) -> str:
        """The image's VMDK on the datastore (uploaded if missing): ``[ds] path``."""
        path = image_file(image_id)
        key = (self.client.generation, f"{ds}/{path}")
        if key in self.known:
            return f"[{ds}] {path}"
        if self._request("HEAD", path, dc, ds) != 200:
            vmdk = self._convert(image_id, disk)
            size = vmdk.stat().st_size
            with open(vmdk, "rb") as f:
                status = self._request("PUT", path, dc, ds, body=f, length=size)
            if status not in (200, 201, 204):
                raise VSphereError(f"vsphere: upload of the image disk to [{ds}] {path} "
                                   f"failed: HTTP {status}")
            log.info("vsphere: uploaded image disk [%s] %s (%.1f MiB)", ds, path, size / 2**20)
        self.known.add(key)
        return f"[{ds}] {path}"

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
