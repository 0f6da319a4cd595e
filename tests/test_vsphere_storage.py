"""Disks on ``--backend vsphere``, end to end: the stock docker CLI, vicd, real
SOAP to govmomi's simulator (CreateVirtualDisk_Task, ReconfigVM_Task,
SearchDatastore_Task), the datastore's HTTP /folder, and the host emulation
booting the microVM from the VM's disks as files on the datastore.

- the image's base disk on the datastore, a child disk of it per container
  as its root;
- the ``vmdk`` volume driver: a VMDK per volume, attached
  independent-persistent, its ext4 made by the tether on first use."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
from pathlib import Path

from vcsim_fixture import VSphereEnv, vsphere_fixture, wait_until  # noqa: F401
from vicd.testing import tar_bytes


def api_status(env: VSphereEnv, method: str, path: str) -> tuple[int, dict]:
    """One Engine API request over the daemon's socket: (status, JSON body)."""

    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(str(env.vicd.sock))

    c = Conn("localhost")
    c.request(method, path)
    r = c.getresponse()
    body = r.read()
    return r.status, json.loads(body) if body else {}


def datastore_dir(env: VSphereEnv) -> Path:
    from pyVmomi import vim

    admin = env.admin()
    ds = admin.content.searchIndex.FindByInventoryPath("DC0/datastore/LocalDS_0")
    assert isinstance(ds, vim.Datastore)
    return Path(ds.info.url)


def volumes(env: VSphereEnv) -> dict[str, str]:
    out = env.vicd.docker("volume", "ls", "--format", "{{.Name}}\t{{.Driver}}").stdout
    return dict(line.split("\t") for line in out.splitlines() if line)


def test_vmdk_volume_outlives_its_container(vsphere: VSphereEnv) -> None:
    d = vsphere.vicd
    d.docker("volume", "create", "-d", "vmdk", "-o", "size=64m", "--label", "team=data", "vdata")
    assert volumes(vsphere)["vdata"] == "vmdk"
    info = json.loads(d.docker("volume", "inspect", "vdata").stdout)[0]
    assert info["Mountpoint"] == "[LocalDS_0] vicd/volumes/vdata.vmdk"
    assert info["Labels"] == {"team": "data"} and info["Scope"] == "global"
    assert info["Options"] == {"size": "64m"}
    files = datastore_dir(vsphere) / "vicd" / "volumes"
    assert (files / "vdata.vmdk").is_file()
    assert (files / "vdata-flat.vmdk").stat().st_size == 64 << 20  # thin: sparse
    assert json.loads((files / "vdata.json").read_text())["labels"] == {"team": "data"}

    # A container writes into it (the guest makes the ext4 on this first use) ...
    r = d.docker("run", "--name", "writer", "-v", "vdata:/data", "busybox", "sh", "-c",
                 "echo kept > /data/f && grep /data /proc/mounts")
    assert " /data ext4 " in r.stdout
    d.docker("rm", "writer")
    # ... the VM is gone, the disk is not; the next container reads the data.
    assert (files / "vdata-flat.vmdk").is_file()
    r = d.docker("run", "--rm", "-v", "vdata:/mnt", "busybox", "cat", "/mnt/f")
    assert r.stdout == "kept\n"

    # In use by a container (even stopped): 409, as dockerd answers.
    d.docker("create", "--name", "holder", "-v", "vdata:/data", "busybox", "true")
    status, body = api_status(vsphere, "DELETE", "/v1.47/volumes/vdata")
    assert status == 409 and "volume is in use" in body["message"]
    r = d.docker("volume", "rm", "vdata", check=False)
    assert r.returncode != 0 and "volume is in use" in r.stderr
    d.docker("rm", "holder")


