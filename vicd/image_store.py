"""Content-addressed image store: import, load, save, tag, remove, rootfs disks.

Layout under root:
  blobs/sha256/<hex>     uncompressed layer tars (hex = diff_id) and image configs (hex = id)
  repositories.json      the only mutable state: images, references, layer sizes
  disks/<hex>.ext4       cached root disks, built from the layers on first use
  tmp/                   scratch space, wiped on start

Crash safety: blobs are written to tmp/, fsynced and renamed into place; an image becomes
visible only when repositories.json (written tmp + fsync + rename) names it. Blobs a crash
left unreferenced are deleted on the next start.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

from vicd.errors import Conflict, InvalidParameter, NotFound, VicdError
from vicd.layers import (
    CHUNK,
    LayerInfo,
    Limits,
    apply_layer,
    clean_name,
    decompressed,
    detect_compression,
    scan_layer,
)
from vicd.progress import Throttle, progress_line
from vicd.references import (
    Reference,
    familiar_match,
    parse_any,
    parse_normalized,
)

STATE_FILE = "repositories.json"
GO_ZERO_TIME = "0001-01-01T00:00:00Z"
MIB = 1 << 20
MAX_JSON_BYTES = 64 * MIB
HEX64 = re.compile(r"^[a-f0-9]{64}$")

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ANN_CONTAINERD_NAME = "io.containerd.image.name"
ANN_REF_NAME = "org.opencontainers.image.ref.name"

# Users of an image: the callable gets an image id and answers with the id of a container
# using it (str: gives dockerd's exact messages), True, or a falsy value.
InUse = Callable[[str], str | bool | None]

# Go's container.Config field order; _OMIT marks `omitempty` fields.
_OMIT = object()
_CONFIG_FIELDS: list[tuple[str, Any]] = [
    ("Hostname", ""), ("Domainname", ""), ("User", ""), ("AttachStdin", False),
    ("AttachStdout", False), ("AttachStderr", False), ("ExposedPorts", _OMIT),
    ("Tty", False), ("OpenStdin", False), ("StdinOnce", False), ("Env", None),
    ("Cmd", None), ("Healthcheck", _OMIT), ("ArgsEscaped", _OMIT), ("Image", ""),
    ("Volumes", None), ("WorkingDir", ""), ("Entrypoint", None), ("NetworkDisabled", _OMIT),
    ("MacAddress", _OMIT), ("OnBuild", None), ("Labels", None), ("StopSignal", _OMIT),
    ("StopTimeout", _OMIT), ("Shell", _OMIT),
]  # fmt: skip


# ---------------------------------------------------------------- small helpers


def full_container_config(src: dict[str, Any] | None) -> dict[str, Any]:
    """An image's config in the shape dockerd prints (every non-omitempty field present)."""
    src = src or {}
    out: dict[str, Any] = {}
    for name, default in _CONFIG_FIELDS:
        value = src.get(name, None if default is _OMIT else default)
        if default is _OMIT and not value:
            continue
        out[name] = value
    return out


def format_time(ns: int) -> str:
    """RFC3339Nano in UTC like Go: trailing zeros of the fraction dropped."""
    secs, frac = divmod(ns, 1_000_000_000)
    out = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        out += "." + f"{frac:09d}".rstrip("0")
    return out + "Z"


_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def parse_time(s: str) -> int:
    """RFC3339 (any fraction length) -> unix nanoseconds; 0 when unparsable."""
    m = _TIME_RE.match(s or "")
    if not m:
        return 0
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    base = datetime.fromisoformat(m.group(1) + tz)
    frac = (m.group(2) or "0")[:9].ljust(9, "0")
    return int(base.timestamp()) * 1_000_000_000 + int(frac)


def short_id(x: str) -> str:
    """dockerd's stringid.TruncateID."""
    return x.split(":", 1)[-1][:12]


