"""Docker volumes: the engine's registry of volumes and the drivers behind them.

A volume driver has Docker's volume-driver shape (``VolumeDriver`` below)
and comes from a plugin's ``register_volume_drivers`` hook, so a third party
can add one. The registry keeps each volume's metadata (driver, labels,
options, creation time, anonymous or not) under ``<data-root>/volumes``;
what the data is (a disk image, a VMDK) is the driver's business.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vicd.backend import DiskSpec
from vicd.errors import Conflict, InvalidParameter, NotFound, VicdError
from vicd.filters import check_keys, label_matches
from vicd.store import write_json_atomic
from vicd.timefmt import rfc3339_now

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
VOLUME_FILTERS = {"dangling", "driver", "label", "name"}


class VolumeDriver(Protocol):
    """Docker's volume-driver shape, as a Python object."""

    name: str

    def capabilities(self) -> dict[str, Any]:
        """``{"Scope": "local"|"global"}``."""
        ...

    def create(self, name: str, opts: dict[str, str]) -> None:
        """Make the volume's storage; raise InvalidParameter for bad options."""
        ...

    def remove(self, name: str) -> None: ...

    def path(self, name: str) -> str:
        """The ``Mountpoint`` inspect shows."""
        ...

    def mount(self, name: str, container_id: str) -> DiskSpec:
        """What the compute backend attaches for the container (target set by the caller)."""
        ...

    def unmount(self, name: str, container_id: str) -> None: ...

    def usage(self, name: str) -> int:
        """Bytes used, for ``docker system df -v``; -1 if unknown."""
        ...


class SharedVolumeDriver(VolumeDriver, Protocol):
    """A driver whose volumes live outside the data root (a datastore) and are
    seen by every daemon using it: it keeps each volume's record (the
    ``Volume`` fields) with the volume, so a daemon with an empty data root,
    or a second one, lists them all (Docker's ``List``/``Get``)."""

    def list_records(self) -> list[dict[str, Any]]:
        """Every volume's stored record."""
        ...

    def save_record(self, name: str, record: dict[str, Any]) -> None: ...


def is_shared(driver: object) -> bool:
    return callable(getattr(driver, "list_records", None)) and callable(
        getattr(driver, "save_record", None))


@dataclass
class Volume:
    name: str
    driver: str
    created: str
    labels: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    anonymous: bool = False
    # Set once the image's files were copied in (dockerd does it on first use).
    initialized: bool = False


def check_volume_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise InvalidParameter(
            f'create {name}: "{name}" includes invalid characters for a local volume name, '
            'only "[a-zA-Z0-9][a-zA-Z0-9_.-]" are allowed. If you intended to pass a host '
            "directory, use absolute path"
        )


