"""Real registries for the pull/push tests: Debian's docker-registry (Distribution v2) on a
loopback port, with or without htpasswd basic auth; OCI layouts built here and copied in
with skopeo; a throttling TCP proxy so a test can kill the registry mid-download.

Use with ``from registry_fixture import registry, auth_registry  # noqa: F401``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard

from token_server import TokenServer
from vicd.testing import stop_process, tar_bytes  # noqa: F401 (tests import it from here)

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
SKOPEO = shutil.which("skopeo") or "/usr/bin/skopeo"
HTPASSWD = shutil.which("htpasswd") or "/usr/bin/htpasswd"
USER, PASSWORD = "vicduser", "s3cret-Pa55word-xyz"


def lines(out: str) -> list[str]:
    """The non-empty lines of a command's output, stripped."""
    return [x.strip() for x in out.splitlines() if x.strip()]


def free_port(addr: str = "127.0.0.1") -> int:
    s = socket.socket()
    s.bind((addr, 0))
    port = s.getsockname()[1]
    s.close()
    return port


@dataclass
class Registry:
    """One docker-registry process with its storage in `dir`."""

    dir: Path
    port: int = 0
    htpasswd: bool = False
    token: TokenServer | None = None
    addr: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"{self.addr}:{self.port}"

    @property
    def storage(self) -> Path:
        return self.dir / "storage"

    def start(self) -> None:
        self.port = self.port or free_port(self.addr)
        self.dir.mkdir(parents=True, exist_ok=True)
        auth = self.token.registry_auth_yaml() if self.token else ""
        if self.htpasswd:
            out = subprocess.run([HTPASSWD, "-Bbn", USER, PASSWORD], check=True,
                                 capture_output=True, text=True).stdout
            (self.dir / "htpasswd").write_text(out)
            auth = (f"auth:\n  htpasswd:\n    realm: vicd-test\n"
                    f"    path: {self.dir / 'htpasswd'}\n")
        (self.dir / "config.yml").write_text(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n  secret: vicd-test-secret\n" + auth
        )
        logf = open(self.dir / "registry.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(self.dir / "config.yml")],
                                     stdout=logf, stderr=logf, start_new_session=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.dir / "registry.log").read_text()[-2000:])
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1)
                return
            except urllib.error.HTTPError as e:
                if e.code == 401:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("docker-registry did not answer")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc, 10)

    def blob_file(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def skopeo_copy(self, layout: Path, ref_name: str, dest: str, *extra: str) -> None:
        cmd = [SKOPEO, "copy", "--quiet", "--dest-tls-verify=false", *extra]
        if self.htpasswd or self.token:
            cmd.append(f"--dest-creds={USER}:{PASSWORD}")
        cmd += [f"oci:{layout}:{ref_name}", f"docker://{self.host}/{dest}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise AssertionError(f"skopeo failed: {r.stderr}")

    def manifest(self, repo: str, ref: str, accept: str) -> tuple[bytes, str]:
        req = urllib.request.Request(f"http://{self.host}/v2/{repo}/manifests/{ref}",
                                     headers={"Accept": accept})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read(), r.headers.get("Docker-Content-Digest", "")


def registries_available() -> bool:
    return all(os.access(p, os.X_OK) for p in (REGISTRY_BIN, SKOPEO, HTPASSWD))


def _start(base: Path, htpasswd: bool) -> Registry:
    if not registries_available():
        pytest.skip("docker-registry, skopeo or htpasswd missing (contrib/install.sh)")
    reg = Registry(base, htpasswd=htpasswd)
    reg.start()
    return reg


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = _start(tmp_path_factory.mktemp("registry"), False)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = _start(tmp_path_factory.mktemp("authregistry"), True)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry doing token auth against a TokenServer (tests/token_server.py) that
    knows USER/PASSWORD; the server is `registry.token`."""
    base = tmp_path_factory.mktemp("tokenregistry")
    server = TokenServer(base / "token", {USER: PASSWORD})
    server.start()
    reg = Registry(base, token=server)
    try:
        reg.start()
    except BaseException:
        server.stop()
        raise
    yield reg
    reg.stop()
    server.stop()


# ---------------------------------------------------------------- OCI layouts


@dataclass
class OCILayout:
    """Writes blobs and index.json of an OCI image layout."""

    dir: Path
    index: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        (self.dir / "blobs/sha256").mkdir(parents=True, exist_ok=True)
        (self.dir / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def blob(self, data: bytes, media_type: str, **extra: object) -> dict:
        hexd = hashlib.sha256(data).hexdigest()
        (self.dir / "blobs/sha256" / hexd).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{hexd}", "size": len(data), **extra}

    def image(self, layer_tars: list[bytes], arch: str = "amd64",
              cmd: list[str] | None = None, zstd: tuple[int, ...] = ()) -> dict:
        """An OCI image manifest (gzip layers, zstd for the indexes in `zstd`); returns its
        descriptor with the platform."""
        layers, diff_ids = [], []
        for i, t in enumerate(layer_tars):
            diff_ids.append("sha256:" + hashlib.sha256(t).hexdigest())
            if i in zstd:
                layers.append(self.blob(zstandard.ZstdCompressor().compress(t),
                                        "application/vnd.oci.image.layer.v1.tar+zstd"))
            else:
                layers.append(self.blob(gzip.compress(t, mtime=0),
                                        "application/vnd.oci.image.layer.v1.tar+gzip"))
        config = {
            "created": "2024-01-02T03:04:05Z", "architecture": arch, "os": "linux",
            "config": {"Cmd": cmd or ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin:/sbin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": "2024-01-02T03:04:05Z", "created_by": f"layer {i}"}
                        for i in range(len(layer_tars))],
        }
        cfg = self.blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": cfg, "layers": layers}
        return self.blob(json.dumps(manifest).encode(), manifest["mediaType"],
                         platform={"architecture": arch, "os": "linux"})

    def tag(self, desc: dict, name: str) -> None:
        d = {k: v for k, v in desc.items() if k != "platform"}
        d["annotations"] = {"org.opencontainers.image.ref.name": name}
        self.index.append(d)
        (self.dir / "index.json").write_text(json.dumps(
            {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": self.index}))

    def multi(self, manifests: list[dict], name: str) -> dict:
        idx = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
               "manifests": manifests}
        desc = self.blob(json.dumps(idx).encode(), idx["mediaType"])
        self.tag(desc, name)
        return desc


# ---------------------------------------------------------------- a slow proxy


class ThrottledProxy:
    """Relays 127.0.0.1:port -> target at `rate` bytes/s (downstream; 0: no limit), so a
    download lasts long enough to be interrupted. kill_all() cuts every connection; with
    `cut_after`, the connection that carries the registry's cut_after-th byte (counted over
    all connections; the clients' bytes with `cut_upstream`) is cut once. `sent` holds
    everything the clients sent."""

    def __init__(self, target_port: int, rate: int = 0, cut_after: int | None = None,
                 cut_upstream: bool = False) -> None:
        self.target_port = target_port
        self.rate = rate
        self.cut_after = cut_after
        self.cut_upstream = cut_upstream  # count (and cut on) what the clients send
        self.bytes_counted = 0
        self.cuts = 0
        self.sent = bytearray()
        self.lock = threading.Lock()
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(16)
        self.port = self.srv.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                c.close()
                continue
            u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            self.conns += [c, u]
            threading.Thread(target=self._pipe, args=(c, u, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, True), daemon=True).start()

    @staticmethod
    def _pipe_close(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _pipe(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while True:
                data = src.recv(16384)
                if not data:
                    break
                with self.lock:
                    if not downstream:
                        self.sent += data
                    counted = downstream != self.cut_upstream
                    before = self.bytes_counted
                    if counted:
                        self.bytes_counted += len(data)
                    cut = (counted and self.cut_after is not None and self.cuts == 0
                           and before < self.cut_after <= self.bytes_counted)
                    if cut:
                        self.cuts += 1
                if cut:
                    dst.sendall(data[: self.cut_after - before])
                    break
                dst.sendall(data)
                if downstream and self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        self._pipe_close(src, dst)

    def kill_all(self) -> None:
        for s in list(self.conns):
            self._pipe_close(s)

    def close(self) -> None:
        self.closed = True
        self.srv.close()
        self.kill_all()
