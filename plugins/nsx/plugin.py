"""The ``nsx`` network driver, offered when the compute backend is vSphere and
``[plugins.nsx]`` names an NSX Manager (see docs/networking.md)."""

from __future__ import annotations

from typing import Any

from vicd.config import Config
from vicd.hookspecs import hookimpl


@hookimpl
def register_network_drivers(config: Config) -> dict[str, Any]:
    if config.backend != "vsphere" or not (config.plugins.get("nsx") or {}).get("url"):
        return {}

    def factory(cfg: Config) -> Any:
        from vicd.plugins.nsx.driver import NsxDriver
        from vicd.plugins.nsx.settings import NsxSettings

        return NsxDriver(NsxSettings.from_config(cfg.plugins.get("nsx") or {}))

    return {"nsx": factory}
