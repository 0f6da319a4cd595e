"""User-defined networks on the microvm backend: create/connect/DNS, as dockerd does.

Each container VM reaches a network through a NIC slot (a tap on the
network's bridge in vicd's own network namespace); names resolve through the
embedded DNS on the network's gateway.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from conftest import Vicd


@pytest.fixture
def net(vicd: Vicd) -> Iterator[str]:
    """A fresh user-defined network, removed with its containers afterwards."""
    name = f"net{time.monotonic_ns() % 10**9}"
    vicd.docker("network", "create", name)
    yield name
    ids = []
    for c in vicd.docker("ps", "-aq").stdout.split():
        nets = vicd.inspect(c)["NetworkSettings"]["Networks"]
        if name in nets:
            ids.append(c)
    if ids:
        vicd.docker("rm", "-f", *set(ids), check=False)
    vicd.docker("network", "rm", name, check=False)


def _guest_addr(vicd: Vicd, ref: str, mac: str) -> str:
    """The IPv4/prefix of the guest NIC with this MAC, read inside the VM."""
    out = vicd.docker("exec", ref, "ip", "-o", "-4", "addr").stdout
    links = vicd.docker("exec", ref, "ip", "-o", "link").stdout
    name = next(ln.split(":")[1].strip() for ln in links.splitlines() if mac in ln)
    return next(ln.split()[3] for ln in out.splitlines() if ln.split()[1] == name)


def test_create_inspect_ls_rm(vicd: Vicd):
    r = vicd.docker("network", "create", "--subnet", "10.77.0.0/24", "--gateway", "10.77.0.254",
                    "--label", "team=blue", "lsnet")
    nid = r.stdout.strip()
    try:
        info = json.loads(vicd.docker("network", "inspect", "lsnet").stdout)[0]
        assert info["Id"] == nid and info["Driver"] == "bridge" and info["Scope"] == "local"
        assert info["IPAM"]["Config"] == [{"Subnet": "10.77.0.0/24", "Gateway": "10.77.0.254"}]
        assert info["Labels"] == {"team": "blue"}
        rows = vicd.docker("network", "ls", "--filter", "label=team=blue",
                           "--format", "{{.Name}} {{.Driver}}").stdout.split("\n")
        assert rows[0] == "lsnet bridge"
        assert vicd.docker("network", "ls", "--filter", "type=custom", "-q").stdout.split() \
            == [nid[:12]]
        assert json.loads(vicd.docker("network", "inspect", nid[:6]).stdout)[0]["Name"] == "lsnet"
    finally:
        vicd.docker("network", "rm", "lsnet")
    r = vicd.docker("network", "inspect", "lsnet", check=False)
    assert r.returncode == 1 and "network lsnet not found" in r.stderr


def test_docker_info_lists_the_network_drivers(vicd: Vicd):
    plugins = json.loads(vicd.docker("info", "--format", "{{json .Plugins}}").stdout)
    assert {"bridge", "null"} <= set(plugins["Network"])
    assert "local" in plugins["Volume"]


def test_bad_input_gets_dockerds_errors(vicd: Vicd, net: str):
    r = vicd.docker("network", "create", net, check=False)
    assert f"network with name {net} already exists" in r.stderr
    subnet = json.loads(vicd.docker("network", "inspect", net).stdout)[0]["IPAM"]["Config"][0]
    r = vicd.docker("network", "create", "--subnet", subnet["Subnet"], "other", check=False)
    assert "Pool overlaps with other one on this address space" in r.stderr
    r = vicd.docker("network", "create", "--subnet", "10.0.2.0/24", "slirp", check=False)
    assert "Pool overlaps" in r.stderr
    r = vicd.docker("network", "create", "--subnet", "300.1.0.0/16", "bad", check=False)
    assert "invalid CIDR address: 300.1.0.0/16" in r.stderr
    r = vicd.docker("network", "create", "-d", "nosuchdriver", "bad", check=False)
    assert 'plugin "nosuchdriver" not found' in r.stderr
    r = vicd.docker("run", "--rm", "--network", "nosuchnet", "busybox", "true", check=False)
    assert r.returncode == 125 and "network nosuchnet not found" in r.stderr
    r = vicd.docker("network", "rm", "bridge", check=False)
    assert "bridge is a pre-defined network and cannot be removed" in r.stderr
    r = vicd.docker("network", "connect", "nosuchnet", "nosuchcontainer", check=False)
    assert "network nosuchnet not found" in r.stderr
    # Nothing of the refused ones exists.
    names = vicd.docker("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert "other" not in names and "bad" not in names and "slirp" not in names


def test_containers_find_each_other_by_name_and_alias(vicd: Vicd, net: str):
    vicd.docker("run", "-d", "--name", f"{net}-web", "--network", net, "--network-alias",
                "www", "busybox", "sh", "-c",
                "echo served-by-web > /tmp/index.html; exec httpd -f -p 80 -h /tmp")
    out = vicd.docker("run", "--rm", "--network", net, "busybox", "sh", "-c",
                      f"wget -qO- http://{net}-web/; wget -qO- http://www/; "
                      "cat /etc/resolv.conf").stdout
    assert out.startswith("served-by-web\nserved-by-web\n")
    gw = json.loads(vicd.docker("network", "inspect", net).stdout)[0]["IPAM"]["Config"][0]
    assert f"nameserver {gw['Gateway']}" in out and "options ndots:0" in out


def test_inspect_shows_the_guests_real_address(vicd: Vicd, net: str):
    vicd.docker("run", "-d", "--name", f"{net}-a", "--network", net, "busybox", "sleep", "300")
    ep = vicd.inspect(f"{net}-a")["NetworkSettings"]["Networks"][net]
    assert ep["IPAddress"] and ep["MacAddress"] and ep["Gateway"]
    assert _guest_addr(vicd, f"{net}-a", ep["MacAddress"]) == \
        f"{ep['IPAddress']}/{ep['IPPrefixLen']}"
    hosts = vicd.docker("exec", f"{net}-a", "cat", "/etc/hosts").stdout
    assert re.search(rf"^{re.escape(ep['IPAddress'])}\s", hosts, re.M)
    members = json.loads(vicd.docker("network", "inspect", net).stdout)[0]["Containers"]
    assert [m["Name"] for m in members.values()] == [f"{net}-a"]
    # A stopped container has no endpoint; its address goes back to the pool.
    vicd.docker("stop", "-t", "1", f"{net}-a")
    assert vicd.inspect(f"{net}-a")["NetworkSettings"]["Networks"][net]["IPAddress"] == ""
    assert json.loads(vicd.docker("network", "inspect", net).stdout)[0]["Containers"] == {}


def test_networks_are_isolated(vicd: Vicd, net: str):
    other = f"{net}x"
    vicd.docker("network", "create", other)
    try:
        vicd.docker("run", "-d", "--name", f"{net}-srv", "--network", net, "busybox",
                     "sleep", "300")
        r = vicd.docker("run", "--rm", "--network", other, "busybox", "nslookup",
                        f"{net}-srv", check=False)
        assert "NXDOMAIN" in r.stdout + r.stderr
        ip = vicd.inspect(f"{net}-srv")["NetworkSettings"]["Networks"][net]["IPAddress"]
        # Same subnet? No: the other network's container has no route to it but its
        # egress NIC; the bridge of `net` never sees its ARP.
        r = vicd.docker("run", "--rm", "--network", other, "busybox", "arping", "-c", "2",
                        "-w", "3", "-I", "eth1", ip, check=False)
        assert r.returncode != 0
    finally:
        vicd.docker("network", "rm", other, check=False)


def test_connect_and_disconnect_a_running_container(vicd: Vicd, net: str):
    other = f"{net}b"
    vicd.docker("network", "create", other)
    try:
        vicd.docker("run", "-d", "--name", f"{net}-db", "--network", net, "busybox", "sh", "-c",
                    "echo db-answer > /tmp/index.html; exec httpd -f -p 80 -h /tmp")
        vicd.docker("run", "-d", "--name", f"{net}-app", "--network", other, "busybox",
                    "sleep", "300")
        r = vicd.docker("exec", f"{net}-app", "wget", "-qO-", f"http://{net}-db/", check=False)
        assert r.returncode != 0
        vicd.docker("network", "connect", "--alias", "appalias", net, f"{net}-app")
        ep = vicd.inspect(f"{net}-app")["NetworkSettings"]["Networks"][net]
        assert ep["IPAddress"] and "appalias" in ep["Aliases"]
        assert _guest_addr(vicd, f"{net}-app", ep["MacAddress"]).startswith(ep["IPAddress"])
        assert vicd.docker("exec", f"{net}-app", "wget", "-qO-",
                           f"http://{net}-db/").stdout == "db-answer\n"
        # The alias resolves for the network's other members.
        out = vicd.docker("exec", f"{net}-db", "nslookup", "appalias").stdout
        assert ep["IPAddress"] in out
        r = vicd.docker("network", "connect", net, f"{net}-app", check=False)
        assert "already exists in network" in r.stderr
        vicd.docker("network", "disconnect", net, f"{net}-app")
        assert net not in vicd.inspect(f"{net}-app")["NetworkSettings"]["Networks"]
        links = vicd.docker("exec", f"{net}-app", "ip", "-o", "-4", "addr").stdout
        assert ep["IPAddress"] not in links
        r = vicd.docker("network", "disconnect", net, f"{net}-app", check=False)
        assert "is not connected to network" in r.stderr
        r = vicd.docker("network", "rm", net, check=False)
        assert "has active endpoints" in r.stderr
    finally:
        vicd.docker("rm", "-f", f"{net}-app", check=False)
        vicd.docker("network", "rm", other, check=False)


def test_network_containers_start_from_templates(vicd: Vicd, net: str):
    r = vicd.docker("run", "-d", "--network", net, "busybox", "sleep", "60")
    cid = r.stdout.strip()
    log = vicd.log.read_text(errors="replace")
    assert re.search(rf"container {cid[:12]}: VM pid \d+ restored from template", log)


def test_networks_and_addresses_survive_a_daemon_restart(fresh_vicd: Vicd):
    d = fresh_vicd
    d.docker("network", "create", "keep")
    d.docker("run", "-d", "--name", "k1", "--network", "keep", "busybox", "sh", "-c",
             "echo k1 > /tmp/index.html; exec httpd -f -p 80 -h /tmp")
    ip = d.inspect("k1")["NetworkSettings"]["Networks"]["keep"]["IPAddress"]
    d.kill9()
    d.start()
    assert d.inspect("k1")["NetworkSettings"]["Networks"]["keep"]["IPAddress"] == ip
    out = d.docker("run", "--rm", "--network", "keep", "busybox", "wget", "-qO-",
                   "http://k1/").stdout
    assert out == "k1\n"
    events = d.docker("events", "--since", "0", "--until", str(int(time.time()) + 1),
                      "--filter", "type=network", "--format", "{{.Action}}").stdout.split()
    assert "connect" in events and "disconnect" in events


def test_prune_removes_unused_networks(vicd: Vicd):
    vicd.docker("network", "create", "--label", "prune=me", "unused1")
    r = vicd.docker("network", "prune", "-f", "--filter", "label=prune=me")
    assert "unused1" in r.stdout
    assert "unused1" not in vicd.docker("network", "ls", "--format", "{{.Name}}").stdout


COMPOSE = """\
version: "3.8"
services:
  web:
    image: busybox
    command: ["httpd", "-f", "-p", "80", "-h", "/www"]
    ports: ["{port}:80"]
    volumes: ["webdata:/www", "{bind}:/conf:ro"]
    depends_on: [db]
  db:
    image: busybox
    command: ["sh", "-c", "echo dbvalue > /tmp/value && exec httpd -f -p 5432 -h /tmp"]
