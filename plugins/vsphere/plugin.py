"""The vSphere compute backend: one vSphere VM per container, driven over SOAP."""

from __future__ import annotations

from typing import Any

from vicd.config import Config
from vicd.hookspecs import hookimpl


@hookimpl(trylast=True)
def register_compute_backends(config: Config) -> dict[str, Any]:
    # Imported lazily: pyvmomi is only needed when this backend is chosen.
    def factory(cfg: Config) -> Any:
        from vicd.plugins.vsphere.backend import VSphereBackend

        return VSphereBackend(cfg)

    return {"vsphere": factory}
