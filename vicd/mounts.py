"""A container's mounts from ``-v``, ``--mount``, ``VOLUME`` and ``--volumes-from``.

Each mount is kept in Docker's ``Mounts`` shape (as inspect shows it), plus
``Anonymous`` so ``docker rm -v`` knows what to delete.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

from vicd.errors import InvalidParameter
from vicd.volumes import check_volume_name


def _volume(name: str, target: str, rw: bool, driver: str = "", anonymous: bool = False,
            opts: dict[str, str] | None = None, labels: dict[str, str] | None = None
            ) -> dict[str, Any]:
    return {"Type": "volume", "Name": name, "Source": "", "Destination": target,
            "Driver": driver, "Mode": "" if rw else "ro", "RW": rw,
            "Propagation": "", "Anonymous": anonymous, "DriverOpts": opts or {},
            "Labels": labels or {}}


def _check_target(target: str, what: str = "") -> str:
    if not target:
        raise InvalidParameter("invalid mount config: mount target must not be empty")
    if not target.startswith("/"):
        raise InvalidParameter(f"invalid mount config for type \"{what or 'volume'}\": "
                               f"invalid mount path: '{target}' mount path must be absolute")
    clean = posixpath.normpath(target)
    if clean == "/":
        raise InvalidParameter("invalid specification: destination can't be '/'")
    return clean


def _bind(source: str, target: str, rw: bool) -> dict[str, Any]:
    return {"Type": "bind", "Name": "", "Source": posixpath.normpath(source),
            "Destination": target, "Driver": "", "Mode": "" if rw else "ro", "RW": rw,
            "Propagation": "rprivate", "Anonymous": False}


def _tmpfs(target: str, options: str) -> dict[str, Any]:
    return {"Type": "tmpfs", "Name": "", "Source": "", "Destination": target, "Driver": "",
            "Mode": "", "RW": "ro" not in options.split(","), "Propagation": "",
            "Anonymous": False, "Options": options}


def parse_bind(spec: str) -> dict[str, Any]:
    """One ``-v`` entry from HostConfig.Binds: ``name:/dst[:ro|rw]`` or ``/src:/dst[:opts]``."""
    parts = spec.split(":")
    if len(parts) < 2 or len(parts) > 3 or not parts[0] or not parts[1]:
        raise InvalidParameter(f"invalid volume specification: '{spec}'")
    source, target = parts[0], parts[1]
    mode = parts[2] if len(parts) == 3 else ""
    rw = True
    for opt in filter(None, mode.split(",")):
        if opt in ("ro", "rw"):
            rw = opt == "rw"
        elif opt not in ("z", "Z", "nocopy", "private", "rprivate", "shared", "rshared",
                         "slave", "rslave", "consistent", "cached", "delegated"):
            raise InvalidParameter(f"invalid mode: {opt}")
    target = _check_target(target)
    if source.startswith("/"):
        # dockerd creates a missing host folder for -v (not for --mount).
        if not os.path.exists(source):
            try:
                os.makedirs(source)
            except OSError as e:
                raise InvalidParameter(f"error while creating mount source path "
                                       f"'{source}': {e.strerror}") from None
        return _bind(source, target, rw)
    check_volume_name(source)
    return _volume(source, target, rw)


def parse_mount(m: dict[str, Any]) -> dict[str, Any]:
    """One HostConfig.Mounts entry (``--mount``)."""
    typ = m.get("Type") or "volume"
    target = _check_target(m.get("Target") or m.get("Destination") or "", typ)
    rw = not m.get("ReadOnly")
    if typ == "bind":
        source = m.get("Source") or ""
        if not source.startswith("/"):
            raise InvalidParameter(f"invalid mount config for type \"bind\": invalid mount path: "
                                   f"'{source}' mount path must be absolute")
        if not os.path.exists(source):
            raise InvalidParameter(f"invalid mount config for type \"bind\": bind source path "
                                   f"does not exist: {source}")
        return _bind(source, target, rw)
    if typ == "tmpfs":
        t = m.get("TmpfsOptions") or {}
        opts = []
        if t.get("SizeBytes"):
            opts.append(f"size={int(t['SizeBytes'])}")
        if t.get("Mode"):
            opts.append(f"mode={int(t['Mode']):o}")
        if m.get("ReadOnly"):
            opts.append("ro")
        return _tmpfs(target, ",".join(opts))
    if typ != "volume":
        raise InvalidParameter(f"invalid mount config: mount type unknown: \"{typ}\"")
    opts = m.get("VolumeOptions") or {}
    driver_cfg = opts.get("DriverConfig") or {}
    name = m.get("Source") or ""
    if name:
        check_volume_name(name)
    return _volume(name, target, rw, driver_cfg.get("Name") or "", anonymous=not name,
                   opts=driver_cfg.get("Options") or {}, labels=opts.get("Labels") or {})


def plan_mounts(config: dict[str, Any], host_config: dict[str, Any],
                volumes_from: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every mount of a new container; anonymous volumes have no name yet."""
    out: dict[str, dict[str, Any]] = {}

    def add(m: dict[str, Any]) -> None:
        if m["Destination"] in out:
            raise InvalidParameter(f"Duplicate mount point: {m['Destination']}")
        out[m["Destination"]] = m

    for spec in host_config.get("Binds") or []:
        add(parse_bind(spec))
    for target, options in (host_config.get("Tmpfs") or {}).items():  # --tmpfs
        # dockerd's defaults for --tmpfs, then what the user gave.
        add(_tmpfs(_check_target(target, "tmpfs"), ",".join(
            filter(None, ["noexec,nosuid,nodev,size=65536k", options]))))
    for m in host_config.get("Mounts") or []:
        add(parse_mount(m))
    for m in volumes_from:
        out.setdefault(m["Destination"], m)
    # The image's VOLUMEs and `-v /path`: anonymous volumes where nothing else is.
    for target in config.get("Volumes") or {}:
        if ":" in target:  # dockerd reads a full volume spec here too
            m = parse_bind(target)
            out.setdefault(m["Destination"], m)
            continue
        target = _check_target(target)
        if target not in out:
            out[target] = _volume("", target, True, anonymous=True)
    return list(out.values())


def volumes_from(spec: str, mounts: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """``--volumes-from c[:ro|rw]``: the container ref and the mounts it lends."""
    ref, _, mode = spec.partition(":")
    if mode not in ("", "ro", "rw"):
        raise InvalidParameter(f"invalid mode for volumes-from: {mode}")
    out = []
    for m in mounts:
        copy = dict(m, Anonymous=False)
        if mode:
            copy["RW"] = mode == "rw"
            copy["Mode"] = "" if copy["RW"] else "ro"
        out.append(copy)
    return ref, out


def mount_view(m: dict[str, Any]) -> dict[str, Any]:
    """The inspect ``Mounts`` entry (without our bookkeeping keys)."""
    return {k: m[k] for k in ("Type", "Name", "Source", "Destination", "Driver", "Mode", "RW",
                              "Propagation")}