def test_copy_up_into_a_new_vmdk_volume(vsphere: VSphereEnv) -> None:
    d = vsphere.vicd
    d.docker("volume", "create", "-d", "vmdk", "vbin")
    # A new volume over a path of the image gets the image's files first.
    assert d.docker("run", "--rm", "-v", "vbin:/bin", "busybox", "ls", "/bin/busybox"
                    ).stdout == "/bin/busybox\n"
    assert "busybox" in d.docker("run", "--rm", "-v", "vbin:/mnt", "busybox", "ls", "/mnt").stdout
    # Read-only and a soap count for create + start with a volume attached.
    a = vsphere.soap_calls()
    d.docker("create", "--name", "counted-v", "-v", "vbin:/mnt:ro", "busybox", "sleep", "60")
    b = vsphere.soap_calls()
    d.docker("start", "counted-v")
    c = vsphere.soap_calls()
    print(f"SOAP round trips with a vmdk volume: create {b - a}, start {c - b}")
    r = d.docker("exec", "counted-v", "touch", "/mnt/x", check=False)
    assert r.returncode != 0 and "Read-only" in r.stderr
    d.docker("rm", "-f", "counted-v")
    d.docker("volume", "rm", "vbin")


def test_bad_volume_input_on_vsphere(vsphere: VSphereEnv) -> None:
    d = vsphere.vicd
    r = d.docker("volume", "create", "-d", "vmdk", "-o", "colour=blue", "vbad", check=False)
    assert r.returncode != 0 and "invalid option key: 'colour'" in r.stderr
    assert "vbad" not in volumes(vsphere)
    # A local-driver volume cannot reach an ESXi host: said clearly, nothing runs.
    r = d.docker("run", "--rm", "-v", "vlocal:/data", "busybox", "true", check=False)
    assert r.returncode != 0 and "need the vmdk driver" in r.stderr
    d.docker("volume", "rm", "vlocal")


def test_volumes_listed_from_vcenter_after_restart_with_empty_data_root(
        vsphere: VSphereEnv, busybox_tar: Path) -> None:
    d = vsphere.vicd
    d.docker("volume", "create", "-d", "vmdk", "--label", "keep=yes", "vkeep")
    d.docker("run", "--rm", "-v", "vkeep:/data", "busybox", "sh", "-c", "echo survived > /data/f")
    d.kill9()
    shutil.rmtree(d.data_root)
    vsphere.start_vicd()
    d.docker("import", str(busybox_tar), "busybox:latest")
    listed = volumes(vsphere)
    assert listed.get("vkeep") == "vmdk" and listed.get("vdata") == "vmdk", listed
    info = json.loads(d.docker("volume", "inspect", "vkeep").stdout)[0]
    assert info["Labels"] == {"keep": "yes"}
    # Already initialized: no copy-up over the data, which is there.
    assert d.docker("run", "--rm", "-v", "vkeep:/data", "busybox", "cat", "/data/f"
                    ).stdout == "survived\n"
    d.docker("volume", "rm", "vkeep")
    files = datastore_dir(vsphere) / "vicd" / "volumes"
    assert not (files / "vkeep.vmdk").exists() and not (files / "vkeep.json").exists()
    assert "vkeep" not in volumes(vsphere)


def _put_file_in_base_disk(base: Path, name: str, data: bytes, work: Path) -> None:
    """Write ``/name`` into the ext4 of a converted base disk: its flat extent
    is the raw file system (debugfs, no mount)."""
    src = work / "payload"
    src.write_bytes(data)
    subprocess.run(["debugfs", "-w", "-R", f"write {src} {name}", str(_flat(base))],
                   check=True, capture_output=True)


def _flat(base: Path) -> Path:
    return base.with_name(base.stem + "-flat.vmdk")


def _assert_native_thin_base(base: Path, adapter: str = "lsilogic", thin: bool = True) -> None:
    """The base is what CopyVirtualDisk_Task writes on ESXi: a VMFS descriptor
    naming its flat extent, not the hosted sparse file that was uploaded; and
    the upload and the temporary copy are gone."""
    text = base.read_text()
    assert 'createType="vmfs"' in text and f'VMFS "{_flat(base).name}"' in text, text
    assert f'ddb.adapterType = "{adapter}"' in text, text
    assert f'ddb.thinProvisioned = "{int(thin)}"' in text, text
    st = _flat(base).stat()
    if thin:
        assert st.st_blocks * 512 < st.st_size  # sparse: a thin disk
    left = [p.name for p in base.parent.iterdir() if p.name.startswith(base.stem)
            and p.name not in (base.name, _flat(base).name)]
    assert left == [], left


