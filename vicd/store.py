"""Crash-safe storage of container records: one JSON file per container.

Every write goes to a temporary file, is fsynced and renamed over the old
one, so a ``kill -9`` at any moment leaves either the old or the new record.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from vicd.container import Container

log = logging.getLogger(__name__)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_json_atomic(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=1).encode())


class ContainerStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def dir_for(self, container_id: str) -> Path:
        return self.root / container_id

    def save(self, c: Container) -> None:
        d = self.dir_for(c.id)
        d.mkdir(exist_ok=True)
        write_json_atomic(d / "config.json", c.to_dict())

    def load_all(self) -> list[Container]:
        out = []
        for d in sorted(self.root.iterdir()):
            cfg = d / "config.json"
            if not cfg.is_file():
                continue
            try:
                out.append(Container.from_dict(json.loads(cfg.read_text())))
            except (ValueError, TypeError, KeyError) as e:
                # A record we cannot read is kept on disk for a human, not deleted.
                log.error("skipping unreadable container record %s: %s", cfg, e)
        return out

    def delete(self, container_id: str) -> None:
        d = self.dir_for(container_id)
        if d.exists():
            import shutil

            shutil.rmtree(d, ignore_errors=True)
