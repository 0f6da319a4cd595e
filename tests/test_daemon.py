"""The daemon itself: crash safety, reconciliation, plugins, the vicd command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, Vicd, new_vicd


def _numbers(text: str) -> list[int]:
    return [int(x) for x in text.split() if x.isdigit()]


def test_kill9_daemon_keeps_containers_and_logs(fresh_vicd: Vicd):
    d = fresh_vicd
    d.docker("run", "-d", "--name", "counter", "busybox", "sh", "-c",
             "i=0; while true; do echo $i; i=$((i+1)); sleep 0.2; done")
    d.docker("run", "-d", "--name", "short", "busybox", "sh", "-c", "sleep 3; exit 4")
    time.sleep(1.5)
    pid_before = d.inspect("counter")["State"]["Pid"]
    d.kill9()
    time.sleep(4)  # "short" exits while no daemon is there
    d.start()
    st = d.inspect("counter")["State"]
    assert st["Running"] is True and st["Pid"] == pid_before
    n0 = len(_numbers(d.docker("logs", "counter").stdout))
    time.sleep(1.5)
    nums = _numbers(d.docker("logs", "counter").stdout)
    assert len(nums) > n0, "logs continue after the restart"
    # Output made while the daemon was down waited in the guest: at most the
    # frame in flight at the kill can be missing.
    gaps = sum(1 for a, b in zip(nums, nums[1:], strict=False) if b != a + 1)
    assert nums == sorted(nums) and gaps <= 1, nums
    d.docker("wait", "short")
    st = d.inspect("short")["State"]
    assert st["Status"] == "exited" and st["ExitCode"] == 4
    d.docker("rm", "-f", "counter", "short")


def test_vm_killed_behind_our_back_is_exit_137(fresh_vicd: Vicd):
    d = fresh_vicd
    d.docker("run", "-d", "--name", "victim", "busybox", "sleep", "300")
    pid = d.inspect("victim")["State"]["Pid"]
    os.kill(pid, 9)
    assert d.docker("wait", "victim").stdout.strip() == "137"
    time.sleep(1.1)  # --until is whole seconds, as on dockerd
    events = d.docker("events", "--since", "1m", "--until", "0s", "--filter",
                      "container=victim", "--format", "{{.Action}} {{.Actor.Attributes.exitCode}}"
                      ).stdout
    assert "die 137" in events


def test_orphan_vms_are_reaped_on_start(fresh_vicd: Vicd):
    d = fresh_vicd
    cid = d.docker("run", "-d", "busybox", "sleep", "300").stdout.strip()
    pid = d.inspect(cid)["State"]["Pid"]
    d.kill9()
    # The record vanishes (as if lost), the VM keeps running: an orphan.
    import shutil

    shutil.rmtree(d.data_root / "containers" / cid)
    d.start()
    deadline = time.time() + 10
    while time.time() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "orphan QEMU still running"


def test_third_party_plugin_hooks_are_called(guest_dir, busybox_tar, tmp_path: Path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target),
                    str(REPO / "tests/plugins/vicd-testplugin")], check=True)
    env = {"PYTHONPATH": str(target), "VICD_TESTPLUGIN_LOG": str(tmp_path / "hooks.log")}
    out = subprocess.run([sys.executable, "-m", "vicd.cli", "plugins"], capture_output=True,
                         text=True, env={**os.environ, **env}, check=True).stdout
    assert "testplugin\t0.0.7" in out
    assert "microvm\t" in out
    d = new_vicd(tmp_path)
    d.start(env=env)
    try:
        d.docker("import", str(busybox_tar), "busybox:latest")
        r = d.docker("run", "--rm", "busybox", "sh", "-c", "echo $FROM_TESTPLUGIN")
        assert r.stdout == "yes\n"
        calls = [json.loads(line) for line in (tmp_path / "hooks.log").read_text().splitlines()]
        assert [c["hook"] for c in calls] == [
            "container_created", "before_start", "after_stop", "container_removed"]
        assert len({c["id"] for c in calls}) == 1
        assert calls[2]["exit_code"] == 0
        # Its volume driver serves `docker volume create -d testdisk`.
        d.docker("volume", "create", "-d", "testdisk", "tv")
        d.docker("run", "--rm", "-v", "tv:/t", "busybox", "sh", "-c", "echo via-plugin > /t/f")
        r = d.docker("run", "--rm", "-v", "tv:/t", "busybox", "cat", "/t/f")
        assert r.stdout == "via-plugin\n"
        assert (d.data_root / "testdisk" / "tv" / "disk.img").is_file()
        assert "volume_create" in (tmp_path / "hooks.log").read_text()
        # Its network driver serves `docker network create -d testnet`.
        nid = d.docker("network", "create", "-d", "testnet", "tn").stdout.strip()
        d.docker("run", "-d", "--name", "tsrv", "--network", "tn", "busybox", "sh", "-c",
                 "echo via-testnet > /tmp/index.html; exec httpd -f -p 80 -h /tmp")
        r = d.docker("run", "--rm", "--network", "tn", "busybox", "wget", "-qO-", "http://tsrv/")
        assert r.stdout == "via-testnet\n"
        d.docker("rm", "-f", "tsrv")
        d.docker("network", "rm", "tn")
        net_calls = [c["hook"] for c in map(json.loads, (tmp_path / "hooks.log").read_text()
                                            .splitlines()) if c.get("id", c.get("network")) == nid]
        assert net_calls[0] == "network_create" and net_calls[-1] == "network_delete"
        assert net_calls.count("join") == 2 and net_calls.count("leave") == 2
        assert net_calls.count("endpoint_create") == 2 and net_calls.count("endpoint_delete") == 2
    finally:
        d.stop()
        d.kill_vms()


def test_bad_requests_get_docker_errors(vicd: Vicd):
    import http.client
    import socket

    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(str(vicd.sock))

    def req(method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        c = Conn("x")
        c.request(method, path, body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else {}

    assert req("GET", "/v1.99/version") == (
        400, {"message": "client version 1.99 is too new. Maximum supported API version is 1.47"})
    status, body = req("GET", "/v1.12/version")
    assert status == 400 and "too old" in body["message"]
    status, body = req("POST", "/v1.47/containers/create", b"{not json")
    assert status == 400 and "invalid JSON" in body["message"]
    status, body = req("POST", "/v1.47/containers/create", b'{"Image":"nosuch"}')
    assert status == 404 and body["message"] == "No such image: nosuch:latest"
    status, body = req("POST", "/v1.47/containers/create",
                       b'{"Image":"busybox","Cmd":["true"],"HostConfig":{"Memory":1000}}')
    assert status == 400 and "Minimum memory limit" in body["message"]
    status, body = req("GET", "/v1.47/nosuch/endpoint")
    assert status == 404 and body == {"message": "page not found"}
    status, body = req("POST", "/v1.47/containers/nosuch/kill?signal=NOPE")
    assert status == 404
    cid = req("POST", "/v1.47/containers/create", b'{"Image":"busybox","Cmd":["true"]}')[1]["Id"]
    status, body = req("POST", f"/v1.47/containers/{cid}/kill?signal=NOPE")
    assert status in (400, 409)
    status, body = req("POST", f"/v1.47/containers/{cid}/wait?condition=bogus")
    assert status == 400
    assert req("DELETE", f"/v1.47/containers/{cid}")[0] == 204


def test_sigterm_restart_keeps_running_containers(fresh_vicd: Vicd):
    d = fresh_vicd
    d.docker("run", "-d", "--name", "survivor", "busybox", "sh", "-c",
             "while true; do echo tick; sleep 0.3; done")
    pid = d.inspect("survivor")["State"]["Pid"]
    d.stop()  # SIGTERM: a clean daemon shutdown
    d.start()  # at once: the old daemon's channel must already be free
    st = d.inspect("survivor")["State"]
    assert st["Running"] is True and st["Pid"] == pid
    assert d.docker("exec", "survivor", "echo", "still-here").stdout == "still-here\n"
    d.docker("rm", "-f", "survivor")