def test_root_disk_is_a_child_of_the_image_disk_on_the_datastore(
        vsphere: VSphereEnv, tmp_path: Path) -> None:
    from pyVmomi import vim

    d = vsphere.vicd
    image = d.docker("image", "inspect", "busybox", "--format", "{{.Id}}").stdout.strip()
    d.docker("run", "--rm", "busybox", "true")  # uploads the base disk if not yet there
    base = datastore_dir(vsphere) / "vicd-images" / f"{image.split(':')[-1]}.vmdk"
    _assert_native_thin_base(base)
    # A file only the datastore's copy of the image has: containers see it, so
    # their root is that disk (not the daemon's local ext4).
    _put_file_in_base_disk(base, "from-datastore", b"on the datastore\n", tmp_path)
    http_calls = int(vsphere.backend_info()["datastore_http_calls"])
    r = d.docker("run", "--rm", "busybox", "cat", "/from-datastore")
    assert r.stdout == "on the datastore\n"
    assert int(vsphere.backend_info()["datastore_http_calls"]) == http_calls  # uploaded once

    # Each container writes into a child disk of its own, kept over stop/start.
    d.docker("run", "-d", "--name", "ra", "busybox", "sh", "-c", "echo a > /only-a; sleep 300")
    r = d.docker("run", "--rm", "busybox", "ls", "/only-a", check=False)
    assert r.returncode != 0
    vm = vsphere.admin().vm("ra")
    roots = [dev for dev in vm.config.hardware.device
             if isinstance(dev, vim.vm.device.VirtualDisk) and dev.backing.parent]
    assert len(roots) == 1
    assert roots[0].backing.parent.fileName == f"[LocalDS_0] vicd-images/{base.name}"
    child = datastore_dir(vsphere) / roots[0].backing.fileName.partition("] ")[2]
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(child)],
                                     capture_output=True, check=True).stdout)
    assert info["format"] == "vmdk" and info["backing-filename"] == str(base)
    d.docker("stop", "-t", "1", "ra")
    d.docker("start", "ra")
    assert d.docker("exec", "ra", "cat", "/only-a").stdout == "a\n"
    d.docker("rm", "-f", "ra")


def _create_calls(env: VSphereEnv, name: str, image: str) -> int:
    a = env.soap_calls()
    env.vicd.docker("create", "--name", name, image, "echo", "whole")
    return env.soap_calls() - a


def test_a_half_made_image_disk_is_made_again(vsphere: VSphereEnv, busybox_tar: Path) -> None:
    d = vsphere.vicd
    _create_calls(vsphere, "warm", "busybox")  # inventory, instant-clone parent, busybox base
    # New images (import stamps a new creation time, so a new id).
    d.docker("import", str(busybox_tar), "fresh:1")
    d.docker("import", str(busybox_tar), "halfway:1")
    images = datastore_dir(vsphere) / "vicd-images"
    owner = vsphere.backend_info()["folder"]
    # One whose base a killed daemon left half made: an upload and a
    # temporary copy, no base.
    stem = d.docker("image", "inspect", "halfway:1", "--format", "{{.Id}}"
                    ).stdout.strip().split(":")[-1]
    leftovers = [images / f"{stem}.{owner}.upload.vmdk", images / f"{stem}.{owner}.tmp.vmdk",
                 images / f"{stem}.{owner}.tmp-flat.vmdk"]
    images.mkdir(exist_ok=True)
    for f in leftovers:
        f.write_bytes(b"cut short")
    first = _create_calls(vsphere, "fresh1", "fresh:1")
    again = _create_calls(vsphere, "fresh2", "fresh:1")
    redone = _create_calls(vsphere, "half1", "halfway:1")
    print(f"SOAP round trips per docker create: first container of a new image {first}, "
          f"the next {again}, first over a half-made base {redone}")
    assert first > again  # the base is made by the first create only
    base = images / f"{stem}.vmdk"
    _assert_native_thin_base(base)
    assert not any(f.exists() for f in leftovers)
    assert d.docker("start", "-a", "half1").stdout == "whole\n"
    assert d.docker("start", "-a", "fresh2").stdout == "whole\n"
    d.docker("rm", "warm", "fresh1", "fresh2", "half1")
    d.docker("rmi", "fresh:1", "halfway:1")


