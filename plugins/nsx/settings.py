"""The ``[plugins.nsx]`` table: where NSX Manager is, and its credentials.

Credentials come from VICD_NSX_USER / VICD_NSX_PASSWORD, else
``credentials_file`` (``vicd.credentials``), never from the TOML file
itself. Only ``safe_url`` (no user info) is ever logged or shown: the
password reaches nothing but the Authorization header.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from vicd.credentials import load_credentials
from vicd.errors import InvalidParameter

TZ_BASE = "/infra/sites/default/enforcement-points/default/transport-zones"


@dataclass
class NsxSettings:
    url: str = ""  # https://nsx-manager.example.com (the Policy API is under /policy/api/v1)
    # The overlay transport zone segments are made in: a policy path, or its id.
    transport_zone: str = ""
    insecure: bool = False
    ca_file: str = ""
    credentials_file: str = ""
    domain: str = "default"  # the policy domain groups and security policies live in
    timeout: float = 30.0
    # The vicd/daemon tag on everything this daemon makes (default vicd-<hostname>).
    daemon: str = ""
    user: str = field(default="", repr=False)
    password: str = field(default="", repr=False)

    @classmethod
    def from_config(cls, table: dict[str, Any]) -> NsxSettings:
        values = {k.replace("-", "_"): v for k, v in (table or {}).items()}
        known = {f.name for f in fields(cls)} - {"user", "password"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidParameter(f"unknown [plugins.nsx] keys: {', '.join(unknown)} "
                                   "(credentials go in VICD_NSX_USER/VICD_NSX_PASSWORD or "
                                   "credentials_file)")
        s = cls(**values)
        parts = urlsplit(s.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidParameter("nsx: url must be http(s)://<nsx-manager>[:port]")
        if parts.username or parts.password:
            raise InvalidParameter("nsx: put no credentials in the url (use VICD_NSX_USER/"
                                   "VICD_NSX_PASSWORD or credentials_file)")
        if not s.transport_zone:
            raise InvalidParameter("nsx: transport_zone is required (the overlay transport "
                                   "zone's policy path or id)")
        if not s.transport_zone.startswith("/"):
            s.transport_zone = f"{TZ_BASE}/{s.transport_zone}"
        s.daemon = s.daemon or f"vicd-{socket.gethostname().split('.')[0] or 'host'}"
        s._load_credentials()
        return s

    def _load_credentials(self) -> None:
        self.user, self.password = load_credentials(
            "nsx", "", "", "VICD_NSX", self.credentials_file,
            "VICD_NSX_USER/VICD_NSX_PASSWORD or credentials_file")

    @property
    def safe_url(self) -> str:
        parts = urlsplit(self.url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}"
