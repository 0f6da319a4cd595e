"""The embedded default compute backend: one local QEMU microVM per container."""

from __future__ import annotations

from typing import Any

from vicd.config import Config
from vicd.hookspecs import hookimpl


@hookimpl(trylast=True)
def register_compute_backends(config: Config) -> dict[str, Any]:
    from vicd.plugins.microvm.backend import MicroVMBackend

    return {"microvm": MicroVMBackend}


@hookimpl(trylast=True)
def register_volume_drivers(config: Config) -> dict[str, Any]:
    from vicd.plugins.microvm.volumes import LocalVolumeDriver

    return {"local": LocalVolumeDriver}


@hookimpl(trylast=True)
def register_network_drivers(config: Config) -> dict[str, Any]:
    if config.backend != "microvm":
        return {}
    from vicd.plugins.microvm.bridge_driver import LocalBridgeDriver

    return {"bridge": LocalBridgeDriver}