def test_cp_with_a_stopped_container(vsphere: VSphereEnv) -> None:
    # The container's VM boots held (no process) for the copy, then powers off.
    d = vsphere.vicd
    d.docker("create", "--name", "cpnew", "busybox", "cat", "/tmp/in.txt")
    d.docker("cp", "-", "cpnew:/tmp", input=tar_bytes({"in.txt": b"copied while stopped\n"}))
    assert d.inspect("cpnew")["State"]["Status"] == "created"
    off = {"poweredOff"}
    wait_until(lambda: vsphere.admin().vm("cpnew").runtime.powerState in off, what="held VM off")
    assert d.docker("start", "-a", "cpnew").stdout == "copied while stopped\n"
    # Out of an exited container, from its root disk and from a vmdk volume.
    d.docker("volume", "create", "-d", "vmdk", "vcp")
    d.docker("run", "--name", "cpexit", "-v", "vcp:/data", "busybox", "sh", "-c",
             "echo result > /result; echo in-volume > /data/v")
    assert "result" in d.docker("cp", "cpexit:/result", "-").stdout
    assert "in-volume" in d.docker("cp", "cpexit:/data/v", "-").stdout
    # The held VM ends after the copy's stream: off, its volume disk detached.
    def released() -> bool:
        vm = vsphere.admin().vm("cpexit")
        return vm.runtime.powerState in off and not [
            dev for dev in vm.config.hardware.device
            if getattr(dev.backing, "diskMode", "") == "independent_persistent"]
    wait_until(released, what="the held VM off and its volume detached")
    d.docker("rm", "cpnew", "cpexit")
    d.docker("volume", "rm", "vcp")


def test_published_ports_are_refused_clearly(vsphere: VSphereEnv) -> None:
    d = vsphere.vicd
    r = d.docker("run", "--rm", "--name", "webp", "-p", "8080:80", "busybox", "true", check=False)
    assert r.returncode != 0 and "does not publish ports" in r.stderr
    assert "webp" not in d.docker("ps", "-a", "--format", "{{.Names}}").stdout
    assert not [n for n in vsphere.admin().vms() if n.startswith("webp-")]


def test_a_second_daemon_sees_and_removes_the_volumes(vsphere: VSphereEnv,
                                                      tmp_path: Path) -> None:
    from conftest import new_vicd
    from vcsim_fixture import free_port

    d = vsphere.vicd
    d.docker("volume", "create", "-d", "vmdk", "--label", "shared=yes", "vshared")
    other = new_vicd(tmp_path)
    cfg = tmp_path / "other.toml"  # a container host of its own on the same vCenter
    cfg.write_text("[plugins.vsphere]\n"
                   f'serial_listen = "127.0.0.1:{free_port()}"\n'
                   f'folder = "vicd-other-{vsphere.port}"\n'
                   f'resource_pool = "vicd-other-{vsphere.port}"\n')
    args = vsphere.vicd_args()
    args[args.index("--config") + 1] = str(cfg)
    other.start(*args, env=vsphere.vicd_env())
    try:
        out = other.docker("volume", "ls", "--format", "{{.Name}} {{.Driver}}").stdout
        assert "vshared vmdk" in out.splitlines()
        info = json.loads(other.docker("volume", "inspect", "vshared").stdout)[0]
        assert info["Labels"] == {"shared": "yes"}
        # Removed by the other daemon: gone from the first one's list too.
        other.docker("volume", "rm", "vshared")
        assert "vshared" not in volumes(vsphere)
    finally:
        other.stop()
