"""The container record: what is stored per container and survives restarts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Docker's state names, in the order inspect reports them.
CREATED, RUNNING, PAUSED, RESTARTING, EXITED, DEAD, REMOVING = (
    "created",
    "running",
    "paused",
    "restarting",
    "exited",
    "dead",
    "removing",
)


@dataclass
class State:
    status: str = CREATED
    pid: int = 0
    exit_code: int = 0
    error: str = ""
    started_at: str = "0001-01-01T00:00:00Z"
    finished_at: str = "0001-01-01T00:00:00Z"
    oom_killed: bool = False
    # Docker's State.Health ({Status, FailingStreak, Log}) with a healthcheck (vicd.health).
    health: dict[str, Any] | None = None

    @property
    def running(self) -> bool:
        return self.status in (RUNNING, PAUSED, RESTARTING)


@dataclass
class Container:
    id: str
    name: str  # without the leading slash
    created: str  # RFC 3339 with nanoseconds
    image_id: str
    image_ref: str  # what the user asked for (Config.Image)
    path: str
    args: list[str]
    config: dict[str, Any]  # Docker's Config, as created (after image defaults)
    host_config: dict[str, Any]  # Docker's HostConfig
    state: State = field(default_factory=State)
    restart_count: int = 0
    # Set by stop/kill from the user: restart policies then do not restart.
    stopped_by_user: bool = False
    has_been_started: bool = False
    exec_ids: list[str] = field(default_factory=list)
    # The NIC of the running VM (vicd.network.NIC as a dict), with its
    # published ports; None while the container is not running.
    nic: dict[str, Any] | None = None
    # Volumes in Docker's Mounts shape (vicd.mounts), fixed at create.
    mounts: list[dict[str, Any]] = field(default_factory=list)
    # Configured networks by name -> EndpointSettings (vicd.container_networks);
    # None in records from before user-defined networks.
    networks: dict[str, dict[str, Any]] | None = None

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def restart_policy(self) -> tuple[str, int]:
        rp = self.host_config.get("RestartPolicy") or {}
        return rp.get("Name") or "no", int(rp.get("MaximumRetryCount") or 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Container:
        data = dict(data)
        data["state"] = State(**data.get("state", {}))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})
