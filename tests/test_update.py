"""docker update (restart policy live; memory/CPUs refused live, applied at the next start)
and docker top with ps arguments, with the stock CLI."""

from __future__ import annotations

import time
import uuid

from conftest import Vicd


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_update_restart_policy_live(vicd: Vicd):
    name = _name("upd")
    vicd.docker("run", "-d", "--name", name, "busybox", "sh", "-c", "sleep 3; exit 3")
    try:
        vicd.docker("update", "--restart", "on-failure:2", name)
        hc = vicd.inspect(name)["HostConfig"]["RestartPolicy"]
        assert hc == {"Name": "on-failure", "MaximumRetryCount": 2}
        deadline = time.time() + 90
        while time.time() < deadline and vicd.inspect(name)["RestartCount"] < 1:
            time.sleep(0.5)
        assert vicd.inspect(name)["RestartCount"] >= 1
    finally:
        vicd.docker("rm", "-f", name, check=False)


def test_update_resources(vicd: Vicd):
    name = _name("updres")
    vicd.docker("run", "-d", "--name", name, "busybox", "sleep", "1000")
    try:
        r = vicd.docker("update", "-m", "300m", name, check=False)
        assert r.returncode != 0
        # 300m is above the VM's 256 MiB boot size: the balloon cannot give that
        assert "cannot grow beyond the 256 MiB its VM booted with" in r.stderr
        r = vicd.docker("update", "--cpus", "2", name, check=False)
        assert r.returncode != 0 and "cpus of a running container" in r.stderr
        vicd.docker("stop", "-t", "0", name)
        vicd.docker("update", "-m", "300m", name)
        assert vicd.inspect(name)["HostConfig"]["Memory"] == 300 * 2**20
        vicd.docker("start", name)
        kb = int(vicd.docker("exec", name, "sh", "-c",
                             "grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2"
                             ).stdout.strip())
        assert kb > 200 * 1024
    finally:
        vicd.docker("rm", "-f", name, check=False)


def test_top_ps_args(vicd: Vicd):
    name = _name("top")
    vicd.docker("run", "-d", "--name", name, "busybox", "sleep", "1000")
    try:
        out = vicd.docker("top", name).stdout.splitlines()
        assert out[0].split() == ["UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"]
        out = vicd.docker("top", name, "aux").stdout.splitlines()
        assert out[0].split()[:4] == ["USER", "PID", "%CPU", "%MEM"]
        assert any(line.endswith("sleep 1000") for line in out[1:])
        out = vicd.docker("top", name, "-o", "pid,comm").stdout.splitlines()
        assert out[0].split() == ["PID", "COMMAND"]
        assert any(line.split()[1:] == ["sleep"] for line in out[1:])
        r = vicd.docker("top", name, "--bogus", check=False)
        assert r.returncode != 0 and "Error running ps" in r.stderr
    finally:
        vicd.docker("rm", "-f", name, check=False)


def test_update_memory_of_a_running_container_through_the_balloon(vicd: Vicd):
    vicd.docker("run", "-d", "--name", "balloon", "busybox", "sleep", "300")

    def total_mb() -> int:
        out = vicd.docker("exec", "balloon", "free", "-m").stdout.splitlines()[1]
        return int(out.split()[1])

    before = total_mb()
    vicd.docker("update", "-m", "128m", "balloon")
    deadline = time.time() + 30
    while total_mb() > 140 and time.time() < deadline:
        time.sleep(0.5)
    assert total_mb() <= 140 < before
    assert vicd.inspect("balloon")["HostConfig"]["Memory"] == 128 << 20
    r = vicd.docker("update", "-m", "1g", "balloon", check=False)
    assert r.returncode != 0 and "cannot grow beyond" in r.stderr
    vicd.docker("update", "-m", "256m", "balloon")  # back up to the boot size
    deadline = time.time() + 30
    while total_mb() < before - 8 and time.time() < deadline:
        time.sleep(0.5)
    assert total_mb() >= before - 8
    vicd.docker("rm", "-f", "balloon")
