"""Daemon configuration: TOML file, then command-line flags on top."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vicd.errors import InvalidParameter

DEFAULT_SOCKET = "unix:///var/run/vicd.sock"


@dataclass
class Config:
    hosts: list[str] = field(default_factory=lambda: [DEFAULT_SOCKET])
    data_root: Path = Path("/var/lib/vicd")
    backend: str = "microvm"
    # Where contrib/guest/build.sh put vmlinux, initrd.img, kernel.release.
    guest_dir: Path | None = None
    # Accelerator: "auto" probes KVM with a test boot and falls back to TCG.
    accel: str = "auto"
    vm_memory_mb: int = 256
    vm_min_memory_mb: int = 96
    rootfs_size_mb: int = 1024
    volume_size_mb: int = 1024
    # Fast start: restore per-shape template snapshots instead of cold boots.
    templates: bool = True
    templates_max: int = 8
    # Build the default shape's template at daemon start, not at the first run.
    templates_prebuild: bool = True
    socket_group: str | None = None
    socket_mode: int = 0o660
    debug: bool = False
    name: str = ""
    labels: list[str] = field(default_factory=list)
    # Registries reached over plain HTTP (host[:port]); loopback ones always may be.
    insecure_registries: list[str] = field(default_factory=list)
    # Registry transfers, as dockerd's options of the same names.
    max_concurrent_downloads: int = 3
    max_concurrent_uploads: int = 5
    max_download_attempts: int = 5
    # Push: blobs larger than this many bytes go in PATCH chunks of this size.
    push_chunk_size: int = 16 << 20
    # Per-plugin tables from the TOML file ([plugins.<name>]).
    plugins: dict[str, Any] = field(default_factory=dict)

    @property
    def resolved_guest_dir(self) -> Path:
        return self.guest_dir or self.data_root / "guest"


def load_config(path: Path | None, overrides: dict[str, Any]) -> Config:
    """Read ``path`` (TOML, keys named like the fields, dashes allowed), then apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise InvalidParameter(f"cannot read config {path}: {e}") from e
    values = {k.replace("-", "_"): v for k, v in values.items()}
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InvalidParameter(f"unknown configuration keys: {', '.join(unknown)}")
    for key in ("data_root", "guest_dir"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    for key in ("hosts", "insecure_registries"):
        if isinstance(values.get(key), str):
            values[key] = [values[key]]
    return Config(**values)
