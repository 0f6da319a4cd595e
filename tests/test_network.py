"""Container networking on the microvm backend: egress, published ports, /etc files."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from conftest import Vicd


@pytest.fixture
def host_server() -> Iterator[int]:
    """An HTTP server on the host's loopback, for egress tests."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b"from-the-host\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()


def _get(url: str, timeout: float = 30) -> str:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read().decode()
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.3)


def test_egress_reaches_the_host(vicd: Vicd, host_server: int):
    r = vicd.docker("run", "--rm", "--add-host", "host.docker.internal:host-gateway",
                    "busybox", "wget", "-qO-", f"http://host.docker.internal:{host_server}/")
    assert r.stdout == "from-the-host\n"


def test_published_ports_and_docker_port(vicd: Vicd):
    vicd.docker("run", "-d", "--name", "web", "-p", "127.0.0.1:0:8000", "-p", "8001/tcp",
                "busybox", "sh", "-c",
                "echo hello-web > /tmp/index.html; exec httpd -f -p 8000 -h /tmp")
    ports = vicd.inspect("web")["NetworkSettings"]["Ports"]
    (binding,) = ports["8000/tcp"]
    assert binding["HostIp"] == "127.0.0.1" and int(binding["HostPort"]) > 0
    assert ports["8001/tcp"][0]["HostIp"] == "0.0.0.0"
    assert _get(f"http://127.0.0.1:{binding['HostPort']}/index.html") == "hello-web\n"
    out = vicd.docker("port", "web", "8000").stdout.strip()
    assert out == f"127.0.0.1:{binding['HostPort']}"
    ps = vicd.docker("ps", "--filter", "name=web", "--format", "{{.Ports}}").stdout
    assert f"127.0.0.1:{binding['HostPort']}->8000/tcp" in ps
    vicd.docker("rm", "-f", "web")


def test_port_in_use_is_a_clear_error_and_nothing_half_started(vicd: Vicd):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = vicd.docker("run", "--rm", "-p", f"127.0.0.1:{port}:80", "busybox", "true",
                        check=False, timeout=60)
        assert r.returncode != 0
        assert "port is already allocated" in r.stderr
        r = vicd.docker("run", "--name", "clash", "-p", f"127.0.0.1:{port}:80", "busybox",
                        "true", check=False, timeout=60)
        assert "port is already allocated" in r.stderr
        assert vicd.inspect("clash")["State"]["Running"] is False
        vicd.docker("rm", "clash")


def test_publish_all_exposed(vicd: Vicd, busybox_tar):
    vicd.docker("import", "--change", "EXPOSE 8000", str(busybox_tar), "exposer:1")
    vicd.docker("run", "-d", "--name", "pub", "-P", "exposer:1", "sh", "-c",
                "echo all > /tmp/i; exec httpd -f -p 8000 -h /tmp")
    binding = vicd.inspect("pub")["NetworkSettings"]["Ports"]["8000/tcp"][0]
    assert _get(f"http://127.0.0.1:{binding['HostPort']}/i") == "all\n"
    vicd.docker("rm", "-f", "pub")
    vicd.docker("rmi", "exposer:1")


def test_etc_files_and_inspect_match_the_guest(vicd: Vicd):
    vicd.docker("run", "-d", "--name", "netinfo", "--hostname", "vmbox", "--dns", "10.0.2.3",
                "--dns-search", "example.test", "--add-host", "db:10.9.8.7", "busybox",
                "sleep", "300")
    out = vicd.docker("exec", "netinfo", "sh", "-c",
                      "cat /etc/hosts /etc/resolv.conf; cat /sys/class/net/eth0/address; "
                      "ip -4 addr show eth0").stdout
    assert "10.9.8.7\tdb" in out
    assert "10.0.2.15\tvmbox" in out
    assert "nameserver 10.0.2.3" in out and "search example.test" in out
    ns = vicd.inspect("netinfo")["NetworkSettings"]
    assert ns["MacAddress"] in out and ns["IPAddress"] in out
    assert f"inet {ns['IPAddress']}/{ns['IPPrefixLen']}" in out
    assert ns["Gateway"] == "10.0.2.2"
    vicd.docker("rm", "-f", "netinfo")
    # The image's own /etc/hosts is untouched on its disk (bind-mounted over, as dockerd does).
    assert "10.9.8.7" not in vicd.docker("run", "--rm", "busybox", "cat", "/etc/hosts").stdout


def test_network_none(vicd: Vicd, host_server: int):
    r = vicd.docker("run", "--rm", "--network", "none", "busybox", "sh", "-c",
                    f"ip -4 addr show eth0 | grep inet; wget -T 3 -qO- "
                    f"http://10.0.2.2:{host_server}/ || echo unreachable", timeout=60)
    assert "inet " not in r.stdout and "unreachable" in r.stdout
    r = vicd.docker("run", "--rm", "--network", "host", "busybox", "true", check=False)
    assert r.returncode != 0 and "not supported" in r.stderr


def test_builtin_networks_listed(vicd: Vicd):
    names = vicd.docker("network", "ls", "--filter", "type=builtin",
                        "--format", "{{.Name}}").stdout.split()
    assert names == ["bridge", "none"]
    vicd.docker("run", "-d", "--name", "onbridge", "busybox", "sleep", "60")
    net = json.loads(vicd.docker("network", "inspect", "bridge").stdout)[0]
    (member,) = [m for m in net["Containers"].values() if m["Name"] == "onbridge"]
    assert member["IPv4Address"] == "10.0.2.15/24"
    vicd.docker("rm", "-f", "onbridge")
    r = vicd.docker("network", "inspect", "nosuchnet", check=False)
    assert r.returncode == 1 and "network nosuchnet not found" in r.stderr
