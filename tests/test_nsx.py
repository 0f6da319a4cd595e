"""The ``nsx`` network driver against the fake NSX Manager (real HTTP) and the
vCenter simulator (real SOAP): segments, groups, firewall rules, the port
group NSX realizes in vCenter, and container VMs' vNICs on it."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyVmomi import vim

from nsx_fixture import NSX_PASSWORD, NSX_USER, TZ_PATH, FakeNsx
from vcsim_fixture import Admin, VSphereEnv, build_vcsim, free_port
from vicd.errors import InvalidParameter
from vicd.network_driver import NetworkInfo
from vicd.plugins.nsx.client import NsxError
from vicd.plugins.nsx.driver import NsxDriver
from vicd.plugins.nsx.settings import NsxSettings
from vicd.plugins.vsphere.client import VimClient, VSphereError
from vicd.plugins.vsphere.nics import NicPlugger
from vicd.plugins.vsphere.settings import VSphereSettings


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VSphereEnv, FakeNsx]]:
    """The vCenter simulator and the fake NSX Manager realizing segments in it."""
    build_vcsim()
    base = tmp_path_factory.mktemp("nsx")
    env = VSphereEnv(base=base, port=free_port(), serial_port=free_port())
    env.start_vcsim()
    nsx = FakeNsx(base, env.url)
    try:
        nsx.start()
        yield env, nsx
    finally:
        nsx.stop()
        env.close()


@pytest.fixture
def driver(sim: tuple[VSphereEnv, FakeNsx], monkeypatch: pytest.MonkeyPatch) -> NsxDriver:
    monkeypatch.setenv("VICD_NSX_USER", NSX_USER)
    monkeypatch.setenv("VICD_NSX_PASSWORD", NSX_PASSWORD)
    return NsxDriver(NsxSettings.from_config(sim[1].config()))


def network(name: str, subnet: str = "172.30.0.0/16", gateway: str = "172.30.0.1",
            **kw: object) -> NetworkInfo:
    return NetworkInfo(id=secrets.token_hex(32), name=name, subnet=subnet, gateway=gateway,
                       **kw)  # type: ignore[arg-type]


def portgroups(admin: Admin) -> dict[str, vim.dvs.DistributedVirtualPortgroup]:
    view = admin.content.viewManager.CreateContainerView(
        admin.content.rootFolder, [vim.dvs.DistributedVirtualPortgroup], True)
    try:
        return {pg.name: pg for pg in view.view}
    finally:
        view.Destroy()


def vicd_objects(nsx: FakeNsx) -> list[str]:
    """Every segment, group and security policy vicd made in NSX."""
    paths = [s["path"] for s in nsx.get("/infra/segments")["results"]]
    paths += [p["path"] for p in nsx.get("/infra/domains/default/security-policies")["results"]]
    return [p for p in paths if "/vicd-" in p]


def test_fake_nsx_answers_as_the_policy_api(sim: tuple[VSphereEnv, FakeNsx]) -> None:
    _, nsx = sim
    status, body = nsx.api("GET", "/infra/segments", auth=(NSX_USER, "wrong"))
    assert status == 403 and body["error_code"] == 403 and "credentials" in body["error_message"]
    status, body = nsx.api("GET", "/infra/segments/nope")
    assert status == 404
    assert body["httpStatus"] == "NOT_FOUND" and body["module_name"] == "Policy"
    assert "/infra/segments/nope" in body["error_message"] and body["error_code"]
    status, body = nsx.api("PATCH", "/infra/segments/t1", {
        "transport_zone_path": TZ_PATH, "subnets": [{"gateway_address": "10.9.0.1"}]})
    assert status == 400 and "CIDR" in body["error_message"], body
    # PUT answers the object with what NSX adds; PATCH answers 200 and no body.
    status, seg = nsx.api("PUT", "/infra/segments/t1", {
        "display_name": "t1", "transport_zone_path": TZ_PATH,
        "subnets": [{"gateway_address": "10.9.0.1/24"}]})
    assert status == 200 and seg["resource_type"] == "Segment" and seg["_revision"] == 0
    assert seg["path"] == "/infra/segments/t1" and seg["subnets"][0]["network"] == "10.9.0.0/24"
    assert nsx.api("PATCH", "/infra/segments/t1", {"description": "x"}) == (200, None)
    assert nsx.get("/infra/segments/t1")["_revision"] == 1
    status, body = nsx.api("PATCH", "/infra/domains/default/security-policies/p1", {
        "rules": [{"id": "r", "source_groups": ["/infra/domains/default/groups/missing"]}]})
    assert status == 400 and "missing" in body["error_message"]
    assert nsx.api("PATCH", "/infra/segments/t1/ports/p", {"attachment": {"id": "a"}})[0] == 200
    status, body = nsx.api("DELETE", "/infra/segments/t1")
    assert status == 400 and "ports" in body["error_message"]
    assert nsx.api("DELETE", "/infra/segments/t1/ports/p")[0] == 200
    assert nsx.api("DELETE", "/infra/segments/t1")[0] == 200
    assert nsx.api("DELETE", "/infra/segments/t1")[0] == 200  # gone already: still 200


def test_network_is_a_segment_group_policy_and_port_group(
        sim: tuple[VSphereEnv, FakeNsx], driver: NsxDriver) -> None:
    env, nsx = sim
    admin = env.admin()
    net = network("net1", labels={"a": "b", "com.example.tier": "web"})
    driver.create_network(net)
    oid = f"vicd-{net.id}"

    seg = nsx.get(f"/infra/segments/{oid}")
    assert seg["display_name"] == f"net1-{net.id[:12]}"
    assert seg["transport_zone_path"] == TZ_PATH
    assert seg["subnets"] == [{"gateway_address": "172.30.0.1/16", "network": "172.30.0.0/16"}]
    tags = {(t["scope"], t["tag"]) for t in seg["tags"]}
    assert {("a", "b"), ("com.example.tier", "web"), ("vicd/network-id", net.id),
            ("vicd/network", "net1"), ("vicd/daemon", "vicd-test")} == tags

    group = nsx.get(f"/infra/domains/default/groups/{oid}")
    assert group["expression"] == [{"resource_type": "Condition", "member_type": "SegmentPort",
                                    "key": "Tag", "operator": "EQUALS",
                                    "value": f"vicd/network-id|{net.id}"}]
    pol = nsx.get(f"/infra/domains/default/security-policies/{oid}")
    gpath = group["path"]
    assert pol["scope"] == [gpath] and pol["category"] == "Application"
    rules = {r["id"]: r for r in pol["rules"]}
    assert set(rules) == {"intra", "isolate"}
    assert (rules["intra"]["source_groups"], rules["intra"]["destination_groups"],
            rules["intra"]["action"]) == ([gpath], [gpath], "ALLOW")
    assert (rules["isolate"]["source_groups"], rules["isolate"]["destination_groups"],
            rules["isolate"]["action"]) == (["ANY"], [gpath], "DROP")
    assert rules["intra"]["sequence_number"] < rules["isolate"]["sequence_number"]

    # vCenter: the port group NSX realizes for the segment, on the simulator's DVS.
    pg = portgroups(admin)[seg["display_name"]]
    assert pg.config.backingType == "nsx"
    assert pg.config.logicalSwitchUuid == seg["unique_id"]
    assert pg.config.distributedVirtualSwitch.name == "DVS0"

    # An endpoint is a segment port in the network's group; join gives the NIC backing.
    ep = secrets.token_hex(32)
    cid = secrets.token_hex(32)
    driver.create_endpoint(net.id, ep, "172.30.0.2/16", "02:42:ac:1e:00:02", {})
    backing = driver.join(net.id, ep, cid)
    port = nsx.get(f"/infra/segments/{oid}/ports/{ep}")
    assert port["address_bindings"] == [{"ip_address": "172.30.0.2",
                                         "mac_address": "02:42:ac:1e:00:02"}]
    assert port["attachment"]["id"] == backing["attachment_id"]
    assert ("vicd/container", cid) in {(t["scope"], t["tag"]) for t in port["tags"]}
    members = nsx.get(f"/infra/domains/default/groups/{oid}/members/segment-ports")["results"]
    assert [m["path"] for m in members] == [port["path"]]
    assert backing["kind"] == "nsx-segment"
    assert backing["logical_switch_uuid"] == seg["unique_id"]

    # The vSphere side: a vmxnet3 on that port group, hot-added to a running VM and removed.
    settings = VSphereSettings(url=env.url)
    settings._load_credentials()
    client = VimClient(settings, "test")
    client.connect()
    plugger = NicPlugger(client)
    vm = admin.vms()["DC0_C0_RP0_VM1"]
    assert vm.runtime.powerState == "poweredOn"
    nic = {"slot": 1, "network": "net1", "mac": "02:42:ac:1e:00:02", "backing": backing,
           "address": "172.30.0.2/16", "gateway": "172.30.0.1"}
    plugger.apply(vim.VirtualMachine(vm._moId, client.si._stub), [nic], set())
    vnics = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualVmxnet3)]
    assert len(vnics) == 1
    assert vnics[0].macAddress == "02:42:ac:1e:00:02"
    assert vnics[0].externalId == backing["attachment_id"]
    assert vnics[0].backing.port.portgroupKey == pg.key
    assert vnics[0].backing.port.switchUuid == pg.config.distributedVirtualSwitch.uuid
    assert pg in vm.network
    extra = {o.key: o.value for o in vm.config.extraConfig}
    assert extra["vicd.nic.1"] == "02:42:ac:1e:00:02"
    calls = client.calls
    plugger.apply(vim.VirtualMachine(vm._moId, client.si._stub), [nic], set())  # no change
    assert client.calls - calls == 1  # one property read, no reconfigure
    plugger.apply(vim.VirtualMachine(vm._moId, client.si._stub), [], {1})
    assert not [d for d in vm.config.hardware.device
                if isinstance(d, vim.vm.device.VirtualVmxnet3)]
    assert "vicd.nic.1" not in {o.key for o in vm.config.extraConfig}

    driver.leave(net.id, ep)
    driver.delete_endpoint(net.id, ep)
    driver.delete_network(net.id)
    for path in (f"/infra/segments/{oid}", group["path"], pol["path"]):
        assert not nsx.exists(path), path
    assert seg["display_name"] not in portgroups(admin)
    client.close()


def test_internal_and_policy_options_become_rules(sim: tuple[VSphereEnv, FakeNsx],
                                                  driver: NsxDriver) -> None:
    _, nsx = sim
    net = network("backend", subnet="172.31.0.0/24", gateway="172.31.0.1", internal=True,
                  options={"nsx.allow_from": "10.0.0.0/8, 192.168.1.5"})
    driver.create_network(net)
    pol = nsx.get(f"/infra/domains/default/security-policies/vicd-{net.id}")
    gpath = f"/infra/domains/default/groups/vicd-{net.id}"
    rules = {r["id"]: r for r in pol["rules"]}
    assert [r["id"] for r in pol["rules"]] == ["intra", "allow-from", "isolate", "internal"]
    assert rules["allow-from"]["source_groups"] == ["10.0.0.0/8", "192.168.1.5"]
    assert (rules["internal"]["source_groups"], rules["internal"]["destination_groups"],
            rules["internal"]["action"], rules["internal"]["direction"]) == (
        [gpath], ["ANY"], "DROP", "OUT")
    driver.delete_network(net.id)

    open_net = network("open", subnet="172.29.0.0/24", gateway="172.29.0.1",
                       options={"nsx.isolate": "false"})
    driver.create_network(open_net)
    pol = nsx.get(f"/infra/domains/default/security-policies/vicd-{open_net.id}")
    assert [r["id"] for r in pol["rules"]] == ["intra"]
    driver.delete_network(open_net.id)
    assert vicd_objects(nsx) == []


def test_bad_input_leaves_nothing_behind(sim: tuple[VSphereEnv, FakeNsx], driver: NsxDriver,
                                         monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    env, nsx = sim
    before = set(portgroups(env.admin()))
    with pytest.raises(InvalidParameter, match="nsx: unknown driver options nsx.bogus"):
        driver.create_network(network("x", options={"nsx.bogus": "1"}))
    with pytest.raises(InvalidParameter, match="too long for an NSX tag"):
        driver.create_network(network("x", labels={"k" * 129: "v"}))
    with pytest.raises(InvalidParameter, match="at most 27 labels"):
        driver.create_network(network("x", labels={f"l{i}": "v" for i in range(28)}))

    wrong_tz = NsxDriver(NsxSettings.from_config({**nsx.config(), "transport_zone": "nope"}))
    with pytest.raises(InvalidParameter,
                       match="transport zone .*/transport-zones/nope not found"):
        wrong_tz.create_network(network("x"))

    # A failure part-way (here: the segment is refused) removes what was made.
    net = network("half", subnet="172.28.0.0/32", gateway="172.28.0.0")
    with pytest.raises(NsxError, match="CIDR") as e:
        driver.create_network(net)
    assert e.value.status == 400
    # ... or the group is (a policy domain NSX does not have): the segment made before
    # it, and the port group NSX realized for it, go again.
    other = NsxDriver(NsxSettings.from_config({**nsx.config(), "domain": "nope"}))
    with pytest.raises(NsxError, match="/infra/domains/nope"):
        other.create_network(network("half"))

    monkeypatch.setenv("VICD_NSX_PASSWORD", "not-the-password")
    with pytest.raises(NsxError, match="refused the credentials of user 'nsx-admin'") as e:
        NsxDriver(NsxSettings.from_config(nsx.config())).create_network(network("x"))
    assert "not-the-password" not in e.value.message

    monkeypatch.setenv("VICD_NSX_PASSWORD", NSX_PASSWORD)
    down = NsxDriver(NsxSettings.from_config({**nsx.config(),
                                              "url": f"http://127.0.0.1:{free_port()}"}))
    with pytest.raises(NsxError, match="nsx: cannot reach NSX Manager http://127.0.0.1:") as e:
        down.create_network(network("x"))
    assert NSX_PASSWORD not in e.value.message

    assert vicd_objects(nsx) == []
    assert set(portgroups(env.admin())) == before
    assert NSX_PASSWORD not in nsx.log()


def test_settings_refuse_credentials_in_the_table(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.delenv("VICD_NSX_USER", raising=False)
    monkeypatch.delenv("VICD_NSX_PASSWORD", raising=False)
    base = {"url": "https://nsx.example.com", "transport_zone": "tz"}
    with pytest.raises(InvalidParameter, match="unknown \\[plugins.nsx\\] keys: password"):
        NsxSettings.from_config({**base, "password": "x"})
    with pytest.raises(InvalidParameter, match="no credentials"):
        NsxSettings.from_config(base)
    creds = tmp_path / "nsx-creds"
    creds.write_text("ops:pa:ss\n")
    s = NsxSettings.from_config({**base, "credentials_file": str(creds)})
    assert (s.user, s.password) == ("ops", "pa:ss")
    assert "pa:ss" not in repr(s) and s.safe_url == "https://nsx.example.com"
    assert s.transport_zone == TZ_PATH.replace("vicd-overlay-tz", "tz")


def test_tls_and_rate_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTPS as NSX Manager serves it (ca_file, or insecure), and its 429 answers retried."""
    cert, key = tmp_path / "nsx.pem", tmp_path / "nsx.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    nsx = FakeNsx(tmp_path, "", name="tlsfake",
                  extra_args=("--tls-cert", str(cert), "--tls-key", str(key), "--throttle", "3"))
    nsx.start()
    try:
        monkeypatch.setenv("VICD_NSX_USER", NSX_USER)
        monkeypatch.setenv("VICD_NSX_PASSWORD", NSX_PASSWORD)
        cfg = nsx.config()
        assert cfg["url"].startswith("https://")
        with pytest.raises(NsxError, match="nsx: TLS to NSX Manager https://127.0.0.1:.* "
                                           "failed: CERTIFICATE_VERIFY_FAILED"):
            NsxDriver(NsxSettings.from_config(cfg)).create_network(network("t"))
        for extra in ({"ca_file": str(cert)}, {"insecure": True}):
            drv = NsxDriver(NsxSettings.from_config({**cfg, **extra}))
            net = network("t")
            drv.create_network(net)  # every third request is refused (429) and retried
            drv.delete_network(net.id)
        assert "-> 429 (rate limit)" in nsx.log()
    finally:
        nsx.stop()


