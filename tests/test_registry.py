"""docker pull / push / login / import-from-URL against real registries (Debian's
docker-registry on loopback ports), driven with the stock docker CLI, and unit checks of the
client's pieces. Token auth: test_registry_token.py."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from conftest import DOCKER, Vicd, configured_vicd
from refdockerd import RefDockerd, dockerd  # noqa: F401
from registry_fixture import (
    PASSWORD,
    USER,
    OCILayout,
    Registry,
    ThrottledProxy,
    auth_registry,  # noqa: F401
    lines,
    registries_available,
    registry,  # noqa: F401
    tar_bytes,
)
from vicd import progress
from vicd import registry as reg_mod
from vicd.registry import AuthConfig

pytestmark = pytest.mark.skipif(not registries_available(),
                                reason="docker-registry/skopeo/htpasswd not installed")

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def sdk(v: Vicd) -> docker.APIClient:
    return docker.APIClient(base_url=v.host, version="1.47", timeout=300)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory, busybox_tar: Path) -> Path:
    """An OCI layout: `single` (busybox + one file layer, amd64) and `multi` (an index of
    that amd64 image and a tiny fake arm64 one)."""
    d = tmp_path_factory.mktemp("oci")
    oci = OCILayout(d)
    extra = tar_bytes({"etc/vicd-layer.txt": b"second layer here\n"})
    amd64 = oci.image([busybox_tar.read_bytes(), extra])
    oci.tag(amd64, "single")
    arm64 = oci.image([tar_bytes({"arm64-only": b"fake arm64 layer\n"})], arch="arm64")
    oci.multi([amd64, arm64], "multi")
    return d


def events_since(v: Vicd, since: float, action: str) -> list[dict]:
    out = v.docker("events", "--since", str(int(since) - 1), "--until", str(int(time.time()) + 1),
                   "--filter", "type=image", "--filter", f"event={action}",
                   "--format", "{{json .}}").stdout
    return [json.loads(x) for x in lines(out)]


# ---------------------------------------------------------------- push and pull, no auth


def test_push_rmi_pull_run_roundtrip(vicd: Vicd, registry: Registry) -> None:  # noqa: F811
    ref = f"{registry.host}/roundtrip:1"
    t0 = time.time()
    vicd.docker("tag", "busybox", ref)
    out = vicd.docker("push", ref).stdout
    assert f"The push refers to repository [{registry.host}/roundtrip]" in out
    assert "Pushed" in out
    pushed_digest = [x for x in lines(out) if x.startswith("1: digest: sha256:")]
    assert pushed_digest, out
    digest = pushed_digest[0].split()[2]
    size = int(pushed_digest[0].split()[-1])
    raw, reg_digest = registry.manifest("roundtrip", "1", DOCKER_MANIFEST)
    assert reg_digest == digest and len(raw) == size
    assert json.loads(raw)["mediaType"] == DOCKER_MANIFEST
    # pushing again skips the layer (HEAD check)
    assert "Layer already exists" in vicd.docker("push", ref).stdout

    vicd.docker("rmi", ref)
    out = vicd.docker("pull", ref).stdout
    assert "1: Pulling from roundtrip" in out
    assert f"Digest: {digest}" in out
    assert f"Status: Downloaded newer image for {ref}" in out
    info = vicd.inspect(ref)
    assert info["RepoDigests"] == [f"{registry.host}/roundtrip@{digest}"]
    assert info["Id"] == vicd.inspect("busybox")["Id"]
    assert f"Status: Image is up to date for {ref}" in vicd.docker("pull", ref).stdout
    assert vicd.docker("run", "--rm", ref, "echo", "pulled-ok").stdout.strip() == "pulled-ok"
    assert any(e["Actor"]["ID"] == ref for e in events_since(vicd, t0, "push"))
    assert any(e["Actor"]["ID"] == ref for e in events_since(vicd, t0, "pull"))


def test_run_pulls_a_missing_image(vicd: Vicd, registry: Registry, layout: Path) -> None:  # noqa: F811
    registry.skopeo_copy(layout, "single", "implicit:1")
    ref = f"{registry.host}/implicit:1"
    r = vicd.docker("run", "--rm", ref, "cat", "/etc/vicd-layer.txt")
    assert f"Unable to find image '{ref}' locally" in r.stderr
    assert "Status: Downloaded newer image" in r.stderr
    assert r.stdout == "second layer here\n"
    vicd.docker("rmi", ref)


def test_pull_oci_multilayer_by_tag_then_digest_and_run(
    vicd: Vicd, registry: Registry, layout: Path  # noqa: F811
) -> None:
    registry.skopeo_copy(layout, "single", "ocisingle:1")
    ref = f"{registry.host}/ocisingle:1"
    out = vicd.docker("pull", ref).stdout
    assert "Pull complete" in out and "Digest: sha256:" in out, out
    digest = [x for x in lines(out) if x.startswith("Digest: ")][0].split()[1]
    out = vicd.docker("run", "--rm", ref, "cat", "/etc/vicd-layer.txt").stdout
    assert out == "second layer here\n"
    assert len(vicd.inspect(ref)["RootFS"]["Layers"]) == 2

    vicd.docker("rmi", ref)
    by_digest = f"{registry.host}/ocisingle@{digest}"
    out = vicd.docker("pull", by_digest).stdout
    assert f"{digest}: Pulling from ocisingle" in out
    info = vicd.inspect(by_digest)
    assert info["RepoTags"] == []
    assert info["RepoDigests"] == [by_digest]
    vicd.docker("rmi", by_digest)


def test_pull_docker_schema2_from_skopeo(vicd: Vicd, registry: Registry, layout: Path) -> None:  # noqa: F811
    registry.skopeo_copy(layout, "single", "v2s2:1", "--format", "v2s2")
    raw, _ = registry.manifest("v2s2", "1", DOCKER_MANIFEST)
    assert json.loads(raw)["mediaType"] == DOCKER_MANIFEST
    ref = f"{registry.host}/v2s2:1"
    vicd.docker("pull", ref)
    assert vicd.docker("run", "--rm", ref, "cat", "/etc/vicd-layer.txt").stdout == \
        "second layer here\n"
    vicd.docker("rmi", ref)


def test_pull_zstd_layers(vicd: Vicd, registry: Registry, tmp_path: Path,  # noqa: F811
                          busybox_tar: Path) -> None:
    """An OCI tar+zstd layer (copied in by skopeo as it is): pulled, run, and pushed on as
    gzip (the registry's manifest then names only gzip layers)."""
    oci = OCILayout(tmp_path / "oci")
    extra = tar_bytes({"etc/zstd.txt": b"from a zstd layer\n" * 1000})
    oci.tag(oci.image([busybox_tar.read_bytes(), extra], zstd=(1,)), "z")
    registry.skopeo_copy(tmp_path / "oci", "z", "zstd:1")
    manifest = json.loads(registry.manifest("zstd", "1",
                                            "application/vnd.oci.image.manifest.v1+json")[0])
    assert manifest["layers"][1]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
    ref = f"{registry.host}/zstd:1"
    out = vicd.docker("pull", ref).stdout
    assert f"Status: Downloaded newer image for {ref}" in out
    layers = vicd.inspect(ref)["RootFS"]["Layers"]
    assert layers[1] == "sha256:" + hashlib.sha256(extra).hexdigest()
    r = vicd.docker("run", "--rm", ref, "sh", "-c", "head -1 /etc/zstd.txt; wc -l < /etc/zstd.txt")
    assert r.stdout.split() == ["from", "a", "zstd", "layer", "1000"]

    again = f"{registry.host}/zstd-as-gzip:1"
    vicd.docker("tag", ref, again)
    vicd.docker("push", again)
    pushed = json.loads(registry.manifest("zstd-as-gzip", "1", DOCKER_MANIFEST)[0])
    assert [la["mediaType"] for la in pushed["layers"]] == [
        "application/vnd.docker.image.rootfs.diff.tar.gzip"] * 2
    vicd.docker("rmi", ref, again)


def test_manifest_list_platform_selection(vicd: Vicd, registry: Registry, layout: Path) -> None:  # noqa: F811
    registry.skopeo_copy(layout, "multi", "multi:1", "--all")
    raw, _ = registry.manifest("multi", "1", "application/vnd.oci.image.index.v1+json")
    assert len(json.loads(raw)["manifests"]) == 2
    ref = f"{registry.host}/multi:1"
    vicd.docker("pull", ref)
    assert vicd.inspect(ref)["Architecture"] == "amd64"
    assert vicd.docker("run", "--rm", ref, "cat", "/etc/vicd-layer.txt").stdout == \
        "second layer here\n"
    # the list's digest is the repo digest, as dockerd records it
    index_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    assert vicd.inspect(ref)["RepoDigests"] == [f"{registry.host}/multi@{index_digest}"]

    vicd.docker("pull", "--platform", "linux/arm64", ref)
    assert vicd.inspect(ref)["Architecture"] == "arm64"
    r = vicd.docker("pull", "--platform", "linux/s390x", ref, check=False)
    assert r.returncode != 0
    assert "no matching manifest for linux/s390x in the manifest list entries" in r.stderr
    vicd.docker("rmi", ref)


def test_pull_progress_stream(vicd: Vicd, registry: Registry, tmp_path: Path) -> None:  # noqa: F811
    oci = OCILayout(tmp_path / "oci")
    oci.tag(oci.image([tar_bytes({"a": os.urandom(3 << 20)}), tar_bytes({"b": b"b"})]), "p")
    registry.skopeo_copy(tmp_path / "oci", "p", "progress:1")
    api = sdk(vicd)
    items = list(api.pull(f"{registry.host}/progress", tag="1", stream=True, decode=True))
    statuses = [i.get("status", "") for i in items]
    assert items[0] == {"status": "Pulling from progress", "id": "1"}
    for want in ("Pulling fs layer", "Downloading", "Verifying Checksum", "Download complete",
                 "Extracting", "Pull complete"):
        assert want in statuses, (want, statuses)
    dl = [i for i in items if i.get("status") == "Downloading"][-1]
    assert dl["progressDetail"]["current"] == dl["progressDetail"]["total"] > 0
    assert dl["progress"].startswith("[") and "/" in dl["progress"]
    assert len(dl["id"]) == 12
    assert statuses[-2].startswith("Digest: sha256:")
    assert statuses[-1] == f"Status: Downloaded newer image for {registry.host}/progress:1"
    api.remove_image(f"{registry.host}/progress:1")


def test_pull_errors_before_stream(vicd: Vicd, registry: Registry) -> None:  # noqa: F811
    r = vicd.docker("pull", f"{registry.host}/roundtrip:nosuchtag", check=False)
    assert r.returncode == 1
    assert (f"Error response from daemon: manifest for {registry.host}/roundtrip:nosuchtag "
            "not found: manifest unknown: manifest unknown") in r.stderr
    r = vicd.docker("pull", "nosuchhost.invalid/x:1", check=False)
    assert 'Get "https://nosuchhost.invalid/v2/": dial tcp: lookup nosuchhost.invalid' in r.stderr
    api = sdk(vicd)
    with pytest.raises(docker.errors.NotFound):
        api.pull(f"{registry.host}/roundtrip", tag="nosuchtag")
    with pytest.raises(docker.errors.APIError) as e:
        api.pull("UPPER/case", tag="1")
    assert e.value.status_code == 400


def test_blob_digest_mismatch_refused(vicd: Vicd, registry: Registry, tmp_path: Path) -> None:  # noqa: F811
    oci = OCILayout(tmp_path / "oci")
    oci.tag(oci.image([tar_bytes({"corrupt-me": os.urandom(300_000)})]), "c")
    registry.skopeo_copy(tmp_path / "oci", "c", "corrupt:1")
    manifest = json.loads(registry.manifest("corrupt", "1",
                                            "application/vnd.oci.image.manifest.v1+json")[0])
    layer = manifest["layers"][0]["digest"]
    blob = registry.blob_file(layer)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    store = vicd.data_root / "images"
    blobs_before = set(os.listdir(store / "blobs/sha256"))
    r = vicd.docker("pull", f"{registry.host}/corrupt:1", check=False)
    assert r.returncode != 0
    assert f"filesystem layer verification failed for digest {layer}" in r.stderr + r.stdout
    assert "Retrying" not in r.stdout  # a whole download that fails its digest is final
    assert vicd.docker("images", "-q", f"{registry.host}/corrupt").stdout.strip() == ""
    # nothing left behind: no new blob in the store, no file of it in the pull cache
    assert set(os.listdir(store / "blobs/sha256")) == blobs_before
    assert not [p for p in (store / "tmp/pull-cache").iterdir()
                if p.name.startswith(layer.split(":")[1])]


@pytest.fixture(scope="module")
def noretry_vicd(guest_dir: Path, busybox_tar: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vicd]:
    """A daemon that gives up on the first broken download (max_download_attempts = 0)."""
    d = configured_vicd(tmp_path_factory.mktemp("noretry"), "max_download_attempts = 0\n")
    d.docker("import", str(busybox_tar), "busybox:latest")
    yield d
    d.stop()


def test_interrupted_pull_leaves_no_image(noretry_vicd: Vicd, tmp_path: Path) -> None:
    vicd = noretry_vicd
    reg = Registry(tmp_path / "reg")
    reg.start()
    proxy = None
    try:
        oci = OCILayout(tmp_path / "oci")
        oci.tag(oci.image([tar_bytes({"big": os.urandom(12 << 20)}),
                           tar_bytes({"small": b"x"})]), "big")
        reg.skopeo_copy(tmp_path / "oci", "big", "big:1")
        proxy = ThrottledProxy(reg.port, rate=1 << 20)  # 12 MiB at 1 MiB/s
        store = vicd.data_root / "images"
        blobs_before = set(os.listdir(store / "blobs/sha256"))
        api = sdk(vicd)
        seen: list[dict] = []
        for item in api.pull(f"127.0.0.1:{proxy.port}/big", tag="1", stream=True, decode=True):
            seen.append(item)
            if item.get("status") == "Downloading" and item["progressDetail"]["current"] > 0:
                reg.kill()
                proxy.kill_all()
        assert "error" in seen[-1], seen[-3:]
        assert not any(i.get("status") == "Pull complete" for i in seen)
        assert vicd.docker("images", "-q", f"127.0.0.1:{proxy.port}/big").stdout.strip() == ""
        assert "big" not in (store / "repositories.json").read_text()
        assert set(os.listdir(store / "blobs/sha256")) == blobs_before
        assert not [p for p in (store / "tmp/pull-cache").iterdir() if p.suffix == ".partial"]

        reg.start()  # same port, same storage: the retried pull completes
        out = vicd.docker("pull", f"{reg.host}/big:1").stdout
        assert "Downloaded newer image" in out
        assert list((store / "tmp/pull-cache").iterdir()) == []
        vicd.docker("rmi", f"{reg.host}/big:1")
    finally:
        if proxy:
            proxy.close()
        reg.stop()


def test_kill9_mid_pull_restarts_clean(guest_dir: Path, busybox_tar: Path, tmp_path: Path) -> None:
    """The daemon killed -9 while a layer downloads: after a restart no image, no partial
    file and no new blob are there, and the same pull then completes."""
    reg = Registry(tmp_path / "reg")
    reg.start()
    (tmp_path / "v").mkdir()
    d = configured_vicd(tmp_path / "v", "")
    proxy = ThrottledProxy(reg.port, rate=1 << 20)  # 8 MiB at 1 MiB/s
    try:
        oci = OCILayout(tmp_path / "oci")
        oci.tag(oci.image([tar_bytes({"big": os.urandom(8 << 20)})]), "k")
        reg.skopeo_copy(tmp_path / "oci", "k", "killed:1")
        store = d.data_root / "images"
        d.docker("import", str(busybox_tar), "busybox:latest")
        blobs_before = set(os.listdir(store / "blobs/sha256"))
        pull = subprocess.Popen([DOCKER, "pull", f"127.0.0.1:{proxy.port}/killed:1"],
                                env={**os.environ, "DOCKER_HOST": d.host},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cache = store / "tmp/pull-cache"
        deadline = time.time() + 60
        while time.time() < deadline and not any(
                p.suffix == ".partial" and p.stat().st_size > 0 for p in cache.glob("*")):
            time.sleep(0.05)
        d.kill9()
        pull.wait(30)
        assert [p for p in cache.glob("*.partial")], "the kill did not land mid-download"
        d.start("--config", str(tmp_path / "v/vicd.toml"), "--no-templates")
        assert d.docker("images", "-q", f"127.0.0.1:{proxy.port}/killed").stdout.strip() == ""
        assert "killed" not in (store / "repositories.json").read_text()
        assert set(os.listdir(store / "blobs/sha256")) == blobs_before
        assert not cache.exists() or list(cache.iterdir()) == []
        out = d.docker("pull", f"{reg.host}/killed:1").stdout
        assert f"Status: Downloaded newer image for {reg.host}/killed:1" in out
    finally:
        proxy.close()
        d.stop()
        reg.stop()


def test_broken_download_is_retried_and_resumed(vicd: Vicd, registry: Registry,  # noqa: F811
                                                tmp_path: Path) -> None:
    """A connection cut mid-blob (once, by a proxy): dockerd's countdown, then a Range request
    that the registry answers with 206, and the pull completes with the right image."""
    oci = OCILayout(tmp_path / "oci")
    oci.tag(oci.image([tar_bytes({"r.bin": os.urandom(4 << 20)})]), "r")
    registry.skopeo_copy(tmp_path / "oci", "r", "resume:1")
    manifest = json.loads(registry.manifest("resume", "1",
                                            "application/vnd.oci.image.manifest.v1+json")[0])
    layer = manifest["layers"][0]
    proxy = ThrottledProxy(registry.port, cut_after=2 << 20)
    ref = f"127.0.0.1:{proxy.port}/resume:1"
    try:
        items = list(sdk(vicd).pull(f"127.0.0.1:{proxy.port}/resume", tag="1", stream=True,
                                    decode=True))
    finally:
        proxy.close()
    statuses = [i.get("status", "") for i in items]
    assert proxy.cuts == 1
    assert statuses[-1] == f"Status: Downloaded newer image for {ref}", items[-3:]
    retry = [s for s in statuses if s.startswith("Retrying in")]
    assert retry == [f"Retrying in {n} second{'s' if n > 1 else ''}" for n in range(5, 0, -1)]
    # resumed, not restarted: the first Downloading line after the countdown starts past 1 MiB
    after = statuses.index("Retrying in 1 second")
    resumed = [i for i in items[after:] if i.get("status") == "Downloading"]
    assert resumed and resumed[0]["progressDetail"]["current"] > 1 << 20
    assert resumed[-1]["progressDetail"]["current"] == layer["size"]
    assert re.search(rb"Range: bytes=\d+-", bytes(proxy.sent))
    log = (registry.dir / "registry.log").read_text()
    assert f'"GET /v2/resume/blobs/{layer["digest"]} HTTP/1.1" 206' in log
    assert vicd.inspect(ref)["RootFS"]["Layers"] == json.loads(
        registry.blob_file(manifest["config"]["digest"]).read_bytes())["rootfs"]["diff_ids"]
    vicd.docker("rmi", ref)


# ---------------------------------------------------------------- basic auth and login


def test_login_push_pull_with_basic_auth(
    vicd: Vicd, auth_registry: Registry, docker_config: dict[str, str]  # noqa: F811
) -> None:
    host = auth_registry.host
    r = vicd.docker("login", "-u", USER, "--password-stdin", host, input=b"wrong-password\n",
                    env=docker_config, check=False)
    assert r.returncode != 0
    assert f"login attempt to http://{host}/v2/ failed with status: 401 Unauthorized" in r.stderr
    r = vicd.docker("login", "-u", USER, "--password-stdin", host,
                    input=PASSWORD.encode() + b"\n", env=docker_config)
    assert "Login Succeeded" in r.stdout

    ref = f"{host}/private:1"
    vicd.docker("tag", "busybox", ref)
    assert "Pushed" in vicd.docker("push", ref, env=docker_config).stdout
    vicd.docker("rmi", ref)
    out = vicd.docker("pull", ref, env=docker_config).stdout
    assert "Status: Downloaded newer image" in out
    vicd.docker("rmi", ref)


def test_pull_with_wrong_or_missing_credentials(
    vicd: Vicd, auth_registry: Registry, docker_config: dict[str, str], tmp_path: Path,  # noqa: F811
) -> None:
    host = auth_registry.host
    wrong = "WrongSecret-4f1a9c"
    cfg = Path(docker_config["DOCKER_CONFIG"]) / "config.json"
    cfg.write_text(json.dumps({"auths": {host: {
        "auth": base64.b64encode(f"{USER}:{wrong}".encode()).decode()}}}))
    r = vicd.docker("pull", f"{host}/private:1", env=docker_config, check=False)
    assert r.returncode != 0
    assert "unauthorized: authentication required" in r.stderr
    cfg.write_text("{}")
    r = vicd.docker("pull", f"{host}/private:1", env=docker_config, check=False)
    assert f'Get "http://{host}/v2/private/manifests/1": no basic auth credentials' in r.stderr
    log = vicd.log.read_text()
    assert wrong not in log and PASSWORD not in log


# ---------------------------------------------------------------- import from a URL


@pytest.fixture
def http_files(tmp_path: Path, busybox_tar: Path) -> Iterator[str]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "bb.tar.gz").write_bytes(gzip.compress(busybox_tar.read_bytes()))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_import_from_url(vicd: Vicd, http_files: str) -> None:
    url = f"{http_files}/bb.tar.gz"
    out = lines(vicd.docker("import", url, "fromurl:1").stdout)
    assert out[0] == f"Downloading from {url}" and out[-1].startswith("sha256:")
    info = vicd.inspect("fromurl:1")
    assert info["Comment"] == f"Imported from {url}"
    assert vicd.docker("run", "--rm", "fromurl:1", "echo", "ok").stdout.strip() == "ok"
    vicd.docker("rmi", "fromurl:1")
    r = vicd.docker("import", f"{http_files}/missing.tar", "fromurl:2", check=False)
    assert r.returncode != 0 and "failed to GET" in r.stderr and "404" in r.stderr


# ---------------------------------------------------------------- dockerd reads what vicd wrote


def test_dockerd_pulls_what_vicd_pushed(
    vicd: Vicd, registry: Registry, dockerd: RefDockerd  # noqa: F811
) -> None:
    ref = f"{registry.host}/interop:1"
    vicd.docker("tag", "busybox", ref)
    out = vicd.docker("push", ref).stdout
    digest = [x for x in lines(out) if x.startswith("1: digest:")][0].split()[2]
    out = dockerd.docker("pull", ref).stdout
    assert f"Digest: {digest}" in out
    r = dockerd.docker("run", "--rm", *RefDockerd.NET, ref, "echo", "from-vicd")
    assert r.stdout.strip() == "from-vicd"
    dockerd.docker("rmi", ref)


# ---------------------------------------------------------------- small pieces


def test_auth_header_decoding_and_repr() -> None:
    raw = json.dumps({"username": "u", "password": "hunter2", "serveraddress": "r:5000"})
    header = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
    auth = AuthConfig.from_header(header)
    assert (auth.username, auth.password, auth.serveraddress) == ("u", "hunter2", "r:5000")
    assert "hunter2" not in repr(auth) and "hunter2" not in str(auth)
    assert AuthConfig.from_header("e30=") == AuthConfig()
    assert AuthConfig.from_header("!!garbage") == AuthConfig()


def test_insecure_and_references() -> None:
    assert reg_mod.is_insecure("127.0.0.1:5000") and reg_mod.is_insecure("localhost:1")
    assert reg_mod.is_insecure("[::1]:5000") and reg_mod.is_insecure("127.8.9.1")
    assert not reg_mod.is_insecure("registry.example.com:5000")
    assert reg_mod.is_insecure("registry.example.com:5000", ["registry.example.com:5000"])
    assert reg_mod.is_insecure("10.1.2.3:5000", ["10.0.0.0/8"])
    ref = reg_mod.pull_reference("docker.io/library/busybox", "latest")
    assert str(ref) == "docker.io/library/busybox:latest"
    d = "sha256:" + "a" * 64
    assert reg_mod.pull_reference("localhost:5000/x", d).digest == d
    assert reg_mod.parse_platform("linux/arm64/v8") == ("linux", "arm64", "")
    assert progress.progress_bar(1000, 2000).startswith("[" + "=" * 25 + ">")
    assert progress.progress_bar(1000, 2000).endswith("    1kB/2kB")
    assert progress.human_size(2048) == "2.048kB"
    ch = reg_mod.parse_challenges('Bearer realm="https://a/token",service="s",scope="x:y:pull"')
    assert ch == {"bearer": {"realm": "https://a/token", "service": "s", "scope": "x:y:pull"}}
