"""The stock docker CLI against ``vicd --backend vsphere`` with the ``nsx`` network
driver: the fake NSX Manager over real HTTP, govmomi's simulator over real SOAP,
the host emulation running the container VMs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyVmomi import vim

from nsx_fixture import NSX_PASSWORD, FakeNsx
from vcsim_fixture import PASSWORD, VSphereEnv, make_env


@pytest.fixture(scope="module")
def nsxenv(guest_dir: Path, busybox_tar: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[VSphereEnv, FakeNsx]]:
    base = tmp_path_factory.mktemp("nsxe2e")
    fakes: list[FakeNsx] = []

    def start_nsx(env: VSphereEnv) -> None:
        nsx = FakeNsx(base, env.url)
        fakes.append(nsx)
        nsx.start()
        env.extra_toml = nsx.toml()
        env.extra_env = nsx.env()

    env = None
    try:
        env = make_env(base, [], busybox_tar, before_vicd=start_nsx)
        yield env, fakes[0]
    finally:
        if env is not None:
            env.close()
        for f in fakes:  # also when make_env failed (it closed the rest)
            f.stop()


def nics_of(env: VSphereEnv, name: str) -> dict[str, vim.vm.device.VirtualVmxnet3]:
    """The container VM's vmxnet3 NICs by port group name (the NSX segments' NICs)."""
    admin = env.admin()
    vm = admin.vm(name)
    out = {}
    for d in vm.config.hardware.device:
        if isinstance(d, vim.vm.device.VirtualVmxnet3):
            pg = vim.dvs.DistributedVirtualPortgroup(d.backing.port.portgroupKey,
                                                     admin.si._stub)
            out[pg.name] = d
    return out


def segment_of(nsx: FakeNsx, net_id: str) -> dict:
    return nsx.get(f"/infra/segments/vicd-{net_id}")


def test_network_create_run_connect_disconnect_rm(nsxenv: tuple[VSphereEnv, FakeNsx]) -> None:
    env, nsx = nsxenv
    d = env.vicd
    assert d is not None
    net1 = d.docker("network", "create", "-d", "nsx", "--label", "a=b", "net1").stdout.strip()
    net2 = d.docker("network", "create", "-d", "nsx", "--internal", "net2").stdout.strip()
    info = json.loads(d.docker("network", "inspect", "net1").stdout)[0]
    assert info["Driver"] == "nsx" and info["Labels"] == {"a": "b"}

    seg1 = segment_of(nsx, net1)
    assert ("a", "b") in {(t["scope"], t["tag"]) for t in seg1["tags"]}
    subnet = info["IPAM"]["Config"][0]
    assert seg1["subnets"][0]["network"] == subnet["Subnet"]
    assert seg1["subnets"][0]["gateway_address"].split("/")[0] == subnet["Gateway"]
    assert nsx.exists(f"/infra/domains/default/groups/vicd-{net1}")
    rules2 = nsx.get(f"/infra/domains/default/security-policies/vicd-{net2}")["rules"]
    assert "internal" in {r["id"] for r in rules2}
    admin = env.admin()
    pgs = {pg.name: pg for pg in admin.content.viewManager.CreateContainerView(
        admin.content.rootFolder, [vim.dvs.DistributedVirtualPortgroup], True).view}
    assert pgs[seg1["display_name"]].config.logicalSwitchUuid == seg1["unique_id"]

    # docker run --network net1: a vNIC on net1's port group, an NSX port with its tags.
    d.docker("run", "-d", "--name", "c1", "--network", "net1", "busybox", "sleep", "600")
    c1 = d.inspect("c1")
    ep1 = c1["NetworkSettings"]["Networks"]["net1"]
    nics = nics_of(env, "c1")
    assert set(nics) == {seg1["display_name"]}
    assert nics[seg1["display_name"]].macAddress == ep1["MacAddress"]
    port = nsx.get(f"/infra/segments/vicd-{net1}/ports/{ep1['EndpointID']}")
    assert port["address_bindings"] == [{"ip_address": ep1["IPAddress"],
                                         "mac_address": ep1["MacAddress"]}]
    assert nics[seg1["display_name"]].externalId == port["attachment"]["id"]
    assert ("vicd/container", c1["Id"]) in {(t["scope"], t["tag"]) for t in port["tags"]}
    members = nsx.get(f"/infra/domains/default/groups/vicd-{net1}/members/segment-ports")
    assert [m["path"] for m in members["results"]] == [port["path"]]

    # Live connect and disconnect of the running container: vNICs hot-added and removed.
    seg2 = segment_of(nsx, net2)
    d.docker("network", "connect", "net2", "c1")
    assert set(nics_of(env, "c1")) == {seg1["display_name"], seg2["display_name"]}
    assert d.inspect("c1")["State"]["Running"]
    d.docker("network", "disconnect", "net1", "c1")
    assert set(nics_of(env, "c1")) == {seg2["display_name"]}
    assert nsx.get(f"/infra/segments/vicd-{net1}/ports")["results"] == []
    assert d.docker("exec", "c1", "echo", "still-here").stdout == "still-here\n"

    # A network in use cannot go; once the container is gone, everything goes.
    r = d.docker("network", "rm", "net2", check=False)
    assert r.returncode != 0 and "has active endpoints" in r.stderr
    d.docker("rm", "-f", "c1")
    d.docker("network", "rm", "net1", "net2")
    for net in (net1, net2):
        for path in (f"/infra/segments/vicd-{net}", f"/infra/domains/default/groups/vicd-{net}",
                     f"/infra/domains/default/security-policies/vicd-{net}"):
            assert not nsx.exists(path), path
    left = {pg.name for pg in admin.content.viewManager.CreateContainerView(
        admin.content.rootFolder, [vim.dvs.DistributedVirtualPortgroup], True).view}
    assert seg1["display_name"] not in left and seg2["display_name"] not in left


def test_run_on_two_networks_at_start(nsxenv: tuple[VSphereEnv, FakeNsx]) -> None:
    env, nsx = nsxenv
    d = env.vicd
    assert d is not None
    a = d.docker("network", "create", "-d", "nsx", "na").stdout.strip()
    b = d.docker("network", "create", "-d", "nsx", "nb").stdout.strip()
    d.docker("create", "--name", "c2", "--network", "na", "busybox", "sleep", "600")
    d.docker("network", "connect", "nb", "c2")  # before start: both NICs at start
    d.docker("start", "c2")
    assert set(nics_of(env, "c2")) == {segment_of(nsx, a)["display_name"],
                                       segment_of(nsx, b)["display_name"]}
    d.docker("stop", "-t", "1", "c2")
    d.docker("network", "disconnect", "nb", "c2")
    d.docker("start", "c2")  # the NIC of a network it left goes at the next start
    assert set(nics_of(env, "c2")) == {segment_of(nsx, a)["display_name"]}
    d.docker("rm", "-f", "c2")
    d.docker("network", "rm", "na", "nb")


def test_bad_input_and_secrets(nsxenv: tuple[VSphereEnv, FakeNsx]) -> None:
    env, nsx = nsxenv
    d = env.vicd
    assert d is not None
    r = d.docker("network", "create", "-d", "nsx", "-o", "nsx.bogus=1", "bad1", check=False)
    assert r.returncode != 0 and "unknown driver options nsx.bogus" in r.stderr
    assert "bad1" not in d.docker("network", "ls", "--format", "{{.Name}}").stdout.split()

    info = d.docker("info").stdout + d.docker("info", "--format", "{{json .}}").stdout
    assert NSX_PASSWORD not in info and PASSWORD not in info

    # NSX Manager down: clear errors; no network is left behind in vicd, and a
    # container on an nsx network does not start.
    d.docker("network", "create", "-d", "nsx", "up1")
    d.docker("create", "--name", "cdown", "--network", "up1", "busybox", "true")
    nsx.stop()
    try:
        r = d.docker("network", "create", "-d", "nsx", "down1", check=False)
        assert r.returncode != 0
        assert f"nsx: cannot reach NSX Manager {nsx.url}" in r.stderr, r.stderr
        assert NSX_PASSWORD not in r.stderr
        assert "down1" not in d.docker("network", "ls", "--format", "{{.Name}}").stdout.split()
        r = d.docker("start", "cdown", check=False)
        assert r.returncode != 0 and "nsx: cannot reach NSX Manager" in r.stderr, r.stderr
        assert not d.inspect("cdown")["State"]["Running"]
        assert not nics_of(env, "cdown")
    finally:
        nsx.start()  # same port; its state starts empty
    d.docker("rm", "cdown")
    d.docker("network", "rm", "up1")
    log = d.log.read_text()
    assert NSX_PASSWORD not in log and PASSWORD not in log


def test_packets_flow_on_a_segment_and_not_across(nsxenv: tuple[VSphereEnv, FakeNsx]) -> None:
    """The guest configures its vmxnet3 NIC (the host emulation bridges the port
    group): containers on one NSX network reach each other, others do not."""
    env, _ = nsxenv
    d = env.vicd
    assert d is not None
    d.docker("network", "create", "-d", "nsx", "--subnet", "172.25.0.0/24", "pa")
    d.docker("network", "create", "-d", "nsx", "--subnet", "172.26.0.0/24", "pb")
    for name, net in (("p1", "pa"), ("p2", "pa"), ("p3", "pb")):
        d.docker("run", "-d", "--name", name, "--network", net, "busybox", "sleep", "600")
    ip1 = d.inspect("p1")["NetworkSettings"]["Networks"]["pa"]["IPAddress"]
    ip2 = d.inspect("p2")["NetworkSettings"]["Networks"]["pa"]["IPAddress"]
    mac2 = d.inspect("p2")["NetworkSettings"]["Networks"]["pa"]["MacAddress"]
    shown = d.docker("exec", "p2", "ip", "-o", "addr").stdout
    assert f"inet {ip2}/24" in shown
    assert mac2 in d.docker("exec", "p2", "ip", "-o", "link").stdout

    def ping(src: str, ip: str) -> bool:
        return d.docker("exec", src, "ping", "-c", "1", "-W", "3", ip,
                        check=False).returncode == 0

    assert ping("p1", ip2)
    assert not ping("p3", ip2)
    # Live: p3 joins pa (a hot-added vNIC the guest configures), then leaves it.
    d.docker("network", "connect", "pa", "p3")
    ip3 = d.inspect("p3")["NetworkSettings"]["Networks"]["pa"]["IPAddress"]
    assert f"inet {ip3}/24" in d.docker("exec", "p3", "ip", "-o", "addr").stdout
    assert ping("p3", ip1)
    d.docker("network", "disconnect", "pa", "p3")
    assert ip3 not in d.docker("exec", "p3", "ip", "-o", "addr").stdout
    assert not ping("p3", ip1)
    d.docker("rm", "-f", "p1", "p2", "p3")
    d.docker("network", "rm", "pa", "pb")


def nsx_requests(nsx: FakeNsx) -> int:
    """Requests the fake NSX Manager answered so far (it logs one line each)."""
    return sum(1 for line in (nsx.base / "nsxfake.log").read_text().splitlines()
               if " /policy/api/v1/" in line and " -> " in line)


def test_round_trips_per_operation(nsxenv: tuple[VSphereEnv, FakeNsx]) -> None:
    """NSX requests and SOAP round trips per docker operation on an nsx network."""
    env, nsx = nsxenv
    d = env.vicd
    assert d is not None
    n0 = nsx_requests(nsx)
    d.docker("network", "create", "-d", "nsx", "rt")
    n_create = nsx_requests(nsx) - n0
    d.docker("create", "--name", "rt1", "--network", "rt", "busybox", "sleep", "600")
    d.docker("create", "--name", "rt0", "busybox", "sleep", "600")
    s0, n0 = env.soap_calls(), nsx_requests(nsx)
    d.docker("start", "rt1")
    s_start, n_start = env.soap_calls() - s0, nsx_requests(nsx) - n0
    s0 = env.soap_calls()
    d.docker("start", "rt0")
    s_plain = env.soap_calls() - s0
    d.docker("network", "create", "-d", "nsx", "rt2")
    s0, n0 = env.soap_calls(), nsx_requests(nsx)
    d.docker("network", "connect", "rt2", "rt1")
    s_connect, n_connect = env.soap_calls() - s0, nsx_requests(nsx) - n0
    s0, n0 = env.soap_calls(), nsx_requests(nsx)
    d.docker("network", "disconnect", "rt2", "rt1")
    s_disconnect, n_disconnect = env.soap_calls() - s0, nsx_requests(nsx) - n0
    d.docker("rm", "-f", "rt0", "rt1")
    n0 = nsx_requests(nsx)
    d.docker("network", "rm", "rt")
    n_rm = nsx_requests(nsx) - n0
    d.docker("network", "rm", "rt2")
    print(f"\nnsx requests: network create {n_create}, start on it {n_start}, connect "
          f"{n_connect}, disconnect {n_disconnect}, network rm {n_rm}\n"
          f"soap round trips: start with one nsx NIC {s_start} (without: {s_plain}), "
          f"connect {s_connect}, disconnect {s_disconnect}")
    # Transport zone, segment, group, policy, segment read back; a port and its tags.
    assert n_create == 5 and n_start == 2 and n_connect == 2
    assert n_disconnect == 2 and n_rm == 4  # port tags and delete; ports, policy, group, segment
    # The NIC: one property read, one reconfigure (+ task polls), the port group lookup.
    assert s_start - s_plain <= 12 and s_connect <= 12 and s_disconnect <= 8


def test_networks_come_back_after_an_nsx_admin_deleted_them(
        nsxenv: tuple[VSphereEnv, FakeNsx]) -> None:
    """A daemon start makes every stored nsx network real again (restore)."""
    env, nsx = nsxenv
    d = env.vicd
    assert d is not None
    net = d.docker("network", "create", "-d", "nsx", "--label", "keep=1", "keep").stdout.strip()
    for path in (f"/infra/domains/default/security-policies/vicd-{net}",
                 f"/infra/domains/default/groups/vicd-{net}", f"/infra/segments/vicd-{net}"):
        assert nsx.api("DELETE", path)[0] == 200  # an NSX administrator at work
    d.stop()
    env.start_vicd()
    seg = segment_of(nsx, net)
    assert ("keep", "1") in {(t["scope"], t["tag"]) for t in seg["tags"]}
    assert nsx.exists(f"/infra/domains/default/security-policies/vicd-{net}")
    d.docker("network", "rm", "keep")
    assert not nsx.exists(f"/infra/segments/vicd-{net}")