class VolumeManager:
    def __init__(self, root: Path, drivers: dict[str, VolumeDriver]) -> None:
        self.root = root
        self.drivers = drivers
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)

    def _meta(self, name: str) -> Path:
        return self.root / name / "meta.json"

    def driver(self, name: str) -> VolumeDriver:
        d = self.drivers.get(name or "local")
        if d is None:
            raise NotFound(f"error looking up volume plugin {name}: plugin \"{name}\" not found")
        return d

    def get(self, name: str) -> Volume:
        if not self._meta(name).is_file():
            self._sync_shared()
        try:
            data = json.loads(self._meta(name).read_text())
        except (OSError, ValueError):
            raise NotFound(f"get {name}: no such volume") from None
        return Volume(**data)

    def exists(self, name: str) -> bool:
        if self._meta(name).is_file():
            return True
        # Made by another daemon (or before the data root was emptied)?
        return self._sync_shared() and self._meta(name).is_file()

    def save(self, v: Volume) -> None:
        write_json_atomic(self._meta(v.name), asdict(v))
        drv = self.drivers.get(v.driver)
        if drv is not None and is_shared(drv):
            drv.save_record(v.name, asdict(v))  # type: ignore[attr-defined]

    def _sync_shared(self) -> bool:
        """Adopt the shared drivers' volumes this data root lacks and forget
        those removed elsewhere. False if there is no shared driver."""
        shared = {n: d for n, d in self.drivers.items() if is_shared(d)}
        for drv_name, drv in shared.items():
            try:
                records = drv.list_records()  # type: ignore[attr-defined]
            except VicdError as e:
                log.warning("volume driver %s: cannot list volumes: %s", drv_name, e.message)
                continue
            known = set()
            for rec in records:
                try:
                    v = Volume(**{k: rec[k] for k in rec if k in Volume.__dataclass_fields__})
                    check_volume_name(v.name)
                except (TypeError, InvalidParameter):
                    continue
                known.add(v.name)
                if not self._meta(v.name).is_file():
                    self._meta(v.name).parent.mkdir(parents=True, exist_ok=True)
                    write_json_atomic(self._meta(v.name), asdict(v))
            for d in self.root.iterdir():
                meta = d / "meta.json"
                if d.name not in known and meta.is_file():
                    try:
                        gone = json.loads(meta.read_text()).get("driver") == drv_name
                    except (OSError, ValueError):
                        gone = False
                    if gone:
                        shutil.rmtree(d, ignore_errors=True)
        return bool(shared)

    def list(self) -> list[Volume]:
        self._sync_shared()
        out = []
        for d in sorted(self.root.iterdir()):
            if (d / "meta.json").is_file():
                try:
                    out.append(Volume(**json.loads((d / "meta.json").read_text())))
                except (OSError, ValueError, TypeError):
                    continue
        return out

    def create(self, name: str | None, driver: str = "",
               opts: dict[str, str] | None = None, labels: dict[str, str] | None = None,
               anonymous: bool = False) -> tuple[Volume, bool]:
        """The volume (created if missing) and whether it was created now."""
        name = name or secrets.token_hex(32)
        check_volume_name(name)
        try:
            drv = self.driver(driver or "local")
        except NotFound as e:
            raise NotFound(f"create {name}: {e.message}") from None
        with self._lock:
            if self.exists(name):
                v = self.get(name)
                # An existing volume serves whoever names it; only an
                # explicit, different driver is a conflict.
                if driver and v.driver != driver:
                    raise Conflict(f"volume {name} already exists with driver {v.driver}")
                return v, False
            (self.root / name).mkdir(parents=True, exist_ok=True)
            try:
                drv.create(name, dict(opts or {}))
            except BaseException:
                shutil.rmtree(self.root / name, ignore_errors=True)
                raise
            v = Volume(name=name, driver=drv.name, created=rfc3339_now(),
                       labels=dict(labels or {}), options=dict(opts or {}),
                       anonymous=anonymous)
            self.save(v)
        return v, True

    def remove(self, name: str, users: list[str], force: bool = False) -> None:
        v = self.get(name)
        if users:
            raise Conflict(f"remove {name}: volume is in use - [{', '.join(users)}]")
        self.driver(v.driver).remove(name)
        shutil.rmtree(self.root / name, ignore_errors=True)

    def view(self, v: Volume) -> dict[str, Any]:
        drv = self.drivers.get(v.driver)
        return {
            "CreatedAt": v.created,
            "Driver": v.driver,
            "Labels": v.labels or None,
            "Mountpoint": drv.path(v.name) if drv else "",
            "Name": v.name,
            "Options": v.options or None,
            "Scope": drv.capabilities().get("Scope", "local") if drv else "local",
        }

    def matches(self, v: Volume, filters: dict[str, list[str]], in_use: bool) -> bool:
        check_keys(filters, VOLUME_FILTERS)
        if "dangling" in filters:
            want = filters["dangling"][0].lower() in ("1", "true")
            if want == in_use:
                return False
        if "driver" in filters and v.driver not in filters["driver"]:
            return False
        if "name" in filters and not any(n in v.name for n in filters["name"]):
            return False
        return label_matches(v.labels, filters.get("label", []))
