"""Records every lifecycle hook call to $VICD_TESTPLUGIN_LOG and shapes the VM spec."""

from __future__ import annotations

import json
import os
from typing import Any

import pluggy

hookimpl = pluggy.HookimplMarker("vicd")


def _record(hook: str, **fields: Any) -> None:
    path = os.environ.get("VICD_TESTPLUGIN_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"hook": hook, **fields}) + "\n")


@hookimpl
def container_created(container: Any) -> None:
    _record("container_created", id=container.id)


@hookimpl
async def before_start(container: Any, spec: Any) -> None:
    # An async hook: the engine awaits it. It adds an env var the guest must see.
    spec.process.env.append("FROM_TESTPLUGIN=yes")
    _record("before_start", id=container.id, memory_mb=spec.memory_mb)


@hookimpl
def after_stop(container: Any, exit_code: int) -> None:
    _record("after_stop", id=container.id, exit_code=exit_code)


@hookimpl
def container_removed(container: Any) -> None:
    _record("container_removed", id=container.id)


@hookimpl
def register_volume_drivers(config: Any) -> dict[str, Any]:
    """A volume driver of Docker's shape; its disks are the microvm kind."""
    from vicd.plugins.microvm.volumes import LocalVolumeDriver

    class TestDiskDriver(LocalVolumeDriver):
        name = "testdisk"

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.root = config.data_root / "testdisk"

        def create(self, name: str, opts: dict[str, str]) -> None:
            _record("volume_create", name=name)
            super().create(name, opts)

    return {"testdisk": TestDiskDriver}


@hookimpl
def register_network_drivers(config: Any) -> dict[str, Any]:
    """A network driver of Docker's shape that records each call; its bridges
    are the microvm kind (so VMs can join them)."""
    from vicd.plugins.microvm.bridge_driver import LocalBridgeDriver

    class TestNetDriver(LocalBridgeDriver):
        name = "testnet"

        def create_network(self, network: Any) -> None:
            _record("network_create", id=network.id, subnet=network.subnet)
            super().create_network(network)

        def delete_network(self, network_id: str) -> None:
            _record("network_delete", id=network_id)
            super().delete_network(network_id)

        def create_endpoint(self, network_id: str, endpoint_id: str, address: str, mac: str,
                            options: dict[str, Any]) -> None:
            _record("endpoint_create", network=network_id, address=address, mac=mac)

        def delete_endpoint(self, network_id: str, endpoint_id: str) -> None:
            _record("endpoint_delete", network=network_id)

        def join(self, network_id: str, endpoint_id: str, container_id: str) -> dict[str, Any]:
            _record("join", network=network_id, container=container_id)
            return super().join(network_id, endpoint_id, container_id)

        def leave(self, network_id: str, endpoint_id: str) -> None:
            _record("leave", network=network_id)

    return {"testnet": TestNetDriver}
