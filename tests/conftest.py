"""Fixtures that start real things: the guest build, a vicd daemon, the docker CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vicd.testing import kill_vms, stop_process, wait_for_ping

REPO = Path(__file__).resolve().parent.parent
GUEST_DIR = Path(os.environ.get("VICD_GUEST_DIR", REPO / ".cache" / "guest"))
DOCKER = shutil.which("docker") or "/usr/local/bin/docker"


@dataclass
class Vicd:
    sock: Path
    data_root: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"

    def start(self, *extra: str, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "vicd.cli", "serve", "--host", self.host,
               "--data-root", str(self.data_root), "--guest-dir", str(GUEST_DIR), *extra]
        logf = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        wait_for_ping(self.proc, self.sock, self.log, "vicd")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc)

    def docker(self, *args: str, input: bytes | None = None, check: bool = True,
               timeout: float = 180, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "DOCKER_HOST": self.host, **(env or {})}
        full_env.pop("DOCKER_API_VERSION", None)
        r = subprocess.run([DOCKER, *args], input=input, capture_output=True,
                           timeout=timeout, env=full_env)
        out = subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"),
                                          r.stderr.decode(errors="replace"))
        if check and r.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} -> {r.returncode}\n{out.stdout}\n"
                                 f"{out.stderr}")
        return out

    def inspect(self, ref: str) -> dict:
        return json.loads(self.docker("inspect", ref).stdout)[0]

    def kill_vms(self) -> None:
        """Stop every QEMU this daemon started (they outlive the daemon by design)."""
        kill_vms(self.data_root)


@pytest.fixture(scope="session")
def guest_dir() -> Path:
    subprocess.run(["bash", str(REPO / "contrib/guest/build.sh"), str(GUEST_DIR)], check=True)
    return GUEST_DIR


@pytest.fixture(scope="session")
def busybox_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rootfs") / "busybox.tar"
    subprocess.run(["bash", str(REPO / "contrib/guest/mkrootfs-busybox.sh"), str(out)],
                   check=True)
    return out


def new_vicd(base: Path) -> Vicd:
    # AF_UNIX paths are short: keep the socket out of pytest's deep tmp dirs.
    sockdir = Path(f"/tmp/vicd-test-{os.getpid()}-{time.monotonic_ns()}")
    sockdir.mkdir()
    return Vicd(sock=sockdir / "d.sock", data_root=base / "data", log=base / "vicd.log")


def configured_vicd(base: Path, config: str) -> Vicd:
    """A started daemon with `config` as its TOML file and no templates (for tests that run
    no container: registry transfers)."""
    (base / "vicd.toml").write_text(config)
    d = new_vicd(base)
    d.start("--config", str(base / "vicd.toml"), "--no-templates")
    return d


@pytest.fixture(scope="session")
def vicd(guest_dir: Path, busybox_tar: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Vicd]:
    """One daemon for the session, with busybox:latest imported."""
    d = new_vicd(tmp_path_factory.mktemp("vicd"))
    d.start()
    d.docker("import", str(busybox_tar), "busybox:latest")
    yield d
    d.stop()
    d.kill_vms()


@pytest.fixture
def fresh_vicd(guest_dir: Path, busybox_tar: Path, tmp_path: Path) -> Iterator[Vicd]:
    """A daemon of the test's own (for restarts and kill -9)."""
    d = new_vicd(tmp_path)
    d.start()
    d.docker("import", str(busybox_tar), "busybox:latest")
    yield d
    d.stop()
    d.kill_vms()


@pytest.fixture
def docker_config(tmp_path: Path) -> dict[str, str]:
    """A private client config dir (as env for Vicd.docker): logins must not touch ~/.docker."""
    d = tmp_path / "dockercfg"
    d.mkdir()
    return {"DOCKER_CONFIG": str(d)}
