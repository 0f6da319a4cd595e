"""`docker push`: the layers of an image from the ImageStore to a registry, the way dockerd's
push_v2.go does it, with its progress lines.

Per layer: blobs already known for this layer (from earlier pulls and pushes) are HEADed in
the target repository ("Layer already exists"), then mounted from another repository of the
same registry ("Mounted from X"); only then is the layer compressed (deterministic gzip) and
uploaded: in one PUT when small, in PATCH chunks with Content-Range when larger than the
configured chunk size ("Pushing" with progressDetail, "Pushed"). Then the config and the
schema 2 manifest, and dockerd's digest line.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from vicd.errors import NotFound
from vicd.progress import Progress, Throttle, progress_line, status
from vicd.references import Reference, parse_normalized
from vicd.registry import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    AuthConfig,
    RegistryClient,
    RegistryError,
    TransferOptions,
    push_scope,
    retry_countdown,
)

log = logging.getLogger(__name__)

GZIP_LAYERS = (DOCKER_LAYER, "application/vnd.oci.image.layer.v1.tar+gzip")
GZIP_LEVEL = 6
MAX_MOUNT_ATTEMPTS = 3  # dockerd's maxMountAttempts
MAX_UPLOAD_ATTEMPTS = 5  # dockerd's maxUploadAttempts
MAX_EXISTENCE_CHECKS = 3
READ_SIZE = 1 << 19


def schema2_manifest(config_raw: bytes, layers: list[dict[str, Any]]) -> bytes:
    """Docker manifest v2 schema 2, indented like dockerd's (json.MarshalIndent, 3 spaces)
    so the same image pushed by either gets the same digest."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": DOCKER_CONFIG, "size": len(config_raw),
                   "digest": "sha256:" + hashlib.sha256(config_raw).hexdigest()},
        "layers": [{"mediaType": DOCKER_LAYER, "size": d["size"], "digest": d["digest"]}
                   for d in layers],
    }  # fmt: skip
    return json.dumps(manifest, indent=3).encode()


def gzip_file(src: Path, dst: Path) -> tuple[str, int]:
    """Deterministic gzip (mtime 0, no name): the same layer always gets the same digest."""
    h = hashlib.sha256()

    class _Hashing:
        def __init__(self, f: Any) -> None:
            self.f = f
            self.size = 0

        def write(self, b: bytes) -> int:
            h.update(b)
            self.size += len(b)
            return self.f.write(b)

        def flush(self) -> None:
            self.f.flush()

    with open(src, "rb") as fin, open(dst, "wb") as fout:
        out = _Hashing(fout)
        # level 6 (zlib's and Go's default, as dockerd): level 9 costs 5x the time for ~1%
        gz = gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0,  # type: ignore[arg-type]
                           compresslevel=GZIP_LEVEL)
        with gz:
            shutil.copyfileobj(fin, gz, 1 << 20)
        fout.flush()
    return "sha256:" + h.hexdigest(), out.size


async def file_range(path: Path, start: int, length: int,
                     on_sent: Callable[[int], None]) -> AsyncIterator[bytes]:
    """`length` bytes of a file from `start`, as a request body; on_sent(n) per piece."""
    f = await asyncio.to_thread(open, path, "rb")
    try:
        await asyncio.to_thread(f.seek, start)
        left = length
        while left > 0:
            chunk = await asyncio.to_thread(f.read, min(READ_SIZE, left))
            if not chunk:
                raise OSError(f"{path} is shorter than expected")
            left -= len(chunk)
            on_sent(len(chunk))
            yield chunk
    finally:
        f.close()


