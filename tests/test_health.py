"""Healthchecks with the stock CLI: --health-* flags, the image's HEALTHCHECK,
--no-healthcheck, State.Health, health_status events, ps Status and the health filter."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import docker

from conftest import DOCKER, Vicd


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _wait_health(vicd: Vicd, name: str, want: str, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        health = vicd.inspect(name)["State"].get("Health")
        if health and health["Status"] == want:
            return health
        time.sleep(0.3)
    raise AssertionError(f"{name} never {want}: {vicd.inspect(name)['State']}")


def test_health_flags_status_events_filter(vicd: Vicd):
    name = _name("hc")
    since = str(int(time.time()))
    vicd.docker("run", "-d", "--name", name, "--health-cmd", "cat /tmp/ok",
                "--health-interval", "1s", "--health-retries", "2", "busybox", "sh", "-c",
                "echo fine > /tmp/ok; sleep 1000")
    try:
        status = vicd.docker("ps", "--filter", f"name={name}", "--format", "{{.Status}}").stdout
        assert "(health: starting)" in status or "(healthy)" in status
        health = _wait_health(vicd, name, "healthy")
        assert health["FailingStreak"] == 0
        assert health["Log"][-1]["ExitCode"] == 0 and health["Log"][-1]["Output"] == "fine\n"
        assert "(healthy)" in vicd.docker("ps", "--filter", f"name={name}", "--format",
                                          "{{.Status}}").stdout
        assert vicd.docker("ps", "-q", "--filter", "health=healthy", "--filter",
                           f"name={name}").stdout.strip()
        assert not vicd.docker("ps", "-q", "--filter", "health=none", "--filter",
                               f"name={name}").stdout.strip()
        vicd.docker("exec", name, "rm", "/tmp/ok")
        health = _wait_health(vicd, name, "unhealthy")
        assert health["FailingStreak"] >= 2 and health["Log"][-1]["ExitCode"] == 1
        assert len(health["Log"]) <= 5
        assert "(unhealthy)" in vicd.docker("ps", "--filter", f"name={name}", "--format",
                                            "{{.Status}}").stdout
        ev = subprocess.run(
            [DOCKER, "events", "--since", since, "--until", str(int(time.time()) + 1),
             "--filter", f"container={name}", "--format", "{{.Action}}"],
            capture_output=True, text=True, timeout=30,
            env={"DOCKER_HOST": vicd.host, "PATH": "/usr/bin:/bin"}).stdout.splitlines()
        assert "health_status: healthy" in ev and "health_status: unhealthy" in ev
        assert "exec_start: /bin/sh -c cat /tmp/ok" in ev and "exec_die" in ev
        r = vicd.docker("ps", "--filter", "health=bogus", check=False)
        assert r.returncode != 0 and "Unrecognised filter value for health" in r.stderr
    finally:
        vicd.docker("rm", "-f", name, check=False)


def test_health_timeout(vicd: Vicd):
    name = _name("hct")
    vicd.docker("run", "-d", "--name", name, "--health-cmd", "sleep 30",
                "--health-interval", "1s", "--health-timeout", "1s", "--health-retries", "1",
                "busybox", "sleep", "1000")
    try:
        health = _wait_health(vicd, name, "unhealthy")
        assert health["Log"][-1]["ExitCode"] == -1
        assert health["Log"][-1]["Output"] == "Health check exceeded timeout (1s)"
    finally:
        vicd.docker("rm", "-f", name, check=False)


def test_image_healthcheck_and_no_healthcheck(vicd: Vicd):
    base = _name("hcbase")
    repo = f"hcimg-{uuid.uuid4().hex[:6]}"
    vicd.docker("create", "--name", base, "busybox", "true")
    client = docker.DockerClient(base_url=vicd.host)
    try:
        client.containers.get(base).commit(repository=repo, conf={
            "Cmd": ["sleep", "1000"],
            "Healthcheck": {"Test": ["CMD", "true"], "Interval": 1_000_000_000}})
        img = json.loads(vicd.docker("image", "inspect", repo).stdout)[0]
        assert img["Config"]["Healthcheck"]["Test"] == ["CMD", "true"]
        name = _name("hcfromimage")
        vicd.docker("run", "-d", "--name", name, repo)
        try:
            _wait_health(vicd, name, "healthy")
        finally:
            vicd.docker("rm", "-f", name, check=False)
        name = _name("nohc")
        vicd.docker("run", "-d", "--name", name, "--no-healthcheck", repo)
        try:
            assert "Health" not in vicd.inspect(name)["State"]
            assert vicd.docker("ps", "-q", "--filter", "health=none", "--filter",
                               f"name={name}").stdout.strip()
        finally:
            vicd.docker("rm", "-f", name, check=False)
    finally:
        client.close()
        vicd.docker("rm", "-f", base, check=False)
        vicd.docker("rmi", "-f", repo, check=False)


def test_health_survives_a_daemon_kill(fresh_vicd: Vicd):
    d = fresh_vicd
    # Probes every second while starting, then once a minute: a daemon that restarted the
    # status at "starting" would show it for a whole second at least.
    d.docker("run", "-d", "--name", "hck", "--health-cmd", "true", "--health-interval", "60s",
             "--health-start-period", "60s", "--health-start-interval", "1s", "busybox",
             "sleep", "1000")
    before = _wait_health(d, "hck", "healthy")
    d.kill9()
    d.start()
    assert "reattached to its running VM" in d.log.read_text()
    health = d.inspect("hck")["State"]["Health"]
    assert health["Status"] == "healthy" and health["Log"] == before["Log"]
    assert "(healthy)" in d.docker("ps", "--filter", "name=hck", "--format",
                                   "{{.Status}}").stdout
    d.docker("rm", "-f", "hck")
