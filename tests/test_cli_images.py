"""Images through the stock CLI: import, load/save (classic and OCI), tag, rmi, prune, df."""

from __future__ import annotations

import json
import tarfile

from conftest import Vicd


def test_images_tag_inspect_history(vicd: Vicd):
    vicd.docker("tag", "busybox", "bb:2")
    rows = vicd.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    assert "busybox:latest" in rows and "bb:2" in rows
    img = json.loads(vicd.docker("image", "inspect", "bb:2").stdout)[0]
    assert img["Os"] == "linux" and img["Architecture"] == "amd64"
    assert img["RootFS"]["Type"] == "layers" and len(img["RootFS"]["Layers"]) == 1
    assert sorted(img["RepoTags"]) == ["bb:2", "busybox:latest"]
    hist = vicd.docker("history", "--format", "{{.Comment}}", "bb:2").stdout
    assert "Imported from -" in hist
    assert vicd.docker("rmi", "bb:2").stdout.strip() == "Untagged: bb:2"


def test_import_with_changes_runs(vicd: Vicd, busybox_tar):
    vicd.docker("import", "--change", 'CMD ["echo", "from-cmd"]', "--change", "ENV GREETING=hi",
                "--change", "WORKDIR /tmp", str(busybox_tar), "bbcmd:1")
    r = vicd.docker("run", "--rm", "bbcmd:1")
    assert r.stdout == "from-cmd\n"
    r = vicd.docker("run", "--rm", "bbcmd:1", "sh", "-c", "echo $GREETING $(pwd)")
    assert r.stdout == "hi /tmp\n"
    vicd.docker("rmi", "bbcmd:1")


def test_rmi_refuses_an_image_in_use(vicd: Vicd, busybox_tar):
    vicd.docker("import", str(busybox_tar), "inuse:1")
    vicd.docker("create", "--name", "user-of-inuse", "inuse:1", "true")
    r = vicd.docker("rmi", "inuse:1", check=False)
    assert r.returncode == 1 and "conflict" in r.stderr
    vicd.docker("rm", "user-of-inuse")
    out = vicd.docker("rmi", "inuse:1").stdout
    assert "Untagged: inuse:1" in out


def test_save_and_load_classic_and_oci(vicd: Vicd, tmp_path):
    vicd.docker("tag", "busybox", "roundtrip:1")
    archive = tmp_path / "rt.tar"
    vicd.docker("save", "-o", str(archive), "roundtrip:1")
    with tarfile.open(archive) as tf:
        names = tf.getnames()
    assert "manifest.json" in names
    vicd.docker("rmi", "roundtrip:1")
    out = vicd.docker("load", "-i", str(archive)).stdout
    assert "Loaded image: roundtrip:1" in out
    assert vicd.docker("run", "--rm", "roundtrip:1", "echo", "loaded").stdout == "loaded\n"
    # An OCI layout archive (index.json + blobs), as Docker 25+ and skopeo write.
    oci = tmp_path / "oci.tar"
    _classic_to_oci(archive, oci, "ocitag:1")
    out = vicd.docker("load", "-i", str(oci)).stdout
    assert "ocitag:1" in out
    assert vicd.docker("run", "--rm", "ocitag:1", "echo", "oci").stdout == "oci\n"
    vicd.docker("rmi", "roundtrip:1", "ocitag:1")


def _classic_to_oci(src, dst, ref: str) -> None:
    """Rewrite a classic docker-save archive as an OCI image layout."""
    import hashlib
    import io

    with tarfile.open(src) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))[0]
        config = tf.extractfile(manifest["Config"]).read()
        layers = [tf.extractfile(p).read() for p in manifest["Layers"]]

    def desc(media: str, data: bytes) -> dict:
        return {"mediaType": media, "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
                "size": len(data)}

    blobs = {}
    cdesc = desc("application/vnd.oci.image.config.v1+json", config)
    blobs[cdesc["digest"]] = config
    ldescs = []
    for data in layers:
        d = desc("application/vnd.oci.image.layer.v1.tar", data)
        blobs[d["digest"]] = data
        ldescs.append(d)
    man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": cdesc, "layers": ldescs}).encode()
    mdesc = desc("application/vnd.oci.image.manifest.v1+json", man)
    mdesc["annotations"] = {"io.containerd.image.name": f"docker.io/library/{ref}",
                            "org.opencontainers.image.ref.name": ref.split(":")[1]}
    blobs[mdesc["digest"]] = man
    index = json.dumps({"schemaVersion": 2, "manifests": [mdesc]}).encode()
    with tarfile.open(dst, "w") as out:
        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            out.addfile(ti, io.BytesIO(data))
        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", index)
        for digest, data in blobs.items():
            add("blobs/sha256/" + digest.split(":")[1], data)


def test_load_rejects_garbage(vicd: Vicd, tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar archive at all" * 10)
    r = vicd.docker("load", "-i", str(bad), check=False)
    assert r.returncode != 0
    assert "busybox:latest" in vicd.docker("images", "--format", "{{.Repository}}:{{.Tag}}"
                                           ).stdout


def test_image_prune_and_system_df(vicd: Vicd, busybox_tar):
    iid = vicd.docker("import", str(busybox_tar)).stdout.strip()
    out = vicd.docker("image", "prune", "-f").stdout
    assert iid in out
    df = vicd.docker("system", "df", "--format", "{{.Type}} {{.TotalCount}}").stdout
    assert "Images" in df and "Containers" in df