def chain_ids(diff_ids: list[str]) -> list[str]:
    """Layer chain ids (what dockerd reports as deleted layers)."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + _sha256(f"{out[-1]} {d}".encode()))
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hex(digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or not HEX64.match(hexd):
        raise InvalidParameter(f"invalid digest {digest!r}: only sha256 is supported")
    return hexd


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _user_of(check: InUse | None, image_id: str) -> str | None:
    """Ask a container-use callback; '' means in use by an unnamed container."""
    if check is None:
        return None
    answer = check(image_id)
    if not answer:
        return None
    return short_id(answer) if isinstance(answer, str) else "(unknown)"


# ---------------------------------------------------------------- docker import --change


_VAR_RE = re.compile(
    r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::([-+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


def _lex(text: str, env: dict[str, str], split: bool) -> list[str]:
    """Dockerfile word processing: quotes, backslash escapes, $VAR/${VAR:-x} expansion."""
    words: list[str] = []
    cur: list[str] = []
    have = False
    quote = ""
    i = 0
    while i < len(text):
        c = text[i]
        if quote == "'":
            if c == "'":
                quote = ""
            else:
                cur.append(c)
        elif c == "\\" and i + 1 < len(text):
            i += 1
            cur.append(text[i])
        elif c == "$":
            m = _VAR_RE.match(text, i)
            if m:
                cur.append(_expand_var(m, env))
                i = m.end()
                have = True
                continue
            cur.append(c)
        elif quote == '"':
            if c == '"':
                quote = ""
            else:
                cur.append(c)
        elif c in "'\"":
            quote, have = c, True
        elif c.isspace() and split:
            if cur or have:
                words.append("".join(cur))
            cur, have = [], False
        else:
            cur.append(c)
        i += 1
    if quote:
        raise InvalidParameter(f"unexpected end of statement while looking for matching {quote}")
    if cur or have or not split:
        words.append("".join(cur))
    return words


def _expand_var(m: re.Match[str], env: dict[str, str]) -> str:
    name = m.group(1) or m.group(4)
    value = env.get(name)
    if m.group(2) == "-":
        return value if value else m.group(3)
    if m.group(2) == "+":
        return m.group(3) if value else ""
    return value or ""


def _json_list(rest: str) -> list[str] | None:
    """The exec (JSON array of strings) form, if rest is one."""
    stripped = rest.strip()
    if stripped.startswith("["):
        with suppress(ValueError):
            value = json.loads(stripped)
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
    return None


def _json_or_shell(rest: str) -> list[str]:
    """Exec form if it parses as one, else shell form."""
    value = _json_list(rest)
    return value if value is not None else ["/bin/sh", "-c", rest.strip()]


def _key_values(cmd: str, rest: str, env: dict[str, str]) -> list[tuple[str, str]]:
    """ENV/LABEL arguments: `k=v k2="v 2"` or the legacy `k some value`."""
    words = _lex(rest, env, split=True)
    if not words:
        raise InvalidParameter(f"{cmd} requires at least one argument")
    if "=" not in words[0]:
        parts = rest.strip().split(None, 1)
        if len(parts) < 2:
            raise InvalidParameter(f"{cmd} must have two arguments")
        return [(parts[0], _lex(parts[1], env, split=False)[0])]
    pairs: list[tuple[str, str]] = []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise InvalidParameter(
                f"Syntax error - can't find = in {word!r}. Must be of the form: name=value"
            )
        if not key:
            raise InvalidParameter(f"{cmd} names can not be blank")
        pairs.append((key, value))
    return pairs


def _expose(words: list[str]) -> dict[str, dict[str, Any]]:
    ports: dict[str, dict[str, Any]] = {}
    for word in words:
        spec, _, proto = word.partition("/")
        proto = proto.lower() or "tcp"
        lo, _, hi = spec.partition("-")
        if proto not in ("tcp", "udp", "sctp") or not lo.isdigit() or (hi and not hi.isdigit()):
            raise InvalidParameter(f"Invalid containerPort: {word}")
        first, last = int(lo), int(hi or lo)
        if not 0 < first <= last <= 65535:
            raise InvalidParameter(f"Invalid containerPort: {word}")
        for port in range(first, last + 1):
            ports[f"{port}/{proto}"] = {}
    return ports


def _change_lines(changes: list[str]) -> Iterator[tuple[str, str]]:
    for change in changes:
        for line in re.sub(r"\\[ \t]*\r?\n", "", change).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                cmd, _, rest = line.partition(" ") if " " in line else line.partition("\t")
                yield cmd.lower(), rest.strip()


def apply_changes(changes: list[str], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """`docker import --change` instructions applied to a container config (dockerd's
    BuildFromConfig subset: CMD ENTRYPOINT ENV WORKDIR USER LABEL EXPOSE VOLUME STOPSIGNAL
    ONBUILD)."""
    cfg = full_container_config(copy.deepcopy(base))
    cmd_set = False
    for cmd, rest in _change_lines(changes):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in cfg["Env"] or [])
        if cmd == "cmd":
            cfg["Cmd"], cmd_set = _json_or_shell(rest), True
        elif cmd == "entrypoint":
            cfg["Entrypoint"] = _json_or_shell(rest) if rest else None
            if not cmd_set:
                cfg["Cmd"] = None
        elif cmd == "env":
            for key, value in _key_values("ENV", rest, env):
                env[key] = value
            cfg["Env"] = [f"{k}={v}" for k, v in env.items()]
        elif cmd == "label":
            labels = dict(cfg["Labels"] or {})
            labels.update(_key_values("LABEL", rest, env))
            cfg["Labels"] = labels
        elif cmd == "workdir":
            wd = _lex(rest, env, split=False)[0]
            cfg["WorkingDir"] = os.path.normpath(os.path.join("/", cfg["WorkingDir"] or "/", wd))
        elif cmd == "user":
            cfg["User"] = _lex(rest, env, split=False)[0]
        elif cmd == "expose":
            ports = dict(cfg.get("ExposedPorts") or {})
            ports.update(_expose(_lex(rest, env, split=True)))
            cfg["ExposedPorts"] = ports
        elif cmd == "volume":
            vols = _json_list(rest)
            vols = vols if vols is not None else _lex(rest, env, split=True)
            if not vols or any(not v.strip() for v in vols):
                raise InvalidParameter("VOLUME specified can not be an empty string")
            cfg["Volumes"] = {**(cfg["Volumes"] or {}), **{v: {} for v in vols}}
        elif cmd == "stopsignal":
            cfg["StopSignal"] = _lex(rest, env, split=False)[0]
        elif cmd == "onbuild":
            cfg["OnBuild"] = [*(cfg["OnBuild"] or []), rest]
        else:
            raise InvalidParameter(f"{cmd} is not a valid change command")
    return full_container_config(cfg)


# ---------------------------------------------------------------- images


@dataclass
class Image:
    """One image as the store knows it; config is the image config JSON (OCI/docker)."""

    id: str
    config: dict[str, Any]
    repo_tags: list[str] = field(default_factory=list)
    repo_digests: list[str] = field(default_factory=list)
    size: int = 0
    created: int = 0
    last_tag_time: str = ""
    layer_sizes: list[int] = field(default_factory=list)

    @property
    def diff_ids(self) -> list[str]:
        return list((self.config.get("rootfs") or {}).get("diff_ids") or [])

    @property
    def labels(self) -> dict[str, str]:
        return dict((self.config.get("config") or {}).get("Labels") or {})

    def summary(self) -> dict[str, Any]:
        """An item of GET /images/json (dockerd 20.10 shape)."""
        dangling = not self.repo_tags and not self.repo_digests
        return {
            "Containers": -1,
            "Created": self.created,
            "Id": self.id,
            "Labels": (self.config.get("config") or {}).get("Labels"),
            "ParentId": "",
            "RepoDigests": ["<none>@<none>"] if dangling else list(self.repo_digests),
            "RepoTags": ["<none>:<none>"] if dangling else list(self.repo_tags),
            "SharedSize": -1,
            "Size": self.size,
            "VirtualSize": self.size,
        }

    def inspect(self) -> dict[str, Any]:
        """GET /images/{name}/json."""
        c = self.config
        created = c.get("created", "")
        out: dict[str, Any] = {
            "Id": self.id,
            "RepoTags": list(self.repo_tags),
            "RepoDigests": list(self.repo_digests),
            "Parent": c.get("parent", ""),
            "Comment": c.get("comment", ""),
            "Created": format_time(parse_time(created)) if parse_time(created) else created,
            "Container": c.get("container", ""),
            "ContainerConfig": full_container_config(c.get("container_config")),
            "DockerVersion": c.get("docker_version", ""),
            "Author": c.get("author", ""),
            "Config": full_container_config(c.get("config")),
            "Architecture": c.get("architecture", ""),
        }
        if c.get("variant"):
            out["Variant"] = c["variant"]
        out["Os"] = c.get("os", "")
        if c.get("os.version"):
            out["OsVersion"] = c["os.version"]
        out.update(
            {
                "Size": self.size,
                "VirtualSize": self.size,
                "GraphDriver": {"Data": {}, "Name": "vicd-ext4"},
                "RootFS": {"Type": "layers", "Layers": self.diff_ids},
                "Metadata": {"LastTagTime": self.last_tag_time or GO_ZERO_TIME},
            }
        )
        return out


IMAGE_FILTERS = ("before", "dangling", "label", "reference", "since")


def _bool_filter(key: str, values: list[str]) -> bool:
    seen = {v.lower() for v in values}
    if seen <= {"true", "1"}:
        return True
    if seen <= {"false", "0"}:
        return False
    # Go prints the []string of values: [a b]
    raise InvalidParameter(f"Invalid filter '{key}=[{' '.join(values)}]'")


def _match_labels(labels: dict[str, str], wanted: list[str]) -> bool:
    for item in wanted:
        key, sep, value = item.partition("=")
        if key not in labels or (sep and labels[key] != value):
            return False
    return True


def validate_filters(filters: dict[str, list[str]], accepted: tuple[str, ...]) -> None:
    for key in filters:
        if key not in accepted:
            raise InvalidParameter(f"Invalid filter '{key}'")


def match_filters(
    image: Image,
    filters: dict[str, list[str]],
    get: Callable[[str], Image] | ImageStore | None = None,
) -> bool:
    """GET /images/json filters. `before`/`since` name another image: pass the store (or
    any `ref -> Image` callable) to resolve it."""
    validate_filters(filters, IMAGE_FILTERS)
    if filters.get("dangling"):
        dangling = not image.repo_tags and not image.repo_digests
        if _bool_filter("dangling", filters["dangling"]) != dangling:
            return False
    if filters.get("label") and not _match_labels(image.labels, filters["label"]):
        return False
    if filters.get("reference") and not _match_reference(image, filters["reference"]):
        return False
    created = _created_ns(image)
    for ref in filters.get("before") or []:
        if not created < _created_ns(_need(get, "before")(ref)):
            return False
    for ref in filters.get("since") or []:
        if not created > _created_ns(_need(get, "since")(ref)):
            return False
    return True


def _created_ns(image: Image) -> int:
    return parse_time(image.config.get("created", "")) or image.created * 1_000_000_000


def _need(get: Callable[[str], Image] | ImageStore | None, key: str) -> Callable[[str], Image]:
    if get is None:
        raise InvalidParameter(f"filter '{key}' needs an image store to resolve the image")
    return get.get if isinstance(get, ImageStore) else get


def _match_reference(image: Image, patterns: list[str]) -> bool:
    for name in [*image.repo_tags, *image.repo_digests]:
        ref = parse_normalized(name)
        if any(familiar_match(p, ref) for p in patterns):
            return True
    return False


def _is_single_reference(refs: list[Reference]) -> bool:
    """dockerd: one tag (plus digests of that same repository) at most."""
    if len(refs) <= 1:
        return len(refs) == 1
    tagged = [r for r in refs if r.digest is None]
    if len(tagged) > 1:
        return False
    canonical = {r.name for r in refs if r.digest is not None}
    single = tagged[0] if tagged else refs[0]
    return len(canonical) == 1 and single.name in canonical


def _is_id_prefix(image_id: str, ref: str) -> bool:
    return image_id.startswith(ref) or image_id.split(":", 1)[-1].startswith(ref)


# ---------------------------------------------------------------- archives (docker load)


class _Archive:
    """A `docker save` archive unpacked as flat files: name -> staged file (links kept as
    a name map so nothing is ever created as a symlink on disk)."""

    def __init__(self, staging: Path) -> None:
        self.staging = staging
        self.files: dict[str, tuple[Path, str, int]] = {}  # name -> (path, sha256 hex, size)
        self.links: dict[str, str] = {}

    def stage(self, src: BinaryIO | IO[bytes], limits: Limits) -> None:
        plain, _ = decompressed(src)
        entries = total = 0
        try:
            with tarfile.open(fileobj=plain, mode="r|") as tf:
                for m in tf:
                    entries += 1
                    if entries > limits.max_entries:
                        raise InvalidParameter("invalid archive: too many entries")
                    name = clean_name(m.name)
                    if m.isreg():
                        total += m.size
                        if total > limits.max_bytes:
                            raise InvalidParameter("invalid archive: exceeds the size limit")
                        self._stage_file(tf, m, name)
                    elif m.issym():
                        target = m.linkname
                        base = "" if target.startswith("/") else os.path.dirname(name)
                        self.links[name] = clean_name(os.path.join(base, target.lstrip("/")))
                    elif m.islnk():
                        self.links[name] = clean_name(m.linkname)
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as e:
            raise InvalidParameter(f"invalid archive: {e}") from e

    def _stage_file(self, tf: tarfile.TarFile, m: tarfile.TarInfo, name: str) -> None:
        path = self.staging / str(len(self.files))
        h = hashlib.sha256()
        size = 0
        data = tf.extractfile(m)
        with open(path, "wb") as out:
            while data is not None and (chunk := data.read(CHUNK)):
                h.update(chunk)
                size += len(chunk)
                out.write(chunk)
        self.files[name] = (path, h.hexdigest(), size)

    def resolve(self, name: str) -> tuple[Path, str, int]:
        name = clean_name(name)
        for _ in range(40):
            if name in self.files:
                return self.files[name]
            if name not in self.links:
                break
            name = self.links[name]
        raise InvalidParameter(f"invalid archive: {name} is missing")

    def has(self, name: str) -> bool:
        return name in self.files or name in self.links

    def read(self, name: str) -> bytes:
        path, _, size = self.resolve(name)
        if size > MAX_JSON_BYTES:
            raise InvalidParameter(f"invalid archive: {name} is too large")
        return path.read_bytes()

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        except ValueError as e:
            raise InvalidParameter(f"invalid archive: {name} is not valid JSON: {e}") from e

    def blob_json(self, desc: dict[str, Any]) -> dict[str, Any]:
        path, _, size = self.blob(desc)
        if size > MAX_JSON_BYTES:
            raise InvalidParameter(f"invalid archive: blob {desc['digest']} is too large")
        try:
            value = json.loads(path.read_bytes())
        except ValueError as e:
            raise InvalidParameter(f"invalid archive: blob {desc['digest']}: {e}") from e
        if not isinstance(value, dict):
            raise InvalidParameter(f"invalid archive: blob {desc['digest']} is not an object")
        return value

    def blob(self, desc: dict[str, Any]) -> tuple[Path, str, int]:
        """An OCI blob, checked against its descriptor's digest and size."""
        if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str):
            raise InvalidParameter("invalid archive: descriptor without digest")
        hexd = _hex(desc["digest"])
        entry = self.resolve(f"blobs/sha256/{hexd}")
        if entry[1] != hexd:
            raise InvalidParameter(f"invalid archive: digest mismatch for blob {desc['digest']}")
        if isinstance(desc.get("size"), int) and desc["size"] != entry[2]:
            raise InvalidParameter(f"invalid archive: size mismatch for blob {desc['digest']}")
        return entry


