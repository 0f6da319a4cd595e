"""docker push through vicd to Debian's docker-registry: chunked uploads (PATCH with
Content-Range, then PUT ?digest=) for blobs above the configured chunk size and one PUT for
small ones, cross-repository mounts, HEAD checks, and dockerd's progress lines. The registry's
access log shows which requests were made."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from conftest import Vicd, configured_vicd
from registry_fixture import (
    OCILayout,
    Registry,
    ThrottledProxy,
    lines,
    registries_available,
    registry,  # noqa: F401
    tar_bytes,
)

pytestmark = pytest.mark.skipif(not registries_available(),
                                reason="docker-registry/skopeo/htpasswd not installed")

CHUNK = 256 << 10


@pytest.fixture(scope="module")
def push_vicd(guest_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vicd]:
    """A daemon that moves one layer at a time, pushes in 256 KiB chunks (runs no VM)."""
    d = configured_vicd(tmp_path_factory.mktemp("pushvicd"),
                        f"push_chunk_size = {CHUNK}\nmax_concurrent_uploads = 1\n"
                        "max_concurrent_downloads = 1\n")
    yield d
    d.stop()


def requests(reg: Registry, method: str, repo: str) -> list[str]:
    """Statuses of the registry's answers to `method /v2/repo/blobs/...`, from its access log."""
    pat = re.compile(rf'"{method} /v2/{re.escape(repo)}/blobs/\S* HTTP/1\.1" (\d+)')
    return [m.group(1) for x in (reg.dir / "registry.log").read_text().splitlines()
            if (m := pat.search(x))]


def test_push_chunked_mounted_and_existing(push_vicd: Vicd, registry: Registry,  # noqa: F811
                                           tmp_path: Path) -> None:
    # an image of three layers (1 MiB random: chunked; two tiny: one PUT each) in a source
    # registry; pulled into vicd, then pushed to `registry`, where none of its blobs are
    src = Registry(tmp_path / "src")
    src.start()
    try:
        oci = OCILayout(tmp_path / "oci")
        big = tar_bytes({"big.bin": os.urandom(1 << 20)})
        oci.tag(oci.image([big, tar_bytes({"a": b"a\n"}), tar_bytes({"b": b"b\n"})]), "3")
        src.skopeo_copy(tmp_path / "oci", "3", "three:1")
        out = lines(push_vicd.docker("pull", f"{src.host}/three:1").stdout)
        assert sum(x.endswith(": Waiting") for x in out) == 2, out  # one download slot
    finally:
        src.stop()
    image_id = push_vicd.inspect(f"{src.host}/three:1")["Id"]

    ref = f"{registry.host}/chunked:1"
    push_vicd.docker("tag", f"{src.host}/three:1", ref)
    out = lines(push_vicd.docker("push", ref).stdout)
    ids = [x.split(":")[0] for x in out if x.endswith(": Preparing")]
    assert len(ids) == 3
    for i in ids:
        assert f"{i}: Pushed" in out, out
    assert sum(x.endswith(": Waiting") for x in out) == 2  # one upload slot, three layers
    digest_line = [x for x in out if x.startswith("1: digest: sha256:")]
    assert digest_line, out
    # the 1 MiB layer went in 256 KiB PATCHes; the small ones and the config in one PUT each
    patches = requests(registry, "PATCH", "chunked")
    assert len(patches) >= 4 and set(patches) == {"202"}, patches
    puts = requests(registry, "PUT", "chunked")
    assert len(puts) == 4 and set(puts) == {"201"}, puts  # 3 layers + config

    # the layers are in the registry intact: a fresh pull gives the same image back
    push_vicd.docker("rmi", ref, f"{src.host}/three:1")
    out = push_vicd.docker("pull", ref).stdout
    assert f"Digest: {digest_line[0].split()[2]}" in out
    assert push_vicd.inspect(ref)["Id"] == image_id

    # another repository of the same registry: every layer is mounted, nothing uploaded
    other = f"{registry.host}/mounted:1"
    push_vicd.docker("tag", ref, other)
    out = lines(push_vicd.docker("push", other).stdout)
    assert sum(x.endswith(": Mounted from chunked") for x in out) == 3, out
    assert requests(registry, "PATCH", "mounted") == []
    assert requests(registry, "POST", "mounted").count("201") == 3

    # pushed again: HEAD finds every layer
    out = lines(push_vicd.docker("push", other).stdout)
    assert sum(x.endswith(": Layer already exists") for x in out) == 3, out
    push_vicd.docker("rmi", ref, other)


def test_push_progress_stream(push_vicd: Vicd, registry: Registry) -> None:  # noqa: F811
    """The JSON stream of a push, as the SDK sees it: Pushing lines carry progressDetail."""
    push_vicd.docker("import", "-", "pushprogress:1",
                     input=tar_bytes({"r.bin": os.urandom(600 << 10)}))
    ref = f"{registry.host}/pushprogress"
    push_vicd.docker("tag", "pushprogress:1", f"{ref}:1")
    api = docker.APIClient(base_url=push_vicd.host, version="1.47", timeout=120)
    items = list(api.push(ref, tag="1", stream=True, decode=True))
    assert items[0] == {"status": f"The push refers to repository [{ref}]"}
    pushing = [i for i in items if i.get("status") == "Pushing"]
    assert pushing and all(len(i["id"]) == 12 and i["progress"].startswith("[") for i in pushing)
    last = pushing[-1]["progressDetail"]
    assert last["current"] == last["total"] > CHUNK  # sent in chunks, counted to the end
    assert [i["status"] for i in items if i.get("id") == pushing[0]["id"]][0] == "Preparing"
    assert items[-1]["aux"]["Tag"] == "1" and items[-1]["aux"]["Digest"].startswith("sha256:")
    push_vicd.docker("rmi", f"{ref}:1", "pushprogress:1")


def test_broken_upload_is_retried(push_vicd: Vicd, registry: Registry) -> None:  # noqa: F811
    """A connection cut (once, by a proxy) while a layer is sent: dockerd's countdown, then the
    layer is uploaded again whole, and the registry then holds the image intact."""
    layer = tar_bytes({"r.bin": os.urandom(1 << 20)})
    image_id = push_vicd.docker("import", "-", "cutpush:1", input=layer).stdout.strip()
    proxy = ThrottledProxy(registry.port, cut_after=600 << 10, cut_upstream=True)
    ref = f"127.0.0.1:{proxy.port}/cutpush:1"
    try:
        push_vicd.docker("tag", "cutpush:1", ref)
        out = lines(push_vicd.docker("push", ref).stdout)
    finally:
        proxy.close()
    assert proxy.cuts == 1
    short = hashlib.sha256(layer).hexdigest()[:12]
    assert [x for x in out if "Retrying" in x] == [
        f"{short}: Retrying in {n} second{'s' if n > 1 else ''}" for n in range(5, 0, -1)]
    assert f"{short}: Pushed" in out and out[-1].startswith("1: digest: sha256:")
    push_vicd.docker("rmi", ref, "cutpush:1")
    push_vicd.docker("pull", f"{registry.host}/cutpush:1")
    assert push_vicd.inspect(f"{registry.host}/cutpush:1")["Id"] == image_id
    push_vicd.docker("rmi", f"{registry.host}/cutpush:1")
