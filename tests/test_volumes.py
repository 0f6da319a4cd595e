"""Docker volumes on the microvm backend: each volume an ext4 disk of its own."""

from __future__ import annotations

import json

from conftest import Vicd


def test_named_volume_keeps_data_across_containers(vicd: Vicd):
    vicd.docker("volume", "create", "--label", "team=a", "-o", "size=64m", "data1")
    vicd.docker("run", "--rm", "-v", "data1:/data", "busybox", "sh", "-c",
                "echo kept > /data/f && chown 65534 /data/f")
    r = vicd.docker("run", "--rm", "-v", "data1:/data:ro", "busybox", "sh", "-c",
                    "cat /data/f; stat -c %u /data/f; ls -a /data; df -m /data | tail -1; "
                    "touch /data/x 2>&1 || true")
    lines = r.stdout.splitlines()
    assert lines[0] == "kept" and lines[1] == "65534"
    assert "lost+found" not in r.stdout
    assert "Read-only file system" in r.stdout
    vol = json.loads(vicd.docker("volume", "inspect", "data1").stdout)[0]
    assert vol["Driver"] == "local" and vol["Labels"] == {"team": "a"}
    assert vol["Options"] == {"size": "64m"}
    assert "data1" in vicd.docker("volume", "ls", "--filter", "label=team=a", "-q").stdout
    vicd.docker("volume", "rm", "data1")


def test_volume_in_use_and_bad_input(vicd: Vicd):
    vicd.docker("create", "--name", "holder", "-v", "held:/data", "busybox", "true")
    r = vicd.docker("volume", "rm", "held", check=False)
    assert r.returncode == 1 and "volume is in use" in r.stderr
    mounts = vicd.inspect("holder")["Mounts"]
    assert mounts[0]["Name"] == "held" and mounts[0]["Destination"] == "/data"
    assert mounts[0]["Type"] == "volume" and mounts[0]["RW"] is True
    vicd.docker("rm", "holder")
    vicd.docker("volume", "rm", "held")
    r = vicd.docker("volume", "create", "bad/name", check=False)
    assert r.returncode == 1 and "includes invalid characters" in r.stderr
    r = vicd.docker("volume", "create", "-d", "nosuchdriver", "x1", check=False)
    assert r.returncode == 1 and 'create x1: error looking up volume plugin nosuchdriver: ' \
        'plugin "nosuchdriver" not found' in r.stderr
    r = vicd.docker("run", "--rm", "--mount", "type=bind,source=relative,target=/x",
                    "busybox", "true", check=False)
    assert r.returncode == 125 and "must be absolute" in r.stderr
    r = vicd.docker("run", "--rm", "--mount", "type=volume,target=/x", "--mount",
                    "type=volume,target=/x", "busybox", "true", check=False)
    assert r.returncode == 125 and "Duplicate mount point: /x" in r.stderr
    r = vicd.docker("volume", "inspect", "nosuchvol", check=False)
    assert r.returncode == 1 and "no such volume" in r.stderr.lower()
    assert "x1" not in vicd.docker("volume", "ls", "-q").stdout


def test_anonymous_volumes_copy_up_and_rm_v(vicd: Vicd, busybox_tar):
    vicd.docker("import", "--change", "VOLUME /etc", str(busybox_tar), "withvol:1")
    cid = vicd.docker("create", "withvol:1", "sh", "-c", "cat /etc/passwd | head -1").stdout
    cid = cid.strip()
    (mount,) = vicd.inspect(cid)["Mounts"]
    assert mount["Destination"] == "/etc" and len(mount["Name"]) == 64
    vicd.docker("start", "-a", cid)
    assert vicd.docker("logs", cid).stdout.startswith("root:")
    assert mount["Name"] in vicd.docker("volume", "ls", "-q").stdout
    vicd.docker("rm", "-v", cid)
    assert mount["Name"] not in vicd.docker("volume", "ls", "-q").stdout
    vicd.docker("rmi", "withvol:1")


def test_volumes_from_and_mount_flag(vicd: Vicd):
    vicd.docker("run", "--name", "src", "--mount", "type=volume,source=shared1,target=/s",
                "busybox", "sh", "-c", "echo from-src > /s/f")
    r = vicd.docker("run", "--rm", "--volumes-from", "src:ro", "busybox", "cat", "/s/f")
    assert r.stdout == "from-src\n"
    vicd.docker("rm", "src")
    df = vicd.docker("system", "df", "-v", "--format", "{{json .}}").stdout
    assert "shared1" in df
    vicd.docker("volume", "rm", "shared1")


def test_volume_prune(vicd: Vicd):
    vicd.docker("volume", "create", "keepme")
    vicd.docker("run", "-v", "/anon", "--name", "anonuser", "busybox", "true")
    anon = vicd.inspect("anonuser")["Mounts"][0]["Name"]
    vicd.docker("rm", "anonuser")
    out = vicd.docker("volume", "prune", "-f").stdout
    assert anon in out and "keepme" not in out
    vicd.docker("volume", "rm", "keepme")


def test_one_volume_one_running_vm(vicd: Vicd):
    vicd.docker("run", "-d", "--name", "v-a", "-v", "excl:/d", "busybox", "sleep", "300")
    r = vicd.docker("run", "--rm", "-v", "excl:/d", "busybox", "true", check=False)
    assert r.returncode != 0 and "attached to one VM at a time" in r.stderr
    vicd.docker("rm", "-f", "v-a")
    vicd.docker("run", "--rm", "-v", "excl:/d", "busybox", "true")
    vicd.docker("volume", "rm", "excl")


def test_tmpfs_mounts(vicd: Vicd):
    r = vicd.docker("run", "--rm", "--tmpfs", "/scratch:size=8m,mode=1770", "--mount",
                    "type=tmpfs,target=/cache,tmpfs-size=4194304", "busybox", "sh", "-c",
                    "grep -E ' /(scratch|cache) ' /proc/mounts; stat -c %a /scratch; "
                    "echo x > /scratch/f && cat /scratch/f")
    lines = r.stdout.splitlines()
    scratch = next(line for line in lines if " /scratch " in line)
    assert "tmpfs" in scratch and "size=8192k" in scratch and "noexec" in scratch
    cache = next(line for line in lines if " /cache " in line)
    assert "size=4096k" in cache
    assert lines[-2:] == ["1770", "x"]
    cid = vicd.docker("create", "--tmpfs", "/t", "busybox", "true").stdout.strip()
    (m,) = vicd.inspect(cid)["Mounts"]
    assert m == {"Type": "tmpfs", "Name": "", "Source": "", "Destination": "/t", "Driver": "",
                 "Mode": "", "RW": True, "Propagation": ""}
    vicd.docker("rm", cid)


def test_docker_sdk_volumes(vicd: Vicd):
    import docker

    client = docker.DockerClient(base_url=vicd.host)
    vol = client.volumes.create("sdkvol", labels={"via": "sdk"})
    assert vol.attrs["Labels"] == {"via": "sdk"}
    out = client.containers.run("busybox", ["sh", "-c", "echo kept > /v/f; cat /v/f"],
                                volumes={"sdkvol": {"bind": "/v", "mode": "rw"}}, remove=True)
    assert out == b"kept\n"
    out = client.containers.run("busybox", ["cat", "/v/f"],
                                volumes={"sdkvol": {"bind": "/v", "mode": "ro"}}, remove=True)
    assert out == b"kept\n"
    assert "sdkvol" in [v.name for v in client.volumes.list(filters={"label": "via=sdk"})]
    vol.remove()
    assert "sdkvol" not in [v.name for v in client.volumes.list()]