@dataclass
class _LoadItem:
    """One image found in an archive, ready to be ingested."""

    config_raw: bytes
    layers: list[Path]
    tags: list[Reference]


# ---------------------------------------------------------------- the store


class ImageStore:
    """The image store. Thread-safe; every method is synchronous (run it in a thread)."""

    def __init__(self, root: Path, limits: Limits | None = None) -> None:
        self.root = Path(root)
        self.limits = limits or Limits()
        self.blobs = self.root / "blobs" / "sha256"
        self.disks = self.root / "disks"
        self.tmp = self.root / "tmp"
        self._lock = threading.RLock()
        self._pins: Counter[str] = Counter()  # blob hexes in use by running operations
        self._build_locks: dict[str, threading.Lock] = {}
        self._configs: dict[str, dict[str, Any]] = {}
        shutil.rmtree(self.tmp, ignore_errors=True)
        for d in (self.blobs, self.disks, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._state = self._read_state()
        self._collect_garbage(full=True)

    # ---- state

    def _read_state(self) -> dict[str, Any]:
        path = self.root / STATE_FILE
        state: dict[str, Any] = {"images": {}, "refs": {}, "layers": {}}
        if path.exists():
            try:
                state.update(json.loads(path.read_text()))
            except ValueError as e:
                raise VicdError(f"corrupt image state {path}: {e}") from e
        return state

    def _save_state(self) -> None:
        """Atomically replace repositories.json; blobs it names are already durable."""
        _fsync_dir(self.blobs)
        path = self.root / STATE_FILE
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".repositories.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(self._state, indent=1, sort_keys=True).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.root)

    def _referenced_blobs(self) -> set[str]:
        used = set(self._pins)
        for img_id in self._state["images"]:
            used.add(_hex(img_id))
            used.update(_hex(d) for d in self._diff_ids(img_id))
        return used

    def _collect_garbage(self, full: bool = False, candidates: set[str] | None = None) -> None:
        """Delete blobs, layer records and disks nothing references any more."""
        with self._lock:
            used = self._referenced_blobs()
            names = {p.name for p in self.blobs.iterdir()} if full else set(candidates or ())
            for hexd in names - used:
                with suppress(FileNotFoundError):
                    (self.blobs / hexd).unlink()
            for diff in list(self._state["layers"]):
                if _hex(diff) not in used:
                    del self._state["layers"][diff]
            images = {_hex(i) for i in self._state["images"]}
            for img_id in [i for i in self._configs if i not in self._state["images"]]:
                del self._configs[img_id]
            disk_names = (
                [p.name for p in self.disks.iterdir()] if full else [f"{h}.ext4" for h in names]
            )
            for name in disk_names:
                if name.removesuffix(".ext4") not in images:
                    with suppress(FileNotFoundError):
                        (self.disks / name).unlink()

    @contextmanager
    def _pinned(self) -> Iterator[set[str]]:
        """Blob hexes added to the yielded set survive garbage collection until exit."""
        pins = _PinSet(self)
        try:
            yield pins
        except BaseException:
            self._unpin(set(pins))
            self._collect_garbage(candidates=set(pins))  # what a failed operation left
            raise
        self._unpin(set(pins))

    def _unpin(self, pins: set[str]) -> None:
        with self._lock:
            self._pins.subtract(pins)
            self._pins += Counter()  # drop zero counts

    # ---- blobs

    def _blob_path(self, digest_or_hex: str) -> Path:
        hexd = digest_or_hex.split(":", 1)[-1]
        return self.blobs / hexd

    def _commit_blob(self, tmp: Path, hexd: str) -> None:
        dst = self.blobs / hexd
        if dst.exists():
            tmp.unlink()
        else:
            os.replace(tmp, dst)

    def _put_bytes(self, data: bytes, pins: set[str]) -> str:
        hexd = _sha256(data)
        pins.add(hexd)
        if not (self.blobs / hexd).exists():
            fd, tmp = tempfile.mkstemp(dir=self.tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._commit_blob(Path(tmp), hexd)
        return hexd

    def _put_layer(self, src: BinaryIO | IO[bytes] | Path, pins: set[str]) -> LayerInfo:
        """Store a layer uncompressed under its diff_id; validate it on the way."""
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                info = scan_layer(src, copy_to=out, limits=self.limits)
                out.flush()
                os.fsync(out.fileno())
            hexd = _hex(info.diff_id)
            pins.add(hexd)
            self._commit_blob(tmp, hexd)
        finally:
            with suppress(FileNotFoundError):
                tmp.unlink()
        return info

    def _put_staged_layer(
        self, path: Path, pins: set[str], on_read: Callable[[int, int, int, bool], None] | None
    ) -> LayerInfo:
        """A staged archive file: moved in place when already uncompressed (no copy).
        on_read(0, bytes read, file size, False) reports progress."""
        total = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(6)
            f.seek(0)
            reader = _ProgressReader(f, total, 0, on_read)
            if detect_compression(head) != "none":
                return self._put_layer(reader, pins)  # type: ignore[arg-type]
            info = scan_layer(reader, limits=self.limits)  # type: ignore[arg-type]
        hexd = _hex(info.diff_id)
        pins.add(hexd)
        if not (self.blobs / hexd).exists():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            self._commit_blob(path, hexd)  # staging lives under root: a plain rename
        return info

    # ---- lookups (call with the lock held)

    def _config(self, img_id: str) -> dict[str, Any]:
        if img_id not in self._configs:
            self._configs[img_id] = json.loads(self._blob_path(img_id).read_bytes())
        return self._configs[img_id]

    def _diff_ids(self, img_id: str) -> list[str]:
        return list((self._config(img_id).get("rootfs") or {}).get("diff_ids") or [])

    def _refs_of(self, img_id: str) -> list[Reference]:
        refs = [parse_normalized(k) for k, v in self._state["refs"].items() if v == img_id]
        return sorted(refs, key=lambda r: r.familiar())

    def _image(self, img_id: str) -> Image:
        config = copy.deepcopy(self._config(img_id))
        refs = self._refs_of(img_id)
        sizes = [self._state["layers"].get(d, {}).get("size", 0) for d in self._diff_ids(img_id)]
        return Image(
            id=img_id,
            config=config,
            repo_tags=[r.familiar() for r in refs if r.digest is None],
            repo_digests=[r.familiar() for r in refs if r.digest is not None],
            size=sum(sizes),
            created=parse_time(config.get("created", "")) // 1_000_000_000,
            last_tag_time=self._state["images"][img_id].get("last_tag_time", ""),
            layer_sizes=sizes,
        )

    @staticmethod
    def _ref_key(ref: Reference) -> str:
        ref = ref.with_default_tag()
        if ref.digest is not None and ref.tag is not None:
            ref = Reference(ref.domain, ref.path, None, ref.digest)
        return str(ref)

    def _search(self, term: str) -> str | None:
        """Unique image id with this (hex or sha256:hex) prefix."""
        prefix = term.removeprefix("sha256:")
        if not prefix or not re.fullmatch(r"[a-f0-9]+", prefix):
            return None
        found = [i for i in self._state["images"] if i[7:].startswith(prefix)]
        return found[0] if len(found) == 1 else None

    def _resolve(self, ref: str) -> str:
        parsed = parse_any(ref)
        if isinstance(parsed, str):
            if parsed in self._state["images"]:
                return parsed
            raise NotFound(f"No such image: {parsed}")
        img_id = self._state["refs"].get(self._ref_key(parsed))
        if img_id in self._state["images"]:
            return img_id
        found = self._search(ref)
        if found:
            return found
        raise NotFound(f"No such image: {parsed.with_default_tag().familiar()}")

    def _set_ref(self, ref: Reference, img_id: str) -> None:
        self._state["refs"][self._ref_key(ref)] = img_id
        self._state["images"][img_id]["last_tag_time"] = format_time(time.time_ns())

    def _add_image(self, img_id: str, layers: list[LayerInfo]) -> None:
        for info in layers:
            self._state["layers"][info.diff_id] = {"size": info.size, "tar_size": info.tar_size}
        self._state["images"].setdefault(img_id, {"last_tag_time": ""})

    # ---- public API

    def get(self, ref: str) -> Image:
        """By name[:tag], name@digest, full id, hex id or unique id prefix."""
        with self._lock:
            return self._image(self._resolve(ref))

    def list(self, filters: dict[str, list[str]] | None = None) -> list[Image]:
        """All images, newest first; with filters, as GET /images/json would list them."""
        with self._lock:
            images = [self._image(i) for i in self._state["images"]]
        images.sort(key=lambda i: (_created_ns(i), i.id), reverse=True)
        if not filters:
            return images
        validate_filters(filters, IMAGE_FILTERS)
        out = [i for i in images if match_filters(i, filters, self.get)]
        for img in out if filters.get("reference") else []:
            pats = filters["reference"]
            keep = [r for r in img.repo_tags + img.repo_digests
                    if any(familiar_match(p, parse_normalized(r)) for p in pats)]  # fmt: skip
            img.repo_tags = [r for r in img.repo_tags if r in keep]
            img.repo_digests = [r for r in img.repo_digests if r in keep]
        return out

    def import_tar(
        self,
        src: BinaryIO | IO[bytes] | Path,
        repo_tag: str | None,
        changes: list[str],
        message: str = "",
    ) -> Image:
        """`docker import`: the (possibly compressed) tar becomes a one-layer image."""
        ref = self._import_ref(repo_tag)
        cfg = apply_changes(changes)  # validate before reading a byte
        comment = message or "Imported from -"
        with self._pinned() as pins:
            info = self._put_layer(src, pins)
            created = format_time(time.time_ns())
            config = {
                "architecture": "amd64",
                "comment": comment,
                "config": cfg,
                "container_config": full_container_config(None),
                "created": created,
                "history": [{"created": created, "comment": comment}],
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [info.diff_id]},
            }
            img_id = "sha256:" + self._put_bytes(_canonical(config), pins)
            with self._lock:
                self._add_image(img_id, [info])
                if ref is not None:
                    self._set_ref(ref, img_id)
                self._save_state()
                return self._image(img_id)

    @staticmethod
    def _import_ref(repo_tag: str | None) -> Reference | None:
        if not repo_tag:
            return None
        ref = parse_normalized(repo_tag)
        if ref.digest is not None:
            raise InvalidParameter("cannot import digest reference")
        return ref.with_default_tag()

    def tag(self, ref: str, repo: str, tag: str = "") -> str:
        """Point repo[:tag] at the image; returns the familiar new reference."""
        with self._lock:
            img_id = self._resolve(ref)
            named = parse_normalized(repo)
            if tag:
                named = named.with_tag(tag)
            if named.digest is not None:
                raise InvalidParameter("refusing to create a tag with a digest reference")
            if named.familiar_name() == "sha256":
                raise InvalidParameter(
                    "refusing to create an ambiguous tag using digest algorithm as name"
                )
            named = named.with_default_tag()
            self._set_ref(named, img_id)
            self._save_state()
            return named.familiar()

    def remove(
        self,
        ref: str,
        force: bool = False,
        in_use: InUse | None = None,
        running: InUse | None = None,
    ) -> list[dict[str, str]]:
        """`docker rmi` (dockerd's ImageDelete). in_use: any container uses the image (soft
        conflict, `force` overrides); running: a running container does (hard conflict).
        The callbacks run under the store lock: they must not call back into the store."""
        with self._lock:
            img_id = self._resolve(ref)
            before = set(self._state["images"])
            records: list[dict[str, str]] = []
            try:
                done = self._untag_for_remove(ref, img_id, force, in_use, running, records)
                if not done:
                    self._delete(img_id, records, force, done is None, in_use, running)
            finally:
                if records:
                    self._save_state()
            self._collect_garbage(candidates=self._blobs_of(before - set(self._state["images"])))
            return records

    def _blobs_of(self, removed: set[str]) -> set[str]:
        out: set[str] = set()
        for img_id in removed:
            out.add(_hex(img_id))
            out.update(_hex(d) for d in self._diff_ids(img_id))
        return out

    def _untag_for_remove(
        self,
        ref: str,
        img_id: str,
        force: bool,
        in_use: InUse | None,
        running: InUse | None,
        records: list[dict[str, str]],
    ) -> bool | None:
        """The reference half of ImageDelete. True: finished (only untagged); None: the
        last reference went, delete quietly; False: delete normally."""
        refs = self._refs_of(img_id)
        if _is_id_prefix(img_id, ref):
            if _is_single_reference(refs):
                conflict = self._conflict(img_id, force, in_use, running, active=False)
                if conflict:
                    raise Conflict(conflict[0])
                for r in refs:
                    self._untag(r, records)
            return False
        if not force and _is_single_reference(refs):
            user = _user_of(in_use, img_id)
            if user is not None:
                raise Conflict(
                    f'conflict: unable to remove repository reference "{ref}" (must force) - '
                    f"container {user} is using its referenced image {short_id(img_id)}"
                )
        parsed = parse_normalized(ref).with_default_tag()
        self._untag(parsed, records)
        refs = self._refs_of(img_id)
        if parsed.digest is None and not any(
            r.digest is None and r.name == parsed.name for r in refs
        ):
            for r in [r for r in refs if r.digest is not None and r.name == parsed.name]:
                self._untag(r, records)
                refs.remove(r)
        return True if refs else None

    def _untag(self, ref: Reference, records: list[dict[str, str]]) -> None:
        key = self._ref_key(ref)
        if key not in self._state["refs"]:
            raise NotFound(f"No such image: {ref.familiar()}")
        del self._state["refs"][key]
        records.append({"Untagged": ref.with_default_tag().familiar()})

    def _conflict(
        self,
        img_id: str,
        force: bool,
        in_use: InUse | None,
        running: InUse | None,
        active: bool,
    ) -> tuple[str, bool] | None:
        """dockerd's checkImageDeleteConflict: (message, used) or None."""
        short = short_id(img_id)
        user = _user_of(running, img_id)
        if user is not None:
            return (f"conflict: unable to delete {short} (cannot be forced) - image is being "
                    f"used by running container {user}", True)  # fmt: skip
        if force:
            return None
        if active and self._refs_of(img_id):
            return (f"conflict: unable to delete {short} (must be forced) - image is "
                    "referenced in multiple repositories", False)  # fmt: skip
        user = _user_of(in_use, img_id)
        if user is not None:
            return (f"conflict: unable to delete {short} (must be forced) - image is being "
                    f"used by stopped container {user}", True)  # fmt: skip
        return None

    def _delete(
        self,
        img_id: str,
        records: list[dict[str, str]],
        force: bool,
        quiet: bool,
        in_use: InUse | None,
        running: InUse | None,
    ) -> None:
        """dockerd's imageDeleteHelper."""
        conflict = self._conflict(img_id, force, in_use, running, active=True)
        if conflict:
            dangling = not self._refs_of(img_id)
            if quiet and (not dangling or conflict[1]):
                return
            raise Conflict(conflict[0])
        for r in self._refs_of(img_id):
            self._untag(r, records)
        chains = chain_ids(self._diff_ids(img_id))
        del self._state["images"][img_id]
        records.append({"Deleted": img_id})
        still = {c for i in self._state["images"] for c in chain_ids(self._diff_ids(i))}
        records.extend({"Deleted": c} for c in reversed(chains) if c not in still)

    def prune(
        self,
        dangling_only: bool = True,
        in_use: InUse | None = None,
        filters: dict[str, list[str]] | None = None,
    ) -> dict[str, Any]:
        """POST /images/prune: {"ImagesDeleted": [...] or None, "SpaceReclaimed": n}.
        filters: dangling, label, label!, until (unix seconds or RFC3339)."""
        filters = filters or {}
        validate_filters(filters, ("dangling", "label", "label!", "until"))
        if filters.get("dangling"):
            dangling_only = _bool_filter("dangling", filters["dangling"])
        until = max((_parse_until(v) for v in filters.get("until") or []), default=None)
        deleted: list[dict[str, str]] = []
        sizes: dict[str, int] = {}
        for img in self.list():
            if until is not None and img.created * 1_000_000_000 > until:
                continue
            if filters.get("label") and not _match_labels(img.labels, filters["label"]):
                continue
            if filters.get("label!") and _any_label(img.labels, filters["label!"]):
                continue
            if dangling_only and img.repo_tags:
                continue
            sizes.update(zip(chain_ids(img.diff_ids), img.layer_sizes, strict=False))
            names = img.repo_tags + img.repo_digests or [img.id]
            for name in names:
                try:
                    deleted += self.remove(name, False, in_use)
                except (Conflict, NotFound):
                    continue
        space = sum(sizes.get(d["Deleted"], 0) for d in deleted if "Deleted" in d)
        return {"ImagesDeleted": deleted or None, "SpaceReclaimed": space}

    def history(self, ref: str) -> list[dict[str, Any]]:
        """GET /images/{name}/history, newest first."""
        img = self.get(ref)
        items: list[dict[str, Any]] = []
        layer = 0
        for h in img.config.get("history") or []:
            size = 0
            if not h.get("empty_layer"):
                if layer >= len(img.layer_sizes):
                    raise VicdError("too many non-empty layers in History section")
                size, layer = img.layer_sizes[layer], layer + 1
            items.insert(0, {
                "Id": "<missing>",
                "Created": parse_time(h.get("created", "")) // 1_000_000_000,
                "CreatedBy": h.get("created_by", ""),
                "Tags": None,
                "Size": size,
                "Comment": h.get("comment", ""),
            })  # fmt: skip
        if items:
            items[0]["Id"] = img.id
            items[0]["Tags"] = list(img.repo_tags) or None
        return items

    # ---- docker load

    def load(
        self,
        src: BinaryIO | IO[bytes] | Path,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> list[str]:
        """`docker load` of a classic or OCI `docker save` archive (compressed or not).
        All-or-nothing: the images appear together once everything is verified."""
        staging = Path(tempfile.mkdtemp(dir=self.tmp, prefix="load-"))
        try:
            archive = _Archive(staging)
            if isinstance(src, Path | str):
                with open(src, "rb") as f:
                    archive.stage(f, self.limits)
            else:
                archive.stage(src, self.limits)
            if archive.has("manifest.json"):
                items = _classic_items(archive)
            elif archive.has("index.json"):
                items = _oci_items(archive)
            else:
                raise InvalidParameter(
                    "invalid archive: neither manifest.json nor index.json found "
                    "(not a docker save archive?)"
                )
            return self._ingest(items, progress)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _ingest(
        self, items: list[_LoadItem], progress: Callable[[dict[str, Any]], None] | None
    ) -> list[str]:
        done: dict[Path, LayerInfo] = {}
        loaded: list[tuple[str, list[Reference], list[LayerInfo]]] = []
        with self._pinned() as pins:
            for item in items:
                config = _check_config(item.config_raw, len(item.layers))
                infos: list[LayerInfo] = []
                for i, (path, want) in enumerate(
                    zip(item.layers, config["rootfs"]["diff_ids"], strict=True)
                ):
                    if path not in done and self.has_layer(want):
                        # like dockerd: a layer it has is not read again, and not shown
                        with contextlib.suppress(VicdError):
                            done[path] = self._pin_existing_layer(want, pins)
                    if path not in done:
                        size = path.stat().st_size  # (the file is moved into the store)
                        done[path] = self._put_staged_layer(path, pins,
                                                            _load_reporter(want, progress))
                        if progress is not None:
                            progress(progress_line("Loading layer", short_id(want), size, size))
                    got = done[path].diff_id
                    if got != want:
                        raise InvalidParameter(
                            f'invalid diffID for layer {i}: expected "{want}", got "{got}"'
                        )
                    infos.append(done[path])
                img_id = "sha256:" + self._put_bytes(item.config_raw, pins)
                loaded.append((img_id, item.tags, infos))
            return self._commit_loaded(loaded)

    def _commit_loaded(
        self, loaded: list[tuple[str, list[Reference], list[LayerInfo]]]
    ) -> list[str]:
        lines: list[str] = []
        with self._lock:
            for img_id, tags, infos in loaded:
                self._add_image(img_id, infos)
                for ref in tags:
                    prev = self._state["refs"].get(self._ref_key(ref))
                    if prev is not None and prev != img_id:
                        lines.append(
                            f"The image {ref.familiar()} already exists, renaming the old one "
                            f"with ID {prev} to empty string"
                        )
                    self._set_ref(ref, img_id)
                    lines.append(f"Loaded image: {ref.familiar()}")
                if not tags:
                    lines.append(f"Loaded image ID: {img_id}")
            self._save_state()
        return lines

    # ---- docker save

    def save(self, refs: list[str], dst: BinaryIO | IO[bytes], oci: bool = False) -> None:
        """`docker save`: dockerd 20.10's classic layout; with oci=True Docker 25's layout
        (OCI index.json + blobs, plus a manifest.json pointing into blobs/)."""
        with self._lock:
            wanted = self._save_set(refs)
            configs = {i: self._blob_path(i).read_bytes() for i in wanted}
            created = {i: self._image(i).created for i in wanted}
            pin = self._blobs_of(set(wanted))
            self._pins.update(pin)
        try:
            writer = _SaveWriter(self.blobs, dst)
            for img_id, tags in wanted.items():
                add = writer.add_oci if oci else writer.add_classic
                add(img_id, configs[img_id], tags, created[img_id])
            writer.finish(oci)
        finally:
            self._unpin(pin)

    def _save_set(self, names: list[str]) -> dict[str, list[Reference]]:
        """dockerd's tarexport parseNames: image id -> tags to record."""
        out: dict[str, list[Reference]] = {}

        def add(img_id: str, ref: Reference | None) -> None:
            tags = out.setdefault(img_id, [])
            if ref is not None and ref.tag is not None and ref.digest is None and ref not in tags:
                tags.append(ref)

        for name in names:
            parsed = parse_any(name)
            if isinstance(parsed, str):
                add(self._resolve(parsed), None)
            elif parsed.familiar_name() == "sha256" or (
                parsed.tag is None and parsed.digest is None
            ):
                by_id = parsed.familiar_name() == "sha256"  # `sha256:<prefix>` is an id
                assocs = [
                    (k, v) for k, v in self._state["refs"].items()
                    if not by_id and parse_normalized(k).name == parsed.name
                ]  # fmt: skip
                for key, img_id in assocs:
                    add(img_id, parse_normalized(key))
                if not assocs:
                    found = self._search(name)
                    if found is None:
                        raise NotFound(f"No such image: {name}")
                    add(found, None)
            else:
                img_id = self._state["refs"].get(self._ref_key(parsed))
                if img_id is None:
                    raise NotFound("reference does not exist")
                add(img_id, parsed)
        return out

    # ---- registries (pull / push)

    def has_image(self, image_id: str) -> bool:
        with self._lock:
            return image_id in self._state["images"]

    def has_layer(self, diff_id: str) -> bool:
        """A layer with this diff_id is stored (a pull can skip downloading it)."""
        with self._lock:
            try:
                hexd = _hex(diff_id)
            except InvalidParameter:
                return False
            return diff_id in self._state["layers"] and (self.blobs / hexd).exists()

    def pull_cache_dir(self) -> Path:
        """Where pulls keep verified compressed blobs until their image is committed (under
        tmp/: wiped on start, so a retried pull after a restart begins afresh)."""
        d = self.tmp / "pull-cache"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def add_pulled_image(
        self,
        config_raw: bytes,
        layers: list[Path | None | Callable[[], Path | None]],
        refs: list[Reference],
        blobsums: list[tuple[str, dict[str, Any]]] | None = None,
        progress: Callable[[int, int, int, bool], None] | None = None,
    ) -> tuple[Image, bool]:
        """Commit a pulled image: layers[i] is the downloaded (possibly compressed) blob of
        layer i, None when that layer is already stored, or a callable giving either (it
        may block until the download is done, so extraction overlaps downloading). Layers
        are stored uncompressed and checked against the config's diff_ids; the image and
        its refs (tag and repo digest) appear in one atomic state write, or not at all.
        progress(i, current, total, done) reports extraction. Returns (image, changed)."""
        config = _check_config(config_raw, len(layers))
        diff_ids: list[str] = config["rootfs"]["diff_ids"]
        with self._pinned() as pins:
            infos: list[LayerInfo] = []
            for i, (src, want) in enumerate(zip(layers, diff_ids, strict=True)):
                path = src() if callable(src) else src
                if path is None:
                    infos.append(self._pin_existing_layer(want, pins))
                    continue
                total = path.stat().st_size
                with open(path, "rb") as f:
                    reader = _ProgressReader(f, total, i, progress)
                    info = self._put_layer(reader, pins)  # type: ignore[arg-type]
                if info.diff_id != want:
                    raise InvalidParameter(
                        "layers from manifest don't match image configuration: "
                        f'layer {i} is "{info.diff_id}", config says "{want}"'
                    )
                infos.append(info)
                if progress is not None:
                    progress(i, total, total, True)
            img_id = "sha256:" + self._put_bytes(config_raw, pins)
            with self._lock:
                changed = img_id not in self._state["images"]
                self._add_image(img_id, infos)
                for ref in refs:
                    if self._state["refs"].get(self._ref_key(ref)) != img_id:
                        changed = True
                        self._set_ref(ref, img_id)
                for diff, desc in blobsums or []:
                    self._remember_blobsum(diff, desc)
                self._save_state()
                return self._image(img_id), changed

    def _pin_existing_layer(self, diff_id: str, pins: set[str]) -> LayerInfo:
        hexd = _hex(diff_id)
        with self._lock:
            record = self._state["layers"].get(diff_id)
            pins.add(hexd)
            if record is None or not (self.blobs / hexd).exists():
                raise VicdError(f"layer {diff_id} vanished from the store; retry the pull")
            return LayerInfo(diff_id=diff_id, tar_size=record.get("tar_size", 0),
                             size=record.get("size", 0))  # fmt: skip

    def _remember_blobsum(self, diff_id: str, desc: dict[str, Any]) -> None:
        if not isinstance(desc.get("digest"), str):
            return
        known = self._state.setdefault("blobsums", {}).setdefault(diff_id, [])
        known[:] = [d for d in known if d.get("digest") != desc["digest"]][-7:] + [dict(desc)]

    def blobsums(self, diff_id: str) -> list[dict[str, Any]]:
        """Compressed blobs known to hold this layer ({digest, size, mediaType, repo}),
        newest last: a push HEADs them before compressing anything."""
        with self._lock:
            return copy.deepcopy(self._state.get("blobsums", {}).get(diff_id, []))

    def add_blobsum(self, diff_id: str, desc: dict[str, Any]) -> None:
        with self._lock:
            self._remember_blobsum(diff_id, desc)
            self._save_state()

    def add_repo_digest(self, repo: Reference, digest: str, image_id: str) -> None:
        """Record `repo@digest` for an image (after a push, as dockerd does)."""
        ref = Reference(repo.domain, repo.path, None, digest)
        with self._lock:
            if image_id not in self._state["images"]:
                raise NotFound(f"No such image: {image_id}")
            if self._state["refs"].get(self._ref_key(ref)) != image_id:
                self._set_ref(ref, image_id)
                self._save_state()

    def repository_tags(self, repo: Reference) -> list[str]:
        """Tags of one repository (docker push without a tag pushes them all)."""
        with self._lock:
            out = []
            for key, img_id in self._state["refs"].items():
                ref = parse_normalized(key)
                if ref.name == repo.name and ref.tag is not None and img_id in self._state[
                    "images"
                ]:
                    out.append(ref.tag)
            return sorted(out)

    @contextmanager
    def pinned_image(self, ref: str) -> Iterator[tuple[str, bytes, list[Path]]]:
        """(image id, config bytes, uncompressed layer paths) of an image, its blobs kept
        safe from removal until the block ends (for push)."""
        with self._lock:
            img_id = self._resolve(ref)
            raw = self._blob_path(img_id).read_bytes()
            diff_ids = self._diff_ids(img_id)
            pin = self._blobs_of({img_id})
            self._pins.update(pin)
        try:
            yield img_id, raw, [self._blob_path(d) for d in diff_ids]
        finally:
            self._unpin(pin)

    # ---- root disks

    def rootfs_disk(self, image_id: str, size_bytes: int) -> Path:
        """The image's ext4 root disk (sparse), built once and cached; rebuilt only when a
        larger size than the cached one is asked for. Callers must copy it per container."""
        with self._lock:
            img_id = self._resolve(image_id)
            diff_ids = self._diff_ids(img_id)
            lock = self._build_locks.setdefault(img_id, threading.Lock())
            pin = self._blobs_of({img_id})
            self._pins.update(pin)
        try:
            with lock:
                disk = self.disks / f"{_hex(img_id)}.ext4"
                if disk.exists() and disk.stat().st_size >= size_bytes:
                    return disk
                self._build_disk(diff_ids, disk, size_bytes)
                return disk
        finally:
            self._unpin(pin)

    def _build_disk(self, diff_ids: list[str], disk: Path, size_bytes: int) -> None:
        work = Path(tempfile.mkdtemp(dir=self.tmp, prefix="rootfs-"))
        try:
            tree = work / "rootfs"
            tree.mkdir(mode=0o755)
            for diff in diff_ids:
                apply_layer(self._blob_path(diff), tree, self.limits)
            size = max(size_bytes, int(_disk_usage(tree) * 1.3) + 64 * MIB)
            size = (size + 4095) // 4096 * 4096
            image = work / "disk.ext4"
            with open(image, "wb") as f:
                f.truncate(size)
            cmd = ["mke2fs", "-q", "-t", "ext4", "-F", "-E",
                   "lazy_itable_init=1,lazy_journal_init=1", "-d", str(tree), str(image),
                   f"{size // 1024}k"]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise VicdError(f"mke2fs failed: {proc.stderr.strip() or proc.stdout.strip()}")
            with open(image, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(image, disk)
            _fsync_dir(self.disks)
        finally:
            shutil.rmtree(work, ignore_errors=True)


class _ProgressReader:
    """A file wrapper reporting how far a layer has been read (for Extracting lines)."""

    def __init__(
        self,
        f: IO[bytes],
        total: int,
        index: int,
        progress: Callable[[int, int, int, bool], None] | None,
    ) -> None:
        self._f = f
        self._total = total
        self._index = index
        self._progress = progress
        self._done = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._done += len(data)
        if self._progress is not None and data:
            self._progress(self._index, self._done, self._total, False)
        return data


class _PinSet(set[str]):
    """A set whose additions pin blobs in the store until the operation ends."""

    def __init__(self, store: ImageStore) -> None:
        super().__init__()
        self._store = store

    def add(self, hexd: str) -> None:  # type: ignore[override]
        if hexd in self:
            return
        super().add(hexd)
        with self._store._lock:
            self._store._pins[hexd] += 1


def _disk_usage(tree: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _any_label(labels: dict[str, str], wanted: list[str]) -> bool:
    return any(_match_labels(labels, [w]) for w in wanted)


def _parse_until(value: str) -> int:
    """Prune `until`: unix seconds (fractional ok), RFC3339, or a Go duration ago (24h)."""
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return int(float(value) * 1_000_000_000)
    if ns := parse_time(value):
        return ns
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(h|m|s)", value)
    if m:
        unit = {"h": 3600, "m": 60, "s": 1}[m.group(2)]
        return time.time_ns() - int(float(m.group(1)) * unit * 1_000_000_000)
    raise InvalidParameter(f"invalid until filter value {value!r}")


def _load_reporter(
    diff_id: str, progress: Callable[[dict[str, Any]], None] | None
) -> Callable[[int, int, int, bool], None] | None:
    """`Loading layer` lines while a layer is read, at most one per PROGRESS_EVERY (the
    final one comes from the caller once the layer is verified), as dockerd sends them."""
    if progress is None:
        return None
    throttle = Throttle()
    last = 0

    def report(_i: int, current: int, total: int, _final: bool) -> None:
        # dockerd's progress.Reader: every 1% of the size (512 kB at most), rate-limited
        nonlocal last
        if current - last > min(total // 100, 512 << 10) and current < total and \
                throttle.ready():
            last = current
            progress(progress_line("Loading layer", short_id(diff_id), current, total))
    return report


def _check_config(raw: bytes, n_layers: int) -> dict[str, Any]:
    """The parts of an image config we rely on, checked before anything is committed."""
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise InvalidParameter(f"invalid image config: {e}") from e
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or rootfs.get("type") != "layers":
        raise InvalidParameter("invalid image config: missing rootfs.diff_ids")
    for d in diff_ids:
        _hex(d if isinstance(d, str) else "")
    if config.get("os", "linux") != "linux":
        raise InvalidParameter(f"cannot load {config.get('os')} image on linux")
    if len(diff_ids) != n_layers:
        raise InvalidParameter(
            f"invalid manifest, layers length mismatch: expected {len(diff_ids)}, got {n_layers}"
        )
    return config


def _repo_tags(names: list[Any]) -> list[Reference]:
    refs: list[Reference] = []
    for name in names:
        ref = parse_normalized(name) if isinstance(name, str) else None
        if ref is None or ref.tag is None or ref.digest is not None:
            raise InvalidParameter(f"invalid tag {name!r}")
        refs.append(ref)
    return refs


def _classic_items(archive: _Archive) -> list[_LoadItem]:
    manifest = archive.json("manifest.json")
    if not isinstance(manifest, list):
        raise InvalidParameter("invalid archive: manifest.json is not a list")
    items: list[_LoadItem] = []
    for entry in manifest:
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise InvalidParameter("invalid archive: manifest.json entry without Config")
        raw = archive.read(entry["Config"])
        stem = os.path.basename(entry["Config"]).removesuffix(".json")
        if HEX64.match(stem) and _sha256(raw) != stem:
            raise InvalidParameter(f"invalid archive: digest mismatch for {entry['Config']}")
        layers = entry.get("Layers") or []
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise InvalidParameter("invalid archive: bad Layers in manifest.json")
        paths = [archive.resolve(x)[0] for x in layers]
        items.append(_LoadItem(raw, paths, _repo_tags(entry.get("RepoTags") or [])))
    return items


def _oci_items(archive: _Archive) -> list[_LoadItem]:
    index = archive.json("index.json")
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise InvalidParameter("invalid archive: index.json has no manifests")
    by_manifest: dict[str, _LoadItem] = {}
    for desc, names in _oci_manifests(archive, index["manifests"], []):
        manifest = archive.blob_json(desc)
        config_path, _, _ = archive.blob(manifest.get("config") or {})
        layers = [archive.blob(d)[0] for d in manifest.get("layers") or []]
        item = by_manifest.setdefault(
            desc["digest"], _LoadItem(config_path.read_bytes(), layers, [])
        )
        item.tags.extend(r for r in names if r not in item.tags)
    return list(by_manifest.values())


def _oci_manifests(
    archive: _Archive, descs: list[Any], names: list[Reference]
) -> Iterator[tuple[dict[str, Any], list[Reference]]]:
    """Image manifests reachable from an index, with their tags; for multi-platform
    indexes the linux/amd64 one (or the only one)."""
    for desc in descs:
        if not isinstance(desc, dict):
            raise InvalidParameter("invalid archive: bad descriptor in index")
        tags = names + _oci_names(desc.get("annotations") or {})
        if desc.get("mediaType") in (OCI_INDEX, DOCKER_LIST):
            sub = [d for d in archive.blob_json(desc).get("manifests") or [] if isinstance(d, dict)]
            amd64 = [
                d
                for d in sub
                if (d.get("platform") or {}).get("architecture") in (None, "amd64")
                and (d.get("platform") or {}).get("os") in (None, "linux")
            ]
            yield from _oci_manifests(archive, amd64[:1] or sub[:1], tags)
        else:
            yield desc, tags


def _oci_names(annotations: dict[str, Any]) -> list[Reference]:
    name = annotations.get(ANN_CONTAINERD_NAME)
    if not name:
        ref_name = annotations.get(ANN_REF_NAME) or ""
        name = ref_name if any(c in ref_name for c in ":/@") else None  # a bare tag: no repo
    if not isinstance(name, str):
        return []
    ref = parse_normalized(name)
    return [ref.with_default_tag()] if ref.digest is None else []


# ---------------------------------------------------------------- docker save writer


class _SaveWriter:
    """Streams a save archive to dst (need not be seekable)."""

    def __init__(self, blobs: Path, dst: BinaryIO | IO[bytes]) -> None:
        self.blobs = blobs
        self.tar = tarfile.open(fileobj=dst, mode="w|", format=tarfile.PAX_FORMAT)
        self.manifest: list[dict[str, Any]] = []
        self.repositories: dict[str, dict[str, str]] = {}
        self.index: list[dict[str, Any]] = []
        self.written: dict[str, str] = {}  # archive path or diff_id -> archive path
        self.mtime = 0

    def _bytes(self, name: str, data: bytes, mtime: int) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = len(data), 0o644, mtime
        self.tar.addfile(ti, _BytesReader(data))

    def _dir(self, name: str, mtime: int) -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, mtime
        self.tar.addfile(ti)

    def _blob_file(self, name: str, hexd: str, mtime: int) -> None:
        path = self.blobs / hexd
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = path.stat().st_size, 0o644, mtime
        with open(path, "rb") as f:
            self.tar.addfile(ti, f)

    def add_classic(self, img_id: str, raw: bytes, tags: list[Reference], created: int) -> None:
        config = json.loads(raw)
        diff_ids: list[str] = config["rootfs"]["diff_ids"]
        layer_paths: list[str] = []
        parent = ""
        for i, chain in enumerate(chain_ids(diff_ids)):
            top = i == len(diff_ids) - 1
            v1 = _v1_config(config) if top else {
                "created": "1970-01-01T00:00:00Z",
                "container_config": full_container_config(None),
            }  # fmt: skip
            v1_id = _sha256(_canonical({**v1, "layer_id": chain, "parent": parent}))
            v1 = {"id": v1_id, **({"parent": parent} if parent else {}), **v1}
            self._classic_layer(v1_id, v1, diff_ids[i], created)
            layer_paths.append(f"{v1_id}/layer.tar")
            parent = v1_id
        cfg_name = f"{_hex(img_id)}.json"
        if cfg_name not in self.written:
            self._bytes(cfg_name, raw, created)
            self.written[cfg_name] = cfg_name
        self.mtime = max(self.mtime, created)
        self.manifest.append({
            "Config": cfg_name,
            "RepoTags": [t.familiar() for t in tags] or None,
            "Layers": layer_paths,
        })  # fmt: skip
        for t in tags:
            self.repositories.setdefault(t.familiar_name(), {})[t.tag or "latest"] = parent

    def _classic_layer(self, v1_id: str, v1: dict[str, Any], diff_id: str, mtime: int) -> None:
        if v1_id in self.written:
            return
        self.written[v1_id] = v1_id
        self._dir(f"{v1_id}/", mtime)
        self._bytes(f"{v1_id}/VERSION", b"1.0", mtime)
        self._bytes(f"{v1_id}/json", _canonical(v1), mtime)
        if diff_id in self.written:  # same content saved already: symlink, like dockerd
            ti = tarfile.TarInfo(f"{v1_id}/layer.tar")
            ti.type, ti.linkname, ti.mtime = tarfile.SYMTYPE, f"../{self.written[diff_id]}", mtime
            self.tar.addfile(ti)
        else:
            self._blob_file(f"{v1_id}/layer.tar", _hex(diff_id), mtime)
            self.written[diff_id] = f"{v1_id}/layer.tar"

    def _oci_blob(self, hexd: str, data: bytes | None, mtime: int) -> None:
        name = f"blobs/sha256/{hexd}"
        if name in self.written:
            return
        self.written[name] = name
        if data is None:
            self._blob_file(name, hexd, mtime)
        else:
            self._bytes(name, data, mtime)

    def add_oci(self, img_id: str, raw: bytes, tags: list[Reference], created: int) -> None:
        config = json.loads(raw)
        diff_ids: list[str] = config["rootfs"]["diff_ids"]
        self._oci_blob(_hex(img_id), raw, created)
        layers = []
        for d in diff_ids:
            self._oci_blob(_hex(d), None, created)
            size = (self.blobs / _hex(d)).stat().st_size
            layers.append({"mediaType": OCI_LAYER, "digest": d, "size": size})
        manifest = _canonical({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": img_id, "size": len(raw)},
            "layers": layers,
        })  # fmt: skip
        mhex = _sha256(manifest)
        self._oci_blob(mhex, manifest, created)
        desc = {"mediaType": OCI_MANIFEST, "digest": f"sha256:{mhex}", "size": len(manifest)}
        for t in tags:
            self.index.append({
                **desc, "annotations": {ANN_CONTAINERD_NAME: str(t), ANN_REF_NAME: t.tag},
            })  # fmt: skip
        if not tags:
            self.index.append(desc)
        self.manifest.append({
            "Config": f"blobs/sha256/{_hex(img_id)}",
            "RepoTags": [t.familiar() for t in tags] or None,
            "Layers": [f"blobs/sha256/{_hex(d)}" for d in diff_ids],
        })  # fmt: skip
        self.mtime = max(self.mtime, created)

    def finish(self, oci: bool) -> None:
        if oci:
            self._bytes("oci-layout", b'{"imageLayoutVersion":"1.0.0"}', self.mtime)
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.index}
            self._bytes("index.json", _canonical(index), self.mtime)
        self._bytes("manifest.json", _canonical(self.manifest), self.mtime)
        if self.repositories and not oci:
            self._bytes("repositories", _canonical(self.repositories), self.mtime)
        self.tar.close()


class _BytesReader:
    """Minimal file object over bytes for TarFile.addfile."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        out = bytes(self._data[self._pos : end])
        self._pos += len(out)
        return out


def _v1_config(config: dict[str, Any]) -> dict[str, Any]:
    """The legacy v1 `json` of a save archive's top layer: the config minus rootfs/history."""
    return {k: v for k, v in config.items() if k not in ("rootfs", "history")}