def test_nics_wait_for_nsx_to_realize_the_segment(sim: tuple[VSphereEnv, FakeNsx],
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """NSX realizes a segment in vCenter after accepting it: the backend waits for
    its port group."""
    env, _ = sim
    slow = FakeNsx(tmp_path, env.url, name="slowfake", extra_args=("--realize-delay", "2"))
    slow.start()
    try:
        monkeypatch.setenv("VICD_NSX_USER", NSX_USER)
        monkeypatch.setenv("VICD_NSX_PASSWORD", NSX_PASSWORD)
        drv = NsxDriver(NsxSettings.from_config(slow.config()))
        net = network("slow", subnet="172.27.0.0/24", gateway="172.27.0.1")
        drv.create_network(net)
        ep = secrets.token_hex(32)
        drv.create_endpoint(net.id, ep, "172.27.0.2/24", "02:42:ac:1b:00:02", {})
        backing = drv.join(net.id, ep, secrets.token_hex(32))
        settings = VSphereSettings(url=env.url)
        settings._load_credentials()
        client = VimClient(settings, "test")
        client.connect()
        plugger = NicPlugger(client)
        assert plugger._find("config.logicalSwitchUuid", backing["logical_switch_uuid"]) is None
        pg = plugger.portgroup(backing)  # not there yet: waits for it
        assert pg.name == f"slow-{net.id[:12]}"
        with pytest.raises(VSphereError, match="no distributed port group for NSX segment"):
            NicPlugger(client, realize_timeout=1).portgroup(
                {**backing, "logical_switch_uuid": "no-such-switch"})
        client.close()
        drv.delete_endpoint(net.id, ep)
        drv.delete_network(net.id)
    finally:
        slow.stop()
