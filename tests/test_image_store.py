"""The image store: import, tags, remove, save/load, crash safety, root disks, dockerd."""

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

import vicd.image_store as image_store_mod
from vicd.errors import Conflict, InvalidParameter, NotFound
from vicd.image_store import ImageStore, apply_changes, match_filters

BUSYBOX = Path("/bin/busybox")


def make_tar(files: dict[str, bytes | str | None]) -> bytes:
    """name -> bytes (file), str (symlink target) or None (directory)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, value in files.items():
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_600_000_000
            if value is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif isinstance(value, str):
                ti.type, ti.linkname = tarfile.SYMTYPE, value
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(value), 0o755
                tf.addfile(ti, io.BytesIO(value))
    return buf.getvalue()


def busybox_rootfs() -> bytes:
    files: dict[str, bytes | str | None] = {"bin": None, "bin/busybox": BUSYBOX.read_bytes()}
    for applet in ("sh", "ls", "cat", "echo"):
        files[f"bin/{applet}"] = "busybox"
    files.update({"etc": None, "etc/hostname": b"vicd\n", "tmp": None})
    return make_tar(files)


LAYER = make_tar({"bin": None, "bin/hello": b"#!/bin/sh\necho hi\n", "etc": None})


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


def blob_names(store: ImageStore) -> set[str]:
    return {p.name for p in store.blobs.iterdir()}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- import


def test_import_config_and_id(store: ImageStore):
    img = store.import_tar(io.BytesIO(LAYER), "bb:1", ['CMD ["/bin/sh"]', "ENV A=b"])
    raw = (store.blobs / img.id[7:]).read_bytes()
    assert img.id == "sha256:" + sha(raw)
    cfg = json.loads(raw)
    assert cfg["architecture"] == "amd64" and cfg["os"] == "linux"
    assert cfg["comment"] == "Imported from -"
    assert cfg["history"] == [{"created": cfg["created"], "comment": "Imported from -"}]
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + sha(LAYER)]}
    assert cfg["config"]["Cmd"] == ["/bin/sh"] and cfg["config"]["Env"] == ["A=b"]
    assert (store.blobs / sha(LAYER)).read_bytes() == LAYER
    assert img.repo_tags == ["bb:1"] and img.repo_digests == []
    assert img.size == len(b"#!/bin/sh\necho hi\n")
    assert abs(img.created - time.time()) < 5


def test_import_gzip_message_and_path(store: ImageStore, tmp_path: Path):
    src = tmp_path / "rootfs.tar.gz"
    src.write_bytes(gzip.compress(LAYER))
    img = store.import_tar(src, None, [], message="hello")
    assert img.config["comment"] == "hello"
    assert img.diff_ids == ["sha256:" + sha(LAYER)]
    assert img.repo_tags == []
    assert img.summary()["RepoTags"] == ["<none>:<none>"]


def test_changes():
    cfg = apply_changes(
        [
            "CMD echo $HOME hi",
            'ENTRYPOINT ["/bin/tini", "--"]',
            'ENV A=1 B="two words" C=${A}x',
            "ENV LEGACY some value",
            "WORKDIR /app",
            "WORKDIR sub",
            "USER 1000:1000",
            'LABEL a=b "c d"=e',
            "EXPOSE 80 53/udp 8000-8001",
            'VOLUME ["/data", "/logs"]',
            "VOLUME /cache",
            "STOPSIGNAL SIGINT",
        ]
    )
    assert cfg["Cmd"] == ["/bin/sh", "-c", "echo $HOME hi"]
    assert cfg["Entrypoint"] == ["/bin/tini", "--"]
    assert cfg["Env"] == ["A=1", "B=two words", "C=x", "LEGACY=some value"]
    assert cfg["WorkingDir"] == "/app/sub"
    assert cfg["User"] == "1000:1000"
    assert cfg["Labels"] == {"a": "b", "c d": "e"}
    assert set(cfg["ExposedPorts"]) == {"80/tcp", "53/udp", "8000/tcp", "8001/tcp"}
    assert set(cfg["Volumes"]) == {"/data", "/logs", "/cache"}
    assert cfg["StopSignal"] == "SIGINT"
    assert apply_changes(["ENTRYPOINT /x"])["Cmd"] is None
    with pytest.raises(InvalidParameter, match="from is not a valid change command"):
        apply_changes(["FROM scratch"])


def test_import_invalid_tag_reads_nothing(store: ImageStore):
    src = io.BytesIO(LAYER)
    with pytest.raises(InvalidParameter, match="must be lowercase"):
        store.import_tar(src, "BB", [])
    assert src.tell() == 0


# ---------------------------------------------------------------- lookups, tags, remove


def test_get_variants(store: ImageStore):
    img = store.import_tar(io.BytesIO(LAYER), "docker.io/library/bb:1", [])
    hexid = img.id[7:]
    for ref in ("bb:1", "docker.io/library/bb:1", img.id, hexid, hexid[:1], f"sha256:{hexid[:5]}"):
        assert store.get(ref).id == img.id, ref
    with pytest.raises(NotFound, match=r"^No such image: busybox:latest$"):
        store.get("busybox")
    with pytest.raises(NotFound, match=r"^No such image: bb:2$"):
        store.get("bb:2")
    with pytest.raises(NotFound, match=f"No such image: sha256:{'0' * 64}"):
        store.get("0" * 64)
    with pytest.raises(InvalidParameter, match="invalid reference format"):
        store.get("bb::1")


def test_tag_and_list(store: ImageStore):
    img = store.import_tar(io.BytesIO(LAYER), "bb:1", [])
    assert store.tag("bb:1", "docker.io/library/bb", "2") == "bb:2"
    assert store.tag(img.id, "localhost:5000/x/y") == "localhost:5000/x/y:latest"
    assert store.get("bb:2").repo_tags == ["bb:1", "bb:2", "localhost:5000/x/y:latest"]
    with pytest.raises(InvalidParameter, match="invalid tag format"):
        store.tag("bb:1", "bb", "-x")
    assert [i.id for i in store.list()] == [img.id]
    summary = store.list()[0].summary()
    assert set(summary) == {
        "Containers", "Created", "Id", "Labels", "ParentId", "RepoDigests", "RepoTags",
        "SharedSize", "Size", "VirtualSize",
    }  # fmt: skip
    assert summary["Containers"] == -1 and summary["SharedSize"] == -1


def test_inspect_shape(store: ImageStore):
    img = store.import_tar(io.BytesIO(LAYER), "bb:1", ["LABEL x=y", 'CMD ["sh"]'])
    data = img.inspect()
    assert data["Id"] == img.id and data["RepoTags"] == ["bb:1"]
    assert data["GraphDriver"] == {"Data": {}, "Name": "vicd-ext4"}
    assert data["RootFS"] == {"Type": "layers", "Layers": img.diff_ids}
    assert data["Config"]["Cmd"] == ["sh"] and data["Config"]["Labels"] == {"x": "y"}
    assert data["ContainerConfig"]["Cmd"] is None and "Hostname" in data["ContainerConfig"]
    assert data["Created"].endswith("Z") and data["Metadata"]["LastTagTime"].endswith("Z")
    assert data["Os"] == "linux" and data["Architecture"] == "amd64"
    assert data["Size"] == data["VirtualSize"] == img.size


def test_remove_untag_then_delete_with_shared_layer(store: ImageStore):
    a = store.import_tar(io.BytesIO(LAYER), "a:1", [])
    b = store.import_tar(io.BytesIO(LAYER), "b:1", ["CMD sh"])
    assert a.id != b.id and a.diff_ids == b.diff_ids
    store.tag("a:1", "a", "2")
    assert store.remove("a:2") == [{"Untagged": "a:2"}]
    out = store.remove("a:1")
    assert out == [{"Untagged": "a:1"}, {"Deleted": a.id}]  # layer still used by b
    assert (store.blobs / sha(LAYER)).exists()
    assert not (store.blobs / a.id[7:]).exists()
    out = store.remove("docker.io/library/b:1")
    assert out == [{"Untagged": "b:1"}, {"Deleted": b.id}, {"Deleted": b.diff_ids[0]}]
    assert blob_names(store) == set()
    assert store.list() == []


def test_remove_conflicts(store: ImageStore):
    img = store.import_tar(io.BytesIO(LAYER), "busybox", [])
    short = img.id[7:19]

    def used(image_id: str) -> str:
        return "0123abcd" * 8 if image_id == img.id else ""

    with pytest.raises(Conflict) as exc:
        store.remove("busybox", in_use=used)
    assert exc.value.message == (
        'conflict: unable to remove repository reference "busybox" (must force) - '
        f"container 0123abcd0123 is using its referenced image {short}"
    )
    with pytest.raises(Conflict, match="image is being used by stopped container 0123abcd0123"):
        store.remove(img.id, in_use=used)
    store.tag("busybox", "other")
    with pytest.raises(Conflict) as exc:
        store.remove(img.id[7:19])
    assert exc.value.message == (
        f"conflict: unable to delete {short} (must be forced) - "
        "image is referenced in multiple repositories"
    )
    with pytest.raises(Conflict, match=r"\(cannot be forced\) - image is being used by running"):
        store.remove(img.id, force=True, running=used)
    # a forced untag of the last tag keeps an image containers still use
    assert store.remove("other:latest") == [{"Untagged": "other:latest"}]
    assert store.remove("busybox", force=True, in_use=used) == [
        {"Untagged": "busybox:latest"},
        {"Deleted": img.id},
        {"Deleted": img.diff_ids[0]},
    ]


def test_remove_by_id_with_single_tag(store: ImageStore):
    img = store.import_tar(io.BytesIO(LAYER), "bb:1", [])
    out = store.remove(img.id[7:12])
    assert out[:2] == [{"Untagged": "bb:1"}, {"Deleted": img.id}]
    with pytest.raises(NotFound):
        store.get(img.id)


def test_history(store: ImageStore):
    img = store.import_tar(io.BytesIO(LAYER), "bb:1", [], message="m")
    (item,) = store.history("bb:1")
    assert item == {
        "Id": img.id, "Created": img.created, "CreatedBy": "", "Tags": ["bb:1"],
        "Size": img.size, "Comment": "m",
    }  # fmt: skip


def test_filters_and_prune(store: ImageStore):
    old = store.import_tar(io.BytesIO(LAYER), "old:1", ["LABEL tier=base"])
    time.sleep(0.01)
    dangling = store.import_tar(io.BytesIO(make_tar({"x": b"x"})), None, [])
    time.sleep(0.01)
    new = store.import_tar(io.BytesIO(make_tar({"y": b"y"})), "localhost:5000/new:2", [])

    def ids(filters: dict[str, list[str]]) -> list[str]:
        return [i.id for i in store.list(filters)]

    assert ids({"dangling": ["true"]}) == [dangling.id]
    assert ids({"dangling": ["false"]}) == [new.id, old.id]
    assert ids({"label": ["tier"]}) == ids({"label": ["tier=base"]}) == [old.id]
    assert ids({"label": ["tier=x"]}) == []
    assert ids({"reference": ["old"]}) == [old.id]
    assert ids({"reference": ["localhost:5000/*"]}) == [new.id]
    assert ids({"before": ["localhost:5000/new:2"]}) == [dangling.id, old.id]
    assert ids({"since": ["old:1"]}) == [new.id, dangling.id]
    assert match_filters(store.get("old:1"), {"reference": ["o*:1"]})
    assert match_filters(store.get("old:1"), {"before": ["localhost:5000/new:2"]}, store)
    assert not match_filters(old, {"since": [new.id]}, store.get)
    with pytest.raises(InvalidParameter, match="^Invalid filter 'foo'$"):
        store.list({"foo": ["x"]})
    with pytest.raises(InvalidParameter, match=r"^Invalid filter 'dangling=\[maybe\]'$"):
        store.list({"dangling": ["maybe"]})

    report = store.prune()
    assert report["ImagesDeleted"][0] == {"Deleted": dangling.id}
    assert report["SpaceReclaimed"] == 1
    assert store.prune() == {"ImagesDeleted": None, "SpaceReclaimed": 0}
    report = store.prune(dangling_only=False, in_use=lambda i: i == old.id)
    assert {"Deleted": new.id} in report["ImagesDeleted"]
    assert [i.id for i in store.list()] == [old.id]


# ---------------------------------------------------------------- save / load


def roundtrip(src: ImageStore, dst: ImageStore, refs: list[str], oci: bool,
              new_layers: bool = True) -> list[str]:
    buf = io.BytesIO()
    src.save(refs, buf, oci=oci)
    buf.seek(0)
    events: list[dict] = []
    lines = dst.load(buf, events.append)
    if new_layers:
        assert events and {e["status"] for e in events} == {"Loading layer"}
        assert events[-1]["progressDetail"]["current"] == events[-1]["progressDetail"]["total"]
    else:  # like dockerd: layers it has are neither read nor shown
        assert events == []
    return lines


@pytest.mark.parametrize("oci", [False, True])
def test_save_load_roundtrip(store: ImageStore, tmp_path: Path, oci: bool):
    base = store.import_tar(io.BytesIO(LAYER), "bb:1", ["CMD sh"])
    store.tag("bb:1", "bb", "2")
    other = store.import_tar(io.BytesIO(LAYER), None, [])
    third = store.import_tar(io.BytesIO(make_tar({"z": b"z"})), "localhost:5000/z:t", [])
    fresh = ImageStore(tmp_path / "fresh")
    lines = roundtrip(store, fresh, ["bb", other.id, "localhost:5000/z:t"], oci)
    assert lines == [
        "Loaded image: bb:1",
        "Loaded image: bb:2",
        f"Loaded image ID: {other.id}",
        "Loaded image: localhost:5000/z:t",
    ]
    assert fresh.get("bb:2").id == base.id
    assert fresh.get(other.id).diff_ids == base.diff_ids
    assert fresh.get("localhost:5000/z:t").id == third.id
    assert fresh.get("bb:1").config == base.config
    assert blob_names(fresh) == blob_names(store)
    # loading again moves nothing; re-pointing a tag says so like dockerd
    fresh.tag(other.id, "bb", "1")
    lines = roundtrip(store, fresh, ["bb:1"], oci, new_layers=False)
    assert lines == [
        f"The image bb:1 already exists, renaming the old one with ID {other.id} to empty string",
        "Loaded image: bb:1",
    ]


def test_save_classic_layout(store: ImageStore):
    img = store.import_tar(io.BytesIO(LAYER), "bb:1", [])
    buf = io.BytesIO()
    store.save(["bb:1"], buf)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        names = set(tf.getnames())
        manifest = json.load(tf.extractfile("manifest.json"))
        repos = json.load(tf.extractfile("repositories"))
        (layer,) = manifest[0]["Layers"]
        assert tf.extractfile(layer).read() == LAYER
        layer_dir = layer.split("/")[0]
        assert tf.extractfile(f"{layer_dir}/VERSION").read() == b"1.0"
        assert json.load(tf.extractfile(f"{layer_dir}/json"))["id"] == layer_dir
    assert manifest == [{"Config": f"{img.id[7:]}.json", "RepoTags": ["bb:1"], "Layers": [layer]}]
    assert repos == {"bb": {"1": layer_dir}}
    assert f"{img.id[7:]}.json" in names
    with pytest.raises(NotFound, match="reference does not exist"):
        store.save(["bb:2"], io.BytesIO())
    with pytest.raises(NotFound, match="No such image: nope"):
        store.save(["nope"], io.BytesIO())


def oci_archive(layers: list[bytes], annotations: dict[str, str], gz: bool = True) -> bytes:
    """A hand-made OCI layout archive (as Docker 25+/buildkit write them), gzip layers."""
    blobs: dict[str, bytes] = {}

    def put(data: bytes) -> str:
        blobs[sha(data)] = data
        return "sha256:" + sha(data)

    config = {
        "architecture": "amd64", "os": "linux", "created": "2024-01-02T03:04:05.123456789Z",
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha(x) for x in layers]},
        "history": [{"created_by": f"step {i}"} for i in range(len(layers))],
    }  # fmt: skip
    cfg = json.dumps(config).encode()
    stored = [gzip.compress(x) if gz else x for x in layers]
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(cfg), "size": len(cfg)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": put(x), "size": len(x)} for x in stored],
    }).encode()  # fmt: skip
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": put(manifest), "size": len(manifest),
                       "annotations": annotations}],
    }  # fmt: skip
    files: dict[str, bytes | str | None] = {
        "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
        "index.json": json.dumps(index).encode(),
        "blobs": None,
        "blobs/sha256": None,
    }
    files.update({f"blobs/sha256/{h}": data for h, data in blobs.items()})
    return make_tar(files)


def test_load_oci_gzip_layers(store: ImageStore):
    l1, l2 = make_tar({"a": b"1"}), make_tar({"b": b"22", ".wh.a": b""})
    archive = oci_archive([l1, l2], {"io.containerd.image.name": "docker.io/library/x:1"})
    assert store.load(io.BytesIO(archive), None) == ["Loaded image: x:1"]
    img = store.get("x:1")
    assert img.diff_ids == ["sha256:" + sha(l1), "sha256:" + sha(l2)]
    assert (store.blobs / sha(l2)).read_bytes() == l2  # stored uncompressed
    assert img.created == 1704164645
    assert [h["CreatedBy"] for h in store.history("x:1")] == ["step 1", "step 0"]
    archive = oci_archive([l1], {"org.opencontainers.image.ref.name": "y:2"}, gz=False)
    assert store.load(io.BytesIO(gzip.compress(archive)), None) == ["Loaded image: y:2"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.pop("manifest.json"), "neither manifest.json nor index.json"),
        (lambda f: f.update({"manifest.json": b"{"}), "not valid JSON"),
        (lambda f: f.update({"manifest.json": b'[{"Config": "nope.json"}]'}), "nope.json"),
        (lambda f: f.update({"layer.tar": make_tar({"other": b"x"})}), "invalid diffID"),
        (lambda f: f.update({"layer.tar": make_tar({"../x": b"x"})}), "outside"),
        (
            lambda f: f.update({"manifest.json": f["manifest.json"].replace(b'"bb:1"', b'"BB"')}),
            "must be lowercase",
        ),
    ],
)
def test_load_refuses_malformed_classic(store: ImageStore, mutate, message):
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha(LAYER)]},
    }).encode()  # fmt: skip
    files = {
        f"{sha(config)}.json": config,
        "layer.tar": LAYER,
        "manifest.json": json.dumps(
            [{"Config": f"{sha(config)}.json", "RepoTags": ["bb:1"], "Layers": ["layer.tar"]}]
        ).encode(),
    }
    mutate(files)
    with pytest.raises(InvalidParameter, match=message):
        store.load(io.BytesIO(make_tar(files)), None)
    assert store.list() == [] and blob_names(store) == set()
    assert list(store.tmp.iterdir()) == []


def test_load_refuses_oci_digest_mismatch(store: ImageStore):
    archive = oci_archive([LAYER], {"io.containerd.image.name": "x:1"})
    with tarfile.open(fileobj=io.BytesIO(archive)) as tf:
        files = {m.name: tf.extractfile(m).read() if m.isfile() else None for m in tf}
    victim = next(n for n, d in files.items() if d and d.startswith(b"\x1f\x8b"))
    files[victim] = gzip.compress(make_tar({"evil": b"x"}))
    with pytest.raises(InvalidParameter, match="digest mismatch"):
        store.load(io.BytesIO(make_tar(files)), None)
    assert store.list() == []


# ---------------------------------------------------------------- crash safety


class Exploding(io.RawIOBase):
    """A source that dies half way, like a client (or we) being killed mid-transfer."""

    def __init__(self, data: bytes, at: int) -> None:
        self.data, self.at, self.pos = data, at, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.pos >= self.at:
            raise KeyboardInterrupt("killed")
        n = min(len(b), self.at - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def test_interrupted_import_leaves_nothing(tmp_path: Path):
    root = tmp_path / "images"
    store = ImageStore(root)
    keep = store.import_tar(io.BytesIO(LAYER), "keep:1", [])
    data = busybox_rootfs()
    with pytest.raises(KeyboardInterrupt):
        store.import_tar(Exploding(data, len(data) // 2), "half:1", [])
    assert [i.id for i in store.list()] == [keep.id]
    assert list(store.tmp.iterdir()) == []
    reopened = ImageStore(root)
    assert [i.id for i in reopened.list()] == [keep.id]
    assert blob_names(reopened) == {keep.id[7:], sha(LAYER)}


def test_crash_before_state_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Blobs written, state rename never happens (kill -9 there): invisible, then collected."""
    root = tmp_path / "images"
    store = ImageStore(root)
    store.import_tar(io.BytesIO(LAYER), "keep:1", [])
    state_before = (root / "repositories.json").read_bytes()
    real_replace = os.replace

    def dying_replace(src, dst):
        if str(dst).endswith("repositories.json"):
            raise SystemExit("kill -9")
        real_replace(src, dst)

    monkeypatch.setattr(image_store_mod.os, "replace", dying_replace)
    with pytest.raises(SystemExit):
        store.import_tar(io.BytesIO(busybox_rootfs()), "half:1", [])
    monkeypatch.undo()
    assert (root / "repositories.json").read_bytes() == state_before
    assert not [p for p in root.iterdir() if p.name.startswith(".repositories.")]
    reopened = ImageStore(root)
    assert [i.repo_tags for i in reopened.list()] == [["keep:1"]]
    assert len(blob_names(reopened)) == 2


