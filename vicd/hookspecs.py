"""Every hook vicd calls, grouped by lifecycle phase.

Plugins implement these with ``@vicd.hookimpl``. Built-in features are
plugins too (``vicd.plugins.*``), registered through the same manager and
marked ``trylast`` so a third-party plugin can override them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from vicd.backend import ComputeBackend, VMSpec
    from vicd.config import Config
    from vicd.container import Container

hookspec = pluggy.HookspecMarker("vicd")
hookimpl = pluggy.HookimplMarker("vicd")


# --- registration: plugins hand the core named drivers ----------------------


@hookspec
def register_compute_backends(config: Config) -> dict[str, Any]:
    """Offer compute backends.

    Called once at daemon start, by the plugin manager's loader.

    :param config: the daemon's configuration.
    :return: a mapping of backend name (``--backend``) to a factory
        ``factory(config) -> ComputeBackend``. Names must be unique across
        plugins; a later duplicate is refused at start.
    """


@hookspec
def register_volume_drivers(config: Config) -> dict[str, Any]:
    """Offer volume drivers (Docker volume-driver shape), by name.

    Called once at daemon start. A driver implements ``vicd.volumes.VolumeDriver``
    (capabilities, create, remove, path, mount, unmount, usage); ``mount``
    returns the ``vicd.backend.DiskSpec`` the compute backend attaches. The
    built-in ``local`` driver (microvm) is registered ``trylast``.

    :param config: the daemon's configuration.
    :return: a mapping of driver name to a factory ``factory(config) -> VolumeDriver``.
    """


@hookspec
def register_network_drivers(config: Config) -> dict[str, Any]:
    """Offer network drivers (Docker network-driver shape), by name.

    Called once at daemon start. A driver implements
    ``vicd.network_driver.NetworkDriver`` (create/delete network, create/delete
    endpoint, join/leave); ``join`` returns the NIC backing the compute
    backend plugs (``NicSpec.backing``). The microvm backend's local
    ``bridge`` driver is registered ``trylast``.

    :param config: the daemon's configuration.
    :return: a mapping of driver name to a factory ``factory(config)``; a
        driver for another backend than ``config.backend`` should not offer
        itself.
    """


@hookspec
def register_schedulers(config: Config) -> dict[str, Any]:
    """Offer scheduler integrations (Mesos, Kubernetes executors), by name.

    :param config: the daemon's configuration.
    :return: a mapping of scheduler name to a factory ``factory(config)``.
    """


# --- container lifecycle: broadcast to every plugin --------------------------


@hookspec
def container_created(container: Container) -> None:
    """A container record was created and stored (``docker create``).

    Called by the engine after the record is durable, before the reply.

    :param container: the new container.
    """


@hookspec
def before_start(container: Container, spec: VMSpec) -> None:
    """The engine is about to hand ``spec`` to the compute backend.

    Volume and network plugins add disks (``spec.disks``) and NICs
    (``spec.nics``) here; a plugin may also adjust the process. May be a
    coroutine function; the engine awaits every result. Raising aborts the
    start with that error.

    :param container: the container being started.
    :param spec: the VM spec, mutable.
    """


@hookspec
def after_stop(container: Container, exit_code: int) -> None:
    """The container's VM has ended (exit, kill, stop, or the VM died).

    Called by the engine after the state is stored, before a restart policy
    acts.

    :param container: the container, now exited.
    :param exit_code: the process's exit code (137 when the VM was killed).
    """


@hookspec
def container_removed(container: Container) -> None:
    """The container and its disks were removed (``docker rm``, ``--rm``).

    :param container: the removed container (its record no longer stored).
    """


@hookspec(firstresult=True)
def backend_selected(config: Config, backend: ComputeBackend) -> None:
    """The daemon chose ``backend`` for this run. Informational.

    Stops at the first non-None result (none is expected).

    :param config: the daemon's configuration.
    :param backend: the compute backend in use.
    """