volumes:
  webdata: {{}}
"""


def test_docker_compose_web_and_db(vicd: Vicd, tmp_path: Path):
    """Debian's docker-compose 1.29, unchanged: a network, a named volume, a bind."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "app.conf").write_text("setting=1\n")
    (tmp_path / "docker-compose.yml").write_text(
        COMPOSE.format(port=port, bind=tmp_path / "conf"))
    env = {"DOCKER_HOST": vicd.host, "PATH": "/usr/bin:/bin:/usr/local/bin"}

    def compose(*args: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["docker-compose", "-p", "vicdtest", *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return r

    compose("up", "-d")
    try:
        compose("exec", "-T", "web", "sh", "-c", "wget -qO- http://db:5432/value > /www/index.html")
        deadline = time.time() + 30
        body = ""
        while time.time() < deadline:
            r = subprocess.run(["curl", "-s", f"http://127.0.0.1:{port}/"], capture_output=True,
                               text=True)
            body = r.stdout
            if body == "dbvalue\n":
                break
            time.sleep(0.5)
        assert body == "dbvalue\n"
        assert compose("exec", "-T", "web", "cat", "/conf/app.conf").stdout == "setting=1\n"
        # Data in the named volume is still there after down (without -v) and up.
        compose("down")
        compose("up", "-d")
        assert compose("exec", "-T", "web", "cat", "/www/index.html").stdout == "dbvalue\n"
    finally:
        compose("down", "-v")
    assert "vicdtest" not in vicd.docker("ps", "-a", "--format", "{{.Names}}").stdout
    assert "vicdtest" not in vicd.docker("network", "ls", "--format", "{{.Name}}").stdout
    assert "vicdtest" not in vicd.docker("volume", "ls", "-q").stdout


def test_internal_network_and_fixed_address(vicd: Vicd):
    vicd.docker("network", "create", "--internal", "--subnet", "10.88.0.0/24", "inet")
    try:
        out = vicd.docker("run", "--rm", "--network", "inet", "--ip", "10.88.0.50", "busybox",
                          "sh", "-c", "ip -o -4 addr; ip route").stdout
        assert "10.88.0.50/24" in out
        assert "10.0.2.15" not in out and "default" not in out  # no egress NIC up
        r = vicd.docker("run", "--rm", "--network", "inet", "--ip", "10.99.0.5", "busybox",
                        "true", check=False)
        assert r.returncode != 0 and "no matching subnet" in r.stderr
    finally:
        vicd.docker("network", "rm", "inet")


HEALTHY = """\
version: "2.4"
services:
  db:
    image: busybox
    command: ["sh", "-c", "sleep 2; touch /tmp/ready; exec sleep 300"]
    healthcheck:
      test: ["CMD", "test", "-f", "/tmp/ready"]
      interval: 1s
      retries: 30
  app:
    image: busybox
    command: ["sleep", "300"]
    depends_on:
      db:
        condition: service_healthy
"""


def test_docker_compose_waits_for_a_healthy_service(vicd: Vicd, tmp_path: Path):
    """compose's service_healthy: app starts only once db's healthcheck passed."""
    (tmp_path / "docker-compose.yml").write_text(HEALTHY)
    env = {"DOCKER_HOST": vicd.host, "PATH": "/usr/bin:/bin:/usr/local/bin"}
    run = ["docker-compose", "-p", "vicdhealth"]
    try:
        r = subprocess.run([*run, "up", "-d"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        db = vicd.inspect("vicdhealth_db_1")
        app = vicd.inspect("vicdhealth_app_1")
        assert db["State"]["Health"]["Status"] == "healthy"
        # db becomes healthy 2 s after it starts at the earliest: app waited for that.
        started = [datetime.fromisoformat(x["State"]["StartedAt"][:26]) for x in (db, app)]
        assert (started[1] - started[0]).total_seconds() >= 2
    finally:
        subprocess.run([*run, "down", "-v"], cwd=tmp_path, env=env, capture_output=True,
                       timeout=300)


def test_a_connected_guest_announces_itself(vicd: Vicd, net: str):
    """Gratuitous ARP from the guest when a slot comes up (after a restore or a
    connect): captured on the network's bridge inside vicd's namespace."""
    import socket
    import struct

    from vicd.plugins.microvm.bridge_driver import bridge_name
    from vicd.plugins.microvm.netns import namespace_for

    nid = json.loads(vicd.docker("network", "inspect", net).stdout)[0]["Id"]
    ns = namespace_for(vicd.data_root)

    def sniffer() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
        s.bind((bridge_name(nid), 0))
        s.settimeout(1)
        return s

    sock = ns.run_inside(sniffer)
    try:
        vicd.docker("run", "-d", "--name", f"{net}-arp", "busybox", "sleep", "300")
        vicd.docker("network", "connect", net, f"{net}-arp")
        ip = vicd.inspect(f"{net}-arp")["NetworkSettings"]["Networks"][net]["IPAddress"]
        want = socket.inet_aton(ip)
        deadline = time.time() + 20
        seen = False
        while not seen and time.time() < deadline:
            try:
                frame = sock.recv(128)
            except TimeoutError:
                continue
            op, spa, tpa = struct.unpack("!H", frame[20:22])[0], frame[28:32], frame[38:42]
            seen = op == 1 and spa == want and tpa == want
        assert seen
    finally:
        sock.close()


def test_the_namespace_goes_with_the_last_user(fresh_vicd: Vicd):
    """A clean daemon stop removes vicd's network namespace when no VM runs and no
    network is kept; a running container or a network keeps it for the next daemon."""
    from vicd.plugins.microvm.netns import namespace_for

    d = fresh_vicd
    ns = namespace_for(d.data_root)
    d.docker("run", "--rm", "busybox", "true")
    assert ns.path.exists()
    d.stop()
    assert not ns.path.exists()
    d.start()
    d.docker("network", "create", "kept")
    d.stop()
    assert ns.path.exists()
    d.start()
    d.docker("run", "-d", "--name", "alive", "--network", "kept", "busybox", "sleep", "300")
    d.docker("network", "rm", "kept", check=False)  # refused: active endpoint
    d.stop()
    assert ns.path.exists()
    d.start()
    assert d.docker("exec", "alive", "true").returncode == 0