class Pusher:
    """`docker push` of one repository (one tag, or all its tags) from an ImageStore."""

    def __init__(
        self, store: Any, repo: Reference, tags: list[str], auth: AuthConfig,
        opts: TransferOptions,
    ) -> None:  # fmt: skip
        self.store = store
        self.repo = repo
        self.tags = tags
        self.opts = opts
        self.client = RegistryClient(repo.domain, auth, list(opts.insecure_registries))

    async def __aenter__(self) -> Pusher:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.__aexit__(*exc)

    async def run(self, emit: Progress) -> list[tuple[str, str, int]]:
        """Returns [(tag, manifest digest, size)]."""
        emit(status(f"The push refers to repository [{self.repo.name}]"))
        if not self.tags:  # in the stream, after the line above, as dockerd says it
            raise NotFound("An image does not exist locally with the tag: "
                           f"{self.repo.familiar_name()}")
        await self.client.ping()
        return [await self._push_tag(tag, emit) for tag in self.tags]

    async def _push_tag(self, tag: str, emit: Progress) -> tuple[str, str, int]:
        ref = self.repo.with_tag(tag)
        path = self.repo.path
        with self.store.pinned_image(str(ref)) as (img_id, config_raw, layer_paths):
            diff_ids = list(json.loads(config_raw)["rootfs"]["diff_ids"])
            for d in reversed(diff_ids):
                emit(status("Preparing", d.split(":", 1)[-1][:12]))
            sem = asyncio.Semaphore(self.opts.max_uploads)
            tasks: dict[str, asyncio.Task[dict[str, Any]]] = {}
            for d, p in zip(diff_ids, layer_paths, strict=True):
                if d not in tasks:
                    tasks[d] = asyncio.create_task(self._push_layer(d, p, sem, emit))
            try:
                descs = [await tasks[d] for d in diff_ids]
            finally:
                for t in tasks.values():
                    t.cancel()
                await asyncio.gather(*tasks.values(), return_exceptions=True)
            cfg_digest = "sha256:" + hashlib.sha256(config_raw).hexdigest()
            if await self.client.blob_exists(path, cfg_digest, push_scope(path)) is None:
                await self.client.upload_bytes(path, cfg_digest, config_raw)
            manifest = schema2_manifest(config_raw, descs)
            digest = await self.client.put_manifest(path, tag, manifest,
                                                    json.loads(manifest)["mediaType"])
            await asyncio.to_thread(self.store.add_repo_digest, self.repo, digest, img_id)
        emit(status(f"{tag}: digest: {digest} size: {len(manifest)}"))
        emit({"progressDetail": {},
              "aux": {"Tag": tag, "Digest": digest, "Size": len(manifest)}})  # fmt: skip
        return tag, digest, len(manifest)

    async def _push_layer(
        self, diff_id: str, path: Path, sem: asyncio.Semaphore, emit: Progress
    ) -> dict[str, Any]:
        short = diff_id.split(":", 1)[-1][:12]
        if sem.locked():  # dockerd's transfer manager says so for a layer queued for a slot
            emit(status("Waiting", short))
        async with sem:
            retries = 0
            while True:  # dockerd's upload loop: 5 attempts, the same countdown as pulls
                try:
                    desc = await self._reuse(diff_id, short, emit)
                    if desc is None:
                        desc = await self._upload(path, short, emit)
                    break
                except RegistryError as e:
                    retries += 1
                    if not e.retryable or retries == MAX_UPLOAD_ATTEMPTS:
                        raise
                    log.info("upload of layer %s failed, retrying: %s", short, e.message)
                await retry_countdown(emit, short, retries)
            await asyncio.to_thread(self.store.add_blobsum, diff_id,
                                    {**desc, "mediaType": DOCKER_LAYER, "repo": self.repo.name})
            return desc

    async def _reuse(self, diff_id: str, short: str, emit: Progress) -> dict[str, Any] | None:
        """A blob the registry already has for this layer: in this repository (HEAD), or
        mounted from another repository of the same registry."""
        path = self.repo.path
        known = [k for k in reversed(self.store.blobsums(diff_id))
                 if k.get("mediaType", DOCKER_LAYER) in GZIP_LAYERS]  # fmt: skip
        digests = list(dict.fromkeys(k["digest"] for k in known))
        for digest in digests[:MAX_EXISTENCE_CHECKS]:
            size = await self.client.blob_exists(path, digest, push_scope(path))
            if size is not None:
                emit(status("Layer already exists", short))
                return {"digest": digest, "size": size}
        tried = 0
        for k in known:
            src = parse_normalized(str(k.get("repo") or "")) if k.get("repo") else None
            if src is None or src.domain != self.repo.domain or src.path == path:
                continue
            if tried == MAX_MOUNT_ATTEMPTS:
                break
            tried += 1
            url = await self.client.start_upload(path, k["digest"], src.path)
            if url is None:
                emit(status(f"Mounted from {src.path}", short))
                return {"digest": k["digest"], "size": int(k["size"])}
            await self.client.cancel_upload(path, url)
        return None

    async def _upload(self, layer: Path, short: str, emit: Progress) -> dict[str, Any]:
        path = self.repo.path
        tmp = self.store.pull_cache_dir() / f"push-{short}-{os.getpid()}-{id(self):x}.gz"
        try:
            digest, size = await asyncio.to_thread(gzip_file, layer, tmp)
            if await self.client.blob_exists(path, digest, push_scope(path)) is not None:
                emit(status("Layer already exists", short))
                return {"digest": digest, "size": size}
            throttle = Throttle()
            start = time.time()
            sent = 0

            def on_sent(n: int) -> None:
                nonlocal sent
                sent += n
                if throttle.ready(sent >= size):
                    emit(progress_line("Pushing", short, sent, size, start))

            url = await self.client.start_upload(path)
            assert url is not None
            chunk = max(self.opts.push_chunk_size, 1)
            if size <= chunk:
                await self.client.finish_upload(path, url, digest,
                                                file_range(tmp, 0, size, on_sent), size)
            else:
                for offset in range(0, size, chunk):
                    n = min(chunk, size - offset)
                    url = await self.client.patch_chunk(path, url, offset, n,
                                                        file_range(tmp, offset, n, on_sent))
                await self.client.finish_upload(path, url, digest)
            emit(status("Pushed", short))
            return {"digest": digest, "size": size}
        finally:
            tmp.unlink(missing_ok=True)
