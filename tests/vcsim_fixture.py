"""govmomi's simulator as vCenter, the host emulation, and vicd on ``--backend vsphere``.

Use with ``from vcsim_fixture import vsphere_fixture  # noqa: F401`` (the fixture is
named ``vsphere``).
contrib/vcsim/main.go is the simulator (built into .cache/vcsim);
contrib/vcsim/hostemu.py boots a microVM for each container VM powered on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import GUEST_DIR, REPO, Vicd, new_vicd

VCSIM = REPO / ".cache" / "vcsim" / "vcsim"
USER, PASSWORD = "vicd-admin", "s3cr3t-Pa55"


def wait_until(pred, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_vcsim() -> Path:
    subprocess.run(["bash", str(REPO / "contrib/vcsim/build.sh"), str(VCSIM)], check=True)
    return VCSIM


@dataclass
class Proc:
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        logf = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv, stdout=logf, stderr=logf, start_new_session=True,
                                     env={**os.environ, **(env or {})})

    def stop(self, timeout: float = 20) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class VSphereEnv:
    base: Path
    port: int
    serial_port: int
    vcsim_flags: list[str] = field(default_factory=list)
    # More of vicd's TOML (other plugins' tables) and environment.
    extra_toml: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    vcsim: Proc | None = None
    hostemu: Proc | None = None
    vicd: Vicd | None = None

    @property
    def url(self) -> str:
        return f"http://{USER}:{PASSWORD}@127.0.0.1:{self.port}/sdk"

    def start_vcsim(self) -> None:
        url_file = self.base / "vcsim.url"
        url_file.unlink(missing_ok=True)
        self.vcsim = Proc([str(VCSIM), "-listen", f"127.0.0.1:{self.port}", "-url-file",
                           str(url_file), *self.vcsim_flags], self.base / "vcsim.log")
        self.vcsim.start()
        deadline = time.time() + 30
        while not url_file.exists():
            assert self.vcsim.proc and self.vcsim.proc.poll() is None, self.log("vcsim.log")
            assert time.time() < deadline, "vcsim did not start"
            time.sleep(0.05)

    def restart_vcsim(self) -> None:
        assert self.vcsim is not None
        self.vcsim.stop()
        self.start_vcsim()

    def start_hostemu(self) -> None:
        self.hostemu = Proc([sys.executable, str(REPO / "contrib/vcsim/hostemu.py"),
                             "--url", self.url, "--guest-dir", str(GUEST_DIR),
                             "--work", str(self.base / "emu")], self.base / "hostemu.log")
        self.hostemu.start(env={"PYTHONPATH": str(REPO)})

    def write_config(self) -> Path:
        cfg = self.base / "vicd.toml"
        cfg.write_text(
            "[plugins.vsphere]\n"
            f'serial_listen = "127.0.0.1:{self.serial_port}"\n'
            f'folder = "vicd-test-{self.port}"\n'
            f'resource_pool = "vicd-test-{self.port}"\n' + self.extra_toml)
        return cfg

    def vicd_args(self) -> list[str]:
        # Credentials in the environment, the rest as flags and TOML.
        return ["--backend", "vsphere", "--config", str(self.write_config()),
                "--vsphere-url", f"http://127.0.0.1:{self.port}/sdk",
                "--vsphere-datacenter", "DC0", "--vsphere-cluster", "DC0_C0",
                "--vsphere-datastore", "LocalDS_0", "--vsphere-template", "vicd-template"]

    def vicd_env(self) -> dict[str, str]:
        return {"VICD_VSPHERE_USER": USER, "VICD_VSPHERE_PASSWORD": PASSWORD, **self.extra_env}

    def start_vicd(self) -> Vicd:
        assert self.vicd is not None
        self.vicd.start(*self.vicd_args(), env=self.vicd_env())
        return self.vicd

    def backend_info(self) -> dict[str, str]:
        assert self.vicd is not None
        out = self.vicd.docker("version", "--format", "{{json .Server.Components}}").stdout
        comp = next(c for c in json.loads(out) if c["Name"] == "vicd-backend")
        return comp["Details"]

    def soap_calls(self) -> int:
        return int(self.backend_info()["soap_calls"])

    def log(self, name: str) -> str:
        try:
            return (self.base / name).read_text()[-3000:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.vicd:
            self.vicd.stop()
        if self.hostemu:
            self.hostemu.stop()
        if self.vcsim:
            self.vcsim.stop()
        shutil.rmtree(self.base / "emu", ignore_errors=True)

    # --- an administrator's view of the simulator -----------------------------------

    def admin(self) -> Admin:
        return Admin(self.port)


class Admin:
    """Another vCenter session, as an administrator would use it."""

    def __init__(self, port: int) -> None:
        from pyVim.connect import SmartConnect

        self.si = SmartConnect(protocol="http", host="127.0.0.1", port=port, user="admin",
                               pwd="admin")
        self.content = self.si.RetrieveContent()

    def vms(self) -> dict[str, object]:
        from pyVmomi import vim

        view = self.content.viewManager.CreateContainerView(
            self.content.rootFolder, [vim.VirtualMachine], True)
        try:
            return {vm.name: vm for vm in view.view}
        finally:
            view.Destroy()

    def vm(self, prefix: str) -> object:
        hits = [vm for name, vm in self.vms().items() if name.startswith(prefix + "-")]
        assert len(hits) == 1, f"{len(hits)} VMs named {prefix}-*"
        return hits[0]

    def run(self, task_of: object) -> None:
        task = task_of()  # type: ignore[operator]
        deadline = time.time() + 30
        while task.info.state not in ("success", "error"):
            assert time.time() < deadline
            time.sleep(0.05)
        assert task.info.state == "success", task.info.error


def make_env(base: Path, vcsim_flags: list[str], busybox_tar: Path,
             before_vicd: Callable[[VSphereEnv], None] | None = None) -> VSphereEnv:
    """``before_vicd`` runs once the simulator and host emulation are up (a fake
    NSX Manager pointed at the simulator, say)."""
    build_vcsim()
    env = VSphereEnv(base=base, port=free_port(), serial_port=free_port(),
                     vcsim_flags=vcsim_flags)
    env.vicd = new_vicd(base)
    try:
        env.start_vcsim()
        env.start_hostemu()
        if before_vicd is not None:
            before_vicd(env)
        env.start_vicd()
        env.vicd.docker("import", str(busybox_tar), "busybox:latest")
    except BaseException:
        env.close()
        raise
    return env


@pytest.fixture(scope="module", name="vsphere")
def vsphere_fixture(guest_dir: Path, busybox_tar: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[VSphereEnv]:
    """vcsim with InstantClone, the host emulation and a vicd on it, for a test module."""
    env = make_env(tmp_path_factory.mktemp("vsphere"), [], busybox_tar)
    yield env
    env.close()
