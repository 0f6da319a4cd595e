"""The fake NSX Manager (contrib/nsxfake) as a process, over real HTTP.

No NSX Manager runs here: the fake serves the NSX-T Policy API subset vicd's
``nsx`` plugin uses and realizes segments as port groups in the vCenter
simulator it is pointed at (``--vcenter``), as NSX does in vCenter.
"""

from __future__ import annotations

import base64
import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import REPO
from vcsim_fixture import Proc, free_port

NSX_USER, NSX_PASSWORD = "nsx-admin", "nsx-S3cret-Pw!9"
TZ_ID = "vicd-overlay-tz"
TZ_PATH = f"/infra/sites/default/enforcement-points/default/transport-zones/{TZ_ID}"
API = "/policy/api/v1"


@dataclass
class FakeNsx:
    base: Path
    vcenter_url: str
    port: int = 0
    proc: Proc | None = None
    extra_args: tuple[str, ...] = ()  # --tls-cert/--tls-key, --throttle
    name: str = "nsxfake"

    @property
    def url(self) -> str:
        scheme = "https" if "--tls-cert" in self.extra_args else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = self.port or free_port()
        port_file = self.base / f"{self.name}.port"
        port_file.unlink(missing_ok=True)
        vcenter = ["--vcenter", self.vcenter_url, "--datacenter", "DC0"] \
            if self.vcenter_url else []
        self.proc = Proc([sys.executable, str(REPO / "contrib/nsxfake/nsxfake.py"),
                          "--listen", f"127.0.0.1:{self.port}", "--port-file", str(port_file),
                          "--user", NSX_USER, "--password-env", "NSXFAKE_PASSWORD", *vcenter,
                          "--transport-zone", f"{TZ_ID}=DVS0", *self.extra_args],
                         self.base / f"{self.name}.log")
        self.proc.start(env={"PYTHONPATH": str(REPO), "NSXFAKE_PASSWORD": NSX_PASSWORD})
        deadline = time.time() + 30
        while not port_file.exists():
            assert self.proc.proc and self.proc.proc.poll() is None, self.log()
            assert time.time() < deadline, "the fake NSX Manager did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def log(self) -> str:
        try:
            return (self.base / f"{self.name}.log").read_text()[-3000:]
        except OSError:
            return ""

    def config(self) -> dict[str, Any]:
        """The [plugins.nsx] table."""
        return {"url": self.url, "transport_zone": TZ_ID, "daemon": "vicd-test"}

    def toml(self) -> str:
        return (f'[plugins.nsx]\nurl = "{self.url}"\ntransport_zone = "{TZ_ID}"\n'
                'daemon = "vicd-test"\n')

    @staticmethod
    def env() -> dict[str, str]:
        return {"VICD_NSX_USER": NSX_USER, "VICD_NSX_PASSWORD": NSX_PASSWORD}

    def api(self, method: str, path: str, body: dict[str, Any] | None = None,
            auth: tuple[str, str] = (NSX_USER, NSX_PASSWORD)) -> tuple[int, Any]:
        """One Policy API request as an NSX administrator would make it."""
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{API}{path}", data=data, method=method,
                                     headers={"Authorization": f"Basic {token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def get(self, path: str) -> Any:
        status, body = self.api("GET", path)
        assert status == 200, (path, status, body)
        return body

    def exists(self, path: str) -> bool:
        status, body = self.api("GET", path)
        assert status in (200, 404), (path, status, body)
        return status == 200