# ---------------------------------------------------------------- root disks


def debugfs(disk: Path, cmd: str) -> str:
    out = subprocess.run(
        ["debugfs", "-R", cmd, str(disk)], capture_output=True, text=True, check=True
    )
    return out.stdout


@pytest.mark.skipif(shutil.which("mke2fs") is None, reason="e2fsprogs missing")
def test_rootfs_disk(store: ImageStore, monkeypatch: pytest.MonkeyPatch):
    base = store.import_tar(io.BytesIO(busybox_rootfs()), "bb:1", [])
    upper = make_tar({"etc": None, "etc/.wh.hostname": b"", "etc/motd": b"hi\n"})
    buf = io.BytesIO()
    store.save(["bb:1"], buf)
    # stack a second layer by loading a hand-made two-layer classic archive
    config = dict(base.config)
    config["rootfs"] = {"type": "layers", "diff_ids": [*base.diff_ids, "sha256:" + sha(upper)]}
    raw = json.dumps(config).encode()
    archive = make_tar({
        f"{sha(raw)}.json": raw,
        "l1.tar": busybox_rootfs(),
        "l2.tar": upper,
        "manifest.json": json.dumps([{"Config": f"{sha(raw)}.json", "RepoTags": ["two:1"],
                                      "Layers": ["l1.tar", "l2.tar"]}]).encode(),
    })  # fmt: skip
    store.load(io.BytesIO(archive), None)

    builds = []
    real_build = ImageStore._build_disk

    def counting(self, *args):
        builds.append(args)
        time.sleep(0.2)  # let the other callers pile up on the lock
        return real_build(self, *args)

    monkeypatch.setattr(ImageStore, "_build_disk", counting)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(store.rootfs_disk("two:1", 64 << 20)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(set(results)) == 1
    disk = results[0]
    assert disk == store.disks / f"{sha(raw)}.ext4"
    assert disk.stat().st_size >= 64 << 20
    assert disk.stat().st_blocks * 512 < disk.stat().st_size  # sparse
    listing = debugfs(disk, "ls -l /bin")
    assert "busybox" in listing and "sh" in listing
    assert "hostname" not in debugfs(disk, "ls /etc") and "motd" in debugfs(disk, "ls /etc")
    assert debugfs(disk, "cat /etc/motd") == "hi\n"
    assert "Type: symlink" in debugfs(disk, "stat /bin/sh")
    assert list(store.tmp.iterdir()) == []
    # removal drops the cached disk too
    store.remove("two:1")
    assert not disk.exists()


# ---------------------------------------------------------------- against dockerd 20.10

DOCKERD = Path("/usr/sbin/dockerd")
DOCKER = Path("/usr/bin/docker")


@pytest.fixture
def dockerd(tmp_path_factory: pytest.TempPathFactory):
    if not (DOCKERD.exists() and DOCKER.exists()) or os.geteuid() != 0:
        pytest.skip("reference dockerd (run as root) not available")
    d = tmp_path_factory.mktemp("dockerd")
    sock = d / "docker.sock"
    log = open(d / "log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(DOCKERD), "--host", f"unix://{sock}", "--data-root", str(d / "data"),
         "--exec-root", str(d / "exec"), "--iptables=false", "--bridge=none",
         "--pidfile", str(d / "pid")],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def docker(*args: str, stdin: bytes | None = None) -> bytes:
        res = subprocess.run(
            [str(DOCKER), "-H", f"unix://{sock}", *args], input=stdin, capture_output=True
        )
        assert res.returncode == 0, res.stderr.decode()
        return res.stdout

    try:
        for _ in range(100):
            if proc.poll() is not None:
                pytest.skip(f"dockerd exited: {(d / 'log').read_text()[-2000:]}")
            if (
                sock.exists()
                and subprocess.run(
                    [str(DOCKER), "-H", f"unix://{sock}", "version"], capture_output=True
                ).returncode
                == 0
            ):
                break
            time.sleep(0.2)
        else:
            pytest.skip("dockerd did not come up")
        yield docker
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_interop_with_dockerd(store: ImageStore, tmp_path: Path, dockerd):
    rootfs = busybox_rootfs()
    # ours -> dockerd, both layouts
    ours = store.import_tar(io.BytesIO(rootfs), "vicd/bb:1", ['CMD ["/bin/sh"]', "ENV A=b"])
    store.tag("vicd/bb:1", "vicd/oci", "2")
    for ref, oci in (("vicd/bb:1", False), ("vicd/oci:2", True)):
        buf = io.BytesIO()
        store.save([ref], buf, oci=oci)
        out = dockerd("load", stdin=buf.getvalue()).decode()
        assert f"Loaded image: {ref}" in out
        info = json.loads(dockerd("image", "inspect", ref))[0]
        assert info["Id"] == ours.id
        assert info["RootFS"]["Layers"] == ours.diff_ids
        assert info["Config"]["Cmd"] == ["/bin/sh"]

    # dockerd -> ours
    src = tmp_path / "rootfs.tar"
    src.write_bytes(rootfs)
    dockerd("import", "-c", "ENTRYPOINT /bin/sh", "-m", "from dockerd", str(src), "ref/bb:9")
    saved = dockerd("save", "ref/bb:9")
    lines = store.load(io.BytesIO(saved), None)
    assert lines == ["Loaded image: ref/bb:9"]
    theirs = json.loads(dockerd("image", "inspect", "ref/bb:9"))[0]
    img = store.get("ref/bb:9")
    assert img.id == theirs["Id"]
    assert img.diff_ids == ours.diff_ids == theirs["RootFS"]["Layers"]
    assert img.inspect()["Config"] == theirs["Config"]
    assert img.inspect()["Comment"] == "from dockerd"
    assert img.size == theirs["Size"]
    hist = json.loads(dockerd("image", "history", "--format", "{{json .}}", "--no-trunc",
                              "ref/bb:9").splitlines()[0])  # fmt: skip
    assert store.history("ref/bb:9")[0]["Comment"] == hist["Comment"]
