"""docker update (restart policy, memory through the balloon and the CPU limit through the
guest's cgroup live; more than the VM booted with refused, applied at the next start) and
docker top with ps arguments, with the stock CLI."""

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
        assert r.returncode != 0
        assert "CPU limit of 2 CPUs is more than the 1 vCPU(s) its VM booted with" in r.stderr
        assert vicd.inspect(name)["HostConfig"]["NanoCpus"] == 0  # nothing stored
        r = vicd.docker("update", "--cpuset-cpus", "0", name, check=False)
        assert r.returncode != 0 and "cpus of a running container cannot change" in r.stderr
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


def _cpu_share(vicd: Vicd, name: str) -> tuple[float, int]:
    """The container group's CPU use over ~2 s of guest time (usage / elapsed), read from
    the guest's cgroup cpu.stat, and its throttled-period count at the end."""
    out = vicd.docker("exec", name, "sh", "-c",
                      "cat /sys/fs/cgroup/cpu.stat /proc/uptime; sleep 2; "
                      "cat /sys/fs/cgroup/cpu.stat /proc/uptime").stdout
    samples, cur = [], {}
    for line in out.splitlines():
        k, v = line.split()[:2]
        if k.replace(".", "").isdigit():  # /proc/uptime closes a sample
            cur["uptime_usec"] = float(k) * 1e6
            samples.append(cur)
            cur = {}
        else:
            cur[k] = float(v)
    a, b = samples
    share = (b["usage_usec"] - a["usage_usec"]) / (b["uptime_usec"] - a["uptime_usec"])
    return share, int(b["nr_throttled"])


def test_update_cpus_of_a_running_container_sets_the_guest_quota(vicd: Vicd):
    name = _name("cpu")
    vicd.docker("run", "-d", "--name", name, "busybox", "sh", "-c", "while :; do :; done")
    try:
        cpu_max = ["exec", name, "cat", "/sys/fs/cgroup/cpu.max"]
        assert vicd.docker(*cpu_max).stdout == "max 100000\n"
        busy, throttled = _cpu_share(vicd, name)
        assert busy > 0.7 and throttled == 0
        vicd.docker("update", "--cpus", "0.5", name)
        assert vicd.docker(*cpu_max).stdout == "50000 100000\n"
        limited, throttled = _cpu_share(vicd, name)
        assert limited < 0.6 and throttled > 0
        assert vicd.inspect(name)["HostConfig"]["NanoCpus"] == 500_000_000
        r = vicd.docker("update", "--cpu-quota", "20000", name, check=False)
        assert r.returncode != 0 and "CPU Quota cannot be updated as NanoCPUs" in r.stderr
    finally:
        vicd.docker("rm", "-f", name, check=False)
    # --cpu-quota/--cpu-period at start, and live
    vicd.docker("run", "-d", "--name", name, "--cpu-quota", "30000", "--cpu-period", "50000",
                "busybox", "sleep", "300")
    try:
        assert vicd.docker("exec", name, "cat", "/sys/fs/cgroup/cpu.max").stdout == \
            "30000 50000\n"
        vicd.docker("update", "--cpu-quota", "40000", name)
        assert vicd.docker("exec", name, "cat", "/sys/fs/cgroup/cpu.max").stdout == \
            "40000 50000\n"
        hc = vicd.inspect(name)["HostConfig"]
        assert (hc["CpuQuota"], hc["CpuPeriod"]) == (40000, 50000)
    finally:
        vicd.docker("rm", "-f", name, check=False)
