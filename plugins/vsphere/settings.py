"""The ``[plugins.vsphere]`` table (or ``--vsphere-*`` flags), and credentials.

Credentials come from the URL's user info, else VICD_VSPHERE_USER /
VICD_VSPHERE_PASSWORD, else ``credentials_file`` (``user:password`` on its
first line, or user and password on two lines). They are kept out of every
string this module hands out (``safe_url``), so logs, ``docker info`` and
error messages never carry them.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from vicd.credentials import load_credentials
from vicd.errors import InvalidParameter


@dataclass
class VSphereSettings:
    url: str = ""
    datacenter: str = ""
    cluster: str = ""  # compute parent: a cluster (its root pool) ...
    resource_pool: str = ""  # ... and this daemon's pool under it, created if missing
    folder: str = ""  # this daemon's VM folder under the datacenter's vm folder
    datastore: str = ""
    network: str = ""
    template: str = ""
    insecure: bool = False
    credentials_file: str = ""
    # Where the VMs' network serial ports connect to (a listener in vicd).
    serial_listen: str = "127.0.0.1:0"
    # The URI the VMs are given; defaults to tcp://<serial_listen>. On ESXi
    # it must name an address the hosts reach.
    serial_uri: str = ""
    clone: str = "auto"  # auto (instant clone when offered) | instant | linked
    keepalive_seconds: float = 300.0
    boot_timeout: float = 120.0
    user: str = field(default="", repr=False)
    password: str = field(default="", repr=False)

    @classmethod
    def from_config(cls, table: dict[str, Any]) -> VSphereSettings:
        values = {k.replace("-", "_"): v for k, v in (table or {}).items()}
        known = {f.name for f in fields(cls)} - {"user", "password"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidParameter(f"unknown [plugins.vsphere] keys: {', '.join(unknown)}")
        s = cls(**values)
        s._load_credentials()
        s._defaults()
        return s

    def _defaults(self) -> None:
        if not self.url:
            raise InvalidParameter("vsphere: no vCenter URL (--vsphere-url or "
                                   "[plugins.vsphere] url)")
        host = socket.gethostname().split(".")[0] or "vicd"
        self.resource_pool = self.resource_pool or f"vicd-{host}"
        self.folder = self.folder or f"vicd-{host}"
        if self.clone not in ("auto", "instant", "linked"):
            raise InvalidParameter("vsphere: clone must be auto, instant or linked")
        for name in ("datacenter", "template"):
            if not getattr(self, name):
                raise InvalidParameter(f"vsphere: {name} is required (--vsphere-{name})")

    def _load_credentials(self) -> None:
        parts = urlsplit(self.url)
        self.user, self.password = load_credentials(
            "vsphere", parts.username or "", parts.password or "", "VICD_VSPHERE",
            self.credentials_file,
            "URL user info, VICD_VSPHERE_USER/VICD_VSPHERE_PASSWORD or credentials_file")

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme or "https"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (80 if parts.scheme == "http" else 443)

    @property
    def path(self) -> str:
        return urlsplit(self.url).path or "/sdk"

    @property
    def safe_url(self) -> str:
        """The URL without user info: the only form that is logged or shown."""
        return f"{self.scheme}://{self.host}:{self.port}{self.path}"
