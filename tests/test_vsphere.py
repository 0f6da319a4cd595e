"""End to end on ``--backend vsphere``: the stock docker CLI, vicd, real SOAP to
govmomi's simulator (with InstantClone_Task), the host emulation booting the
real guest and tether over the VMs' network serial ports."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from vcsim_fixture import (  # noqa: F401
    PASSWORD,
    VSphereEnv,
    make_env,
    vsphere_fixture,
    wait_until,
)
from vicd.testing import tar_bytes


def ps_names(env: VSphereEnv, *args: str) -> dict[str, str]:
    out = env.vicd.docker("ps", *args, "--format", "{{.Names}}\t{{.Status}}").stdout
    return dict(line.split("\t", 1) for line in out.splitlines() if line)


def test_run_hello_and_soap_counts(vsphere: VSphereEnv) -> None:
    d = vsphere.vicd
    assert d.docker("run", "--rm", "busybox", "echo", "hello").stdout == "hello\n"
    info = vsphere.backend_info()
    assert info["backend"] == "vsphere" and info["clone"] == "instant"
    # Round trips per create+start (the per-shape parent exists now) and per ps.
    a = vsphere.soap_calls()
    d.docker("create", "--name", "counted", "busybox", "sleep", "60")
    b = vsphere.soap_calls()
    d.docker("start", "counted")
    c = vsphere.soap_calls()
    d.docker("ps", "-a")
    e = vsphere.soap_calls()
    print(f"SOAP round trips: create {b - a}, start {c - b}, ps {e - c}")
    assert e - c == 0, "docker ps must not call vCenter"
    assert c - a <= 8
    d.docker("rm", "-f", "counted")


def test_no_credentials_anywhere(vsphere: VSphereEnv) -> None:
    d = vsphere.vicd
    texts = [d.docker("info").stdout, d.docker("version").stdout,
             d.docker("info", "--format", "{{json .}}").stdout, d.log.read_text()]
    assert all(PASSWORD not in t for t in texts)
    assert "vsphere" in texts[0]


def test_lifecycle_names_labels_logs_exec(vsphere: VSphereEnv) -> None:
    d, admin = vsphere.vicd, vsphere.admin()
    cid = d.docker("run", "-d", "--name", "life", "--label", "team=infra", "busybox",
                   "sh", "-c", "echo started; exec sleep 300").stdout.strip()
    wait_until(lambda: "started" in d.docker("logs", "life").stdout, what="logs")
    assert d.inspect("life")["Config"]["Labels"] == {"team": "infra"}
    assert ps_names(vsphere)["life"].startswith("Up")
    assert d.docker("exec", "life", "echo", "from-exec").stdout == "from-exec\n"
    r = d.docker("exec", "life", "sh", "-c", "exit 7", check=False)
    assert r.returncode == 7
    assert cid[:12] in d.docker("exec", "life", "cat", "/etc/hosts").stdout
    # docker cp both ways (tether archive requests over the serial port).
    d.docker("cp", "-", "life:/tmp", input=tar_bytes({"hello.txt": b"copied in"}))
    assert d.docker("exec", "life", "cat", "/tmp/hello.txt").stdout == "copied in"
    assert "copied in" in d.docker("cp", "life:/tmp/hello.txt", "-").stdout
    # pause/unpause: the VM is suspended and powered on again; the process survives.
    d.docker("pause", "life")
    wait_until(lambda: admin.vm("life").runtime.powerState == "suspended", what="suspend")
    d.docker("unpause", "life")
    assert d.docker("exec", "life", "echo", "resumed").stdout == "resumed\n"
    # The VM: named <name>-<short id>, annotated, the record in extraConfig.
    vm = admin.vm("life")
    assert vm.name == f"life-{cid[:12]}"
    assert cid in vm.config.annotation and "busybox" in vm.config.annotation
    extra = {o.key: o.value for o in vm.config.extraConfig}
    assert extra["vicd.id"] == cid and int(extra["vicd.record.n"]) >= 1
    d.docker("stop", "-t", "1", "life")
    assert d.inspect("life")["State"]["Status"] == "exited"
    wait_until(lambda: admin.vm("life").runtime.powerState == "poweredOff", what="power off")
    d.docker("start", "life")
    assert d.inspect("life")["State"]["Running"]
    d.docker("rm", "-f", "life")
    wait_until(lambda: not any(n.startswith("life-") for n in admin.vms()), what="VM destroyed")


def test_rename_follows_to_the_vm(vsphere: VSphereEnv) -> None:
    from vicd.plugins.vsphere.backend import read_record

    d, admin = vsphere.vicd, vsphere.admin()
    cid = d.docker("create", "--name", "before-rn", "busybox", "true").stdout.strip()
    d.docker("rename", "before-rn", "after-rn")
    vm = admin.vm("after-rn")
    assert vm.name == f"after-rn-{cid[:12]}"
    assert "vicd container after-rn" in vm.config.annotation
    record = read_record({o.key: o.value for o in vm.config.extraConfig})
    assert record is not None and record["name"] == "after-rn"
    d.docker("rm", "after-rn")


def test_exit_codes(vsphere: VSphereEnv) -> None:
    d = vsphere.vicd
    r = d.docker("run", "--name", "ex3", "busybox", "sh", "-c", "echo out; echo err >&2; exit 3",
                 check=False)
    assert r.returncode == 3 and r.stdout == "out\n" and "err" in r.stderr
    assert d.inspect("ex3")["State"]["ExitCode"] == 3
    r = d.docker("run", "--rm", "busybox", "nosuchcommand", check=False)
    assert r.returncode == 127
    r = d.docker("run", "--rm", "-v", "/tmp:/host", "busybox", "true", check=False)
    assert r.returncode != 0 and "does not support bind mounts" in r.stderr


def test_recover_ps_a_with_empty_data_root(vsphere: VSphereEnv, busybox_tar: Path) -> None:
    d = vsphere.vicd
    d.docker("run", "-d", "--name", "keeper", "busybox", "sleep", "300")
    before = ps_names(vsphere, "-a")
    assert before["ex3"].startswith("Exited (3)") and before["keeper"].startswith("Up")
    d.kill9()
    shutil.rmtree(d.data_root)
    vsphere.start_vicd()
    after = ps_names(vsphere, "-a")
    assert set(before) <= set(after), after
    assert after["ex3"].startswith("Exited (3)")
    assert after["keeper"].startswith("Up")
    d.docker("import", str(busybox_tar), "busybox:latest")
    assert d.docker("exec", "keeper", "echo", "reattached").stdout == "reattached\n"


def test_admin_poweroff_and_destroy(vsphere: VSphereEnv) -> None:
    d, admin = vsphere.vicd, vsphere.admin()
    d.docker("run", "-d", "--name", "victim1", "busybox", "sleep", "300")
    d.docker("run", "-d", "--name", "victim2", "busybox", "sleep", "300")
    since = str(int(time.time()) - 1)
    admin.run(admin.vm("victim1").PowerOffVM_Task)
    wait_until(lambda: not d.inspect("victim1")["State"]["Running"], what="victim1 exit")
    assert d.inspect("victim1")["State"]["ExitCode"] == 137
    vm2 = admin.vm("victim2")
    admin.run(vm2.PowerOffVM_Task)
    admin.run(vm2.Destroy_Task)
    wait_until(lambda: "victim2" not in ps_names(vsphere, "-a"), what="victim2 removed")
    ev = d.docker("events", "--since", since, "--until", str(int(time.time()) + 1),
                  "--filter", "type=container", "--format", "{{json .}}").stdout
    seen = {(e["Actor"]["Attributes"]["name"], e["Action"])
            for e in map(json.loads, ev.splitlines())}
    assert ("victim1", "die") in seen and ("victim2", "die") in seen
    assert ("victim2", "destroy") in seen


def test_simulator_restart_relogin_no_duplicates(vsphere: VSphereEnv) -> None:
    # The simulator keeps no state over a restart: the daemon logs in again and
    # rebuilds its pool, folder, snapshot and parent on demand.
    d = vsphere.vicd
    logins = int(vsphere.backend_info()["logins"])
    vsphere.restart_vcsim()
    assert d.docker("run", "--rm", "busybox", "echo", "after-restart").stdout == "after-restart\n"
    assert int(vsphere.backend_info()["logins"]) > logins
    d.docker("run", "-d", "--name", "post", "busybox", "sleep", "300")
    names = [n for n in vsphere.admin().vms() if n.startswith("post-")]
    assert len(names) == 1, names


@pytest.fixture(scope="module")
def linked(guest_dir: Path, busybox_tar: Path, tmp_path_factory: pytest.TempPathFactory):
    # No InstantClone_Task, sessions that expire after 2 s idle, and a
    # CopyVirtualDisk_Task that refuses a destSpec, as vCenter's does.
    env = make_env(tmp_path_factory.mktemp("vsphere-linked"),
                   ["-no-instant-clone", "-session-idle", "2s", "-vcenter-copy"], busybox_tar)
    yield env
    env.close()


def test_linked_clone_fallback_and_session_expiry(linked: VSphereEnv) -> None:
    d = linked.vicd
    assert d.docker("run", "--rm", "busybox", "echo", "linked").stdout == "linked\n"
    assert linked.backend_info()["clone"] == "linked"
    # The image's base: vCenter's default copy of the upload (preallocated,
    # busLogic), the destSpec refused.
    image = d.docker("image", "inspect", "busybox", "--format", "{{.Id}}").stdout.strip()
    ds = linked.admin().content.searchIndex.FindByInventoryPath("DC0/datastore/LocalDS_0")
    desc = (Path(ds.info.url) / "vicd-images" / f"{image.split(':')[-1]}.vmdk").read_text()
    assert 'createType="vmfs"' in desc and 'ddb.adapterType = "buslogic"' in desc, desc
    assert 'ddb.thinProvisioned = "0"' in desc, desc
    a = linked.soap_calls()
    d.docker("create", "--name", "lc", "busybox", "true")
    b = linked.soap_calls()
    d.docker("start", "-a", "lc")
    c = linked.soap_calls()
    print(f"SOAP round trips (linked clone): create {b - a}, start {c - b}")
    time.sleep(5)  # the session expires (vcsim checks every 2 s)
    logins = int(linked.backend_info()["logins"])
    assert d.docker("run", "--rm", "busybox", "echo", "again").stdout == "again\n"
    assert int(linked.backend_info()["logins"]) > logins


def test_missing_template_is_a_clear_error(linked: VSphereEnv, tmp_path: Path) -> None:
    from conftest import new_vicd

    other = new_vicd(tmp_path)
    args = [a if a != "vicd-template" else "no-such-template" for a in linked.vicd_args()]
    with pytest.raises(RuntimeError) as e:
        other.start(*args, env=linked.vicd_env())
    assert "template VM 'no-such-template' not found" in str(e.value)
    assert PASSWORD not in str(e.value)
    assert subprocess.run(["true"]).returncode == 0


def test_clone_retry_after_a_lost_answer_makes_no_duplicate(linked: VSphereEnv,
                                                            tmp_path: Path) -> None:
    # In-process against the simulator: the clone runs, its answer is lost
    # (a dropped connection); the retry finds the VM by name instead of cloning again.
    from pyVmomi import vim

    from vicd.config import Config
    from vicd.plugins.vsphere.backend import VSphereBackend

    cfg = Config(data_root=tmp_path, plugins={"vsphere": {
        "url": linked.url, "datacenter": "DC0", "cluster": "DC0_C0",
        "template": "vicd-template", "folder": f"vicd-test-{linked.port}",
        "resource_pool": f"vicd-test-{linked.port}", "serial_listen": "127.0.0.1:0"}})
    b = VSphereBackend(cfg)
    b.client.connect()
    infra = b._infra_sync()
    name, cid = "retry-0123456789ab", "retry-cid"
    spec = vim.vm.CloneSpec(
        location=vim.vm.RelocateSpec(pool=infra.pool), powerOn=False,
        config=vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key="vicd.id", value=cid)]))
    sent = []

    def start() -> object:
        task = infra.template.CloneVM_Task(folder=infra.folder, name=name, spec=spec)
        sent.append(task)
        if len(sent) == 1:
            b.client.wait_task(task)
            raise ConnectionResetError("the answer was lost")
        return task

    vm = b._clone(infra, name, cid, start)
    assert len(sent) == 1 and vm is not None
    # A second attempt with the same name is refused by the server and resolved to ours.
    assert b._clone(infra, name, cid, lambda: infra.template.CloneVM_Task(
        folder=infra.folder, name=name, spec=spec))._moId == vm._moId
    assert [n for n in linked.admin().vms() if n == name] == [name]
    b.client.close()
