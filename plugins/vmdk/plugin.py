"""The ``vmdk`` volume driver: persistent docker volumes as VMDKs on a vSphere datastore.

Registered through ``register_volume_drivers`` like a third-party plugin
(entry point ``vmdk`` in the ``vicd`` group); offered only when the daemon
runs the vsphere backend, whose VMs the disks are attached to.
"""

from __future__ import annotations

from typing import Any

from vicd.config import Config
from vicd.hookspecs import hookimpl


@hookimpl
def register_volume_drivers(config: Config) -> dict[str, Any]:
    if config.backend != "vsphere":
        return {}

    def factory(cfg: Config) -> Any:
        # Imported lazily: pyvmomi is only needed on the vsphere backend.
        from vicd.plugins.vmdk.driver import VmdkVolumeDriver

        return VmdkVolumeDriver(cfg)

    return {"vmdk": factory}
