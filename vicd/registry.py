"""Registry HTTP API v2 client: ping, token/basic auth, manifests, blobs; pull, push, login.

A small client of our own over aiohttp (see README, "Libraries"): it knows exactly the
parts of the distribution protocol that `docker pull/push/login` use, and it is careful
with credentials: they live in an `AuthConfig` whose repr hides them, go only into
`Authorization` headers (never into URLs), and no error message or log line carries them.

Errors carry dockerd's texts (distribution/errors.go, registry/auth.go) since the CLI
shows them verbatim.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp

from vicd.errors import InvalidParameter, NotFound, VicdError
from vicd.progress import Progress, Throttle, message, progress_line, status
from vicd.references import Reference, parse_normalized

log = logging.getLogger(__name__)

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYERS = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    DOCKER_LAYER,
)
MANIFEST_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEX_TYPES = (DOCKER_LIST, OCI_INDEX)
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))

DEFAULT_DOMAIN = "docker.io"
DEFAULT_REGISTRY_HOST = "registry-1.docker.io"
INDEX_SERVER = "https://index.docker.io/v1/"
MAX_MANIFEST_BYTES = 4 << 20  # dockerd's limit for manifests
MAX_CONFIG_BYTES = 8 << 20
CHUNK = 1 << 16
RETRY_STEP = 5  # dockerd waits 5 s before the first retry of a transfer, 10 s before the 2nd...
USER_AGENT = "vicd (docker-compatible; registry client)"


@dataclass(frozen=True)
class TransferOptions:
    """The daemon's settings for pulls and pushes (dockerd's option names in comments)."""

    insecure_registries: tuple[str, ...] = ()
    max_downloads: int = 3  # max-concurrent-downloads
    max_uploads: int = 5  # max-concurrent-uploads
    max_download_attempts: int = 5  # max-download-attempts
    # A blob larger than this is pushed in PATCH chunks of this size, a smaller one in one PUT.
    push_chunk_size: int = 16 << 20

    @classmethod
    def from_config(cls, config: Any) -> TransferOptions:
        return cls(tuple(config.insecure_registries), config.max_concurrent_downloads,
                   config.max_concurrent_uploads, config.max_download_attempts,
                   config.push_chunk_size)  # fmt: skip


class RegistryError(VicdError):
    """A registry operation failed: HTTP 500 unless a subclass says otherwise. `retryable`:
    a transfer may try again (network trouble, a 5xx), as dockerd's retryOnError allows."""

    retryable = False


class Unauthorized(RegistryError):
    """Login refused: HTTP 401 (dockerd's errdefs.Unauthorized)."""

    status = 401


class RegistryNotFound(RegistryError):
    """Manifest or repository unknown, or access denied: HTTP 404 like dockerd."""

    status = 404


class APIError(RegistryError):
    """An error answer of the registry (distribution's errcode): `code: message`."""

    def __init__(self, code: str, message: str, http_status: int) -> None:
        self.code = code
        self.detail = message
        self.http_status = http_status
        super().__init__(f"{code.lower().replace('_', ' ')}: {message}")


# ---------------------------------------------------------------- credentials


@dataclass(repr=False)
class AuthConfig:
    """Credentials from X-Registry-Auth or POST /auth. Never printed."""

    username: str = ""
    password: str = ""
    serveraddress: str = ""
    identitytoken: str = ""
    registrytoken: str = ""

    def __repr__(self) -> str:
        return f"AuthConfig(username={self.username!r}, serveraddress={self.serveraddress!r})"

    @classmethod
    def from_json(cls, data: Any) -> AuthConfig:
        if not isinstance(data, dict):
            return cls()
        lower = {str(k).lower(): v for k, v in data.items()}

        def s(key: str) -> str:
            value = lower.get(key)
            return value if isinstance(value, str) else ""

        auth = cls(s("username"), s("password"), s("serveraddress"), s("identitytoken"),
                   s("registrytoken"))  # fmt: skip
        if not auth.username and s("auth"):  # the config.json form: base64(user:pass)
            with contextlib.suppress(binascii.Error, UnicodeDecodeError, ValueError):
                user, _, pw = base64.b64decode(s("auth")).decode().partition(":")
                auth.username, auth.password = user, pw
        return auth

    @classmethod
    def from_header(cls, value: str | None) -> AuthConfig:
        """X-Registry-Auth: base64url JSON (padding optional). Garbage means anonymous,
        as in dockerd (which ignores an undecodable header)."""
        if not value:
            return cls()
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            return cls.from_json(json.loads(raw))
        except (binascii.Error, ValueError):
            return cls()

    @property
    def has_password(self) -> bool:
        return bool(self.username or self.password)


# ---------------------------------------------------------------- hosts


def registry_host(domain: str) -> str:
    """The host[:port] to talk to for a reference domain (docker.io has its own)."""
    return DEFAULT_REGISTRY_HOST if domain in ("docker.io", "index.docker.io") else domain


def domain_of_server(server: str) -> str:
    """POST /auth serveraddress -> reference domain: scheme and path dropped."""
    server = server.strip()
    if not server or server.rstrip("/") in (INDEX_SERVER.rstrip("/"), "index.docker.io"):
        return DEFAULT_DOMAIN
    if "://" in server:
        server = urlsplit(server).netloc
    return server.split("/", 1)[0]


def _hostname(hostport: str) -> str:
    if hostport.startswith("["):
        return hostport[1 : hostport.find("]")]
    return hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport


def is_insecure(hostport: str, insecure_registries: list[str] | tuple[str, ...] = ()) -> bool:
    """Plain HTTP allowed: loopback (127.0.0.0/8, ::1, localhost) or configured."""
    host = _hostname(hostport)
    if host == "localhost" or host.endswith(".localhost"):
        return True
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return True
    for entry in insecure_registries:
        entry = entry.strip().removeprefix("http://").removeprefix("https://").rstrip("/")
        if entry in (hostport, host):
            return True
        with contextlib.suppress(ValueError):
            if "/" in entry and ipaddress.ip_address(host) in ipaddress.ip_network(entry, False):
                return True
    return False


def parse_challenges(header: str) -> dict[str, dict[str, str]]:
    """WWW-Authenticate: `Bearer realm="...",service="...",scope="..."` -> {scheme: params}."""
    out: dict[str, dict[str, str]] = {}
    for m in re.finditer(r"(?:^|,)\s*([A-Za-z]+)\s+((?:[^,=\s]+=(?:\"[^\"]*\"|[^,]*)\s*,?\s*)*)",
                         header or ""):  # fmt: skip
        params = {
            k.lower(): v.strip('"')
            for k, v in re.findall(r"([^,=\s]+)=(\"[^\"]*\"|[^,]*)", m.group(2))
        }
        out[m.group(1).lower()] = params
    if not out and (header or "").strip():
        out[header.strip().split()[0].lower()] = {}
    return out


def push_scope(path: str) -> str:
    """The token scope a push asks for (dockerd's order of actions)."""
    return f"repository:{path}:push,pull"


def _basic(auth: AuthConfig) -> str:
    return "Basic " + base64.b64encode(f"{auth.username}:{auth.password}".encode()).decode()


def _sha256_hex(digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[a-f0-9]{64}", hexd):
        raise RegistryError(f"unsupported digest algorithm or bad digest: {digest!r}")
    return hexd


def _net_error(method: str, url: str, e: BaseException) -> RegistryError:
    """Go's url.Error text: `Get "url": reason`."""
    if isinstance(e, aiohttp.ClientConnectorDNSError):
        host = urlsplit(url).hostname
        reason = f"dial tcp: lookup {host}: no such host"
    elif isinstance(e, aiohttp.ClientSSLError | ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(e):
        reason = "http: server gave HTTP response to HTTPS client"  # a plain-HTTP answer
    elif isinstance(e, aiohttp.ClientConnectorError):
        reason = f"dial tcp {e.host}:{e.port}: connect: {e.os_error.strerror or e.os_error}"
    elif isinstance(e, aiohttp.ClientPayloadError):
        reason = "unexpected EOF"
    elif isinstance(e, asyncio.TimeoutError):
        reason = "net/http: request canceled (Client.Timeout exceeded while awaiting headers)"
    else:
        reason = str(e) or type(e).__name__
    err = RegistryError(f'{method.capitalize()} "{url}": {reason}')
    err.retryable = True
    return err


async def _api_error(resp: aiohttp.ClientResponse) -> RegistryError:
    err = await _error_of(resp)
    err.retryable = resp.status >= 500
    return err


async def _error_of(resp: aiohttp.ClientResponse) -> RegistryError:
    """distribution's HandleErrorResponse: an OAuth error in the bearer challenge
    (RFC 6750 3.1) comes first, then the errors in the body."""
    bearer = parse_challenges(resp.headers.get("WWW-Authenticate", "")).get("bearer") or {}
    oauth_code = {"invalid_token": "UNAUTHORIZED", "insufficient_scope": "DENIED"}.get(
        bearer.get("error", ""))
    if 400 <= resp.status < 500 and oauth_code:
        default = {"UNAUTHORIZED": "authentication required",
                   "DENIED": "requested access to the resource is denied"}[oauth_code]
        return APIError(oauth_code, bearer.get("error_description") or default, resp.status)
    body = await resp.content.read(1 << 20)
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        data = json.loads(body)
        errors = data.get("errors") if isinstance(data, dict) else None
        if errors and isinstance(errors[0], dict):
            first = errors[0]
            code = str(first.get("code") or "UNKNOWN")
            return APIError(code, str(first.get("message") or ""), resp.status)
        if isinstance(data, dict) and isinstance(data.get("details"), str) and resp.status == 401:
            return APIError("UNAUTHORIZED", data["details"], 401)
    if resp.status == 401:
        return APIError("UNAUTHORIZED", "authentication required", 401)
    return RegistryError(f"received unexpected HTTP status: {resp.status} {resp.reason or ''}"
                         .rstrip())  # fmt: skip


async def retry_countdown(emit: Progress, id_: str, retries: int) -> None:
    """dockerd's wait before retry number `retries` of a layer transfer: 5 s per retry so far,
    counted down on the layer's line."""
    for left in range(retries * RETRY_STEP, 0, -1):
        emit(status(f"Retrying in {left} second{'s' if left != 1 else ''}", id_))
        await asyncio.sleep(1)


# ---------------------------------------------------------------- the client


@dataclass
class _Token:
    value: str
    expires: float


@dataclass
class RegistryClient:
    """One registry host, one set of credentials. Use as `async with`."""

    domain: str
    auth: AuthConfig = field(default_factory=AuthConfig)
    insecure_registries: list[str] = field(default_factory=list)
    timeout: float = 60.0
    host: str = ""
    base: str = ""
    challenges: dict[str, dict[str, str]] | None = None
    refresh_token: str = ""
    _tokens: dict[str, _Token] = field(default_factory=dict)
    _session: aiohttp.ClientSession | None = None

    def __post_init__(self) -> None:
        self.host = registry_host(self.domain)

    async def __aenter__(self) -> RegistryClient:
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout,
                                        sock_read=self.timeout)  # fmt: skip
        self._session = aiohttp.ClientSession(
            timeout=timeout, headers={"User-Agent": USER_AGENT}, trust_env=True
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use RegistryClient as an async context manager"
        return self._session

    # ---- ping and auth

    async def ping(self) -> int:
        """GET /v2/: picks the scheme (HTTPS, or HTTP where allowed) and records the auth
        challenges. Returns the status (200 or 401)."""
        insecure = is_insecure(self.host, self.insecure_registries)
        schemes = ["https", "http"] if insecure else ["https"]
        last: BaseException | None = None
        for scheme in schemes:
            url = f"{scheme}://{self.host}/v2/"
            ssl_ctx: ssl.SSLContext | bool = False if insecure else True
            try:
                async with self.session.get(url, ssl=ssl_ctx, allow_redirects=False) as resp:
                    await resp.read()
                    if resp.status not in (200, 401):
                        raise RegistryError(
                            f'Get "{url}": received unexpected HTTP status: {resp.status} '
                            f"{resp.reason or ''}".rstrip()
                        )
                    self.base = f"{scheme}://{self.host}"
                    self.challenges = parse_challenges(resp.headers.get("WWW-Authenticate", ""))
                    return resp.status
            except (TimeoutError, aiohttp.ClientError, ssl.SSLError) as e:
                last = e
                continue
        assert last is not None
        raise _net_error("GET", f"{schemes[-1]}://{self.host}/v2/", last) from None

    async def _token(self, scope: str, url: str, method: str) -> str:
        """The bearer token dance: GET realm?service&scope with basic credentials, or
        POST a refresh token (identity token) as an OAuth2 form."""
        cached = self._tokens.get(scope)
        if cached and cached.expires > time.monotonic():
            return cached.value
        params = dict((self.challenges or {}).get("bearer") or {})
        realm = params.get("realm", "")
        if not realm:
            raise RegistryError(f'{method.capitalize()} "{url}": bearer challenge without realm')
        service = [("service", params["service"])] if params.get("service") else []
        refresh = self.auth.identitytoken or self.refresh_token
        try:
            if refresh:  # OAuth2 form: all scopes in one space-separated field
                form = [("grant_type", "refresh_token"), ("refresh_token", refresh),
                        ("client_id", "docker"), *service, ("scope", scope)]  # fmt: skip
                ctx = self.session.post(realm, data=form, ssl=self._ssl(realm))
            else:  # one `scope` parameter per scope, as dockerd sends them
                query = [*service, *(("scope", s) for s in scope.split())]
                if self.auth.has_password:
                    query += [("account", self.auth.username), ("client_id", "docker"),
                              ("offline_token", "true")]  # fmt: skip
                hdrs = {"Authorization": _basic(self.auth)} if self.auth.has_password else {}
                sep = "&" if "?" in realm else "?"
                ctx = self.session.get(realm + (sep + urlencode(query) if query else ""),
                                       headers=hdrs, ssl=self._ssl(realm))  # fmt: skip
            async with ctx as resp:
                if resp.status != 200:
                    err = await _api_error(resp)
                    raise RegistryError(f'{method.capitalize()} "{url}": {err.message}')
                data = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError) as e:
            raise _net_error(method, url, e) from None
        except ValueError:
            raise RegistryError(f'{method.capitalize()} "{url}": bad token response') from None
        token = (data or {}).get("token") or (data or {}).get("access_token") or ""
        if not isinstance(token, str) or not token:
            raise RegistryError(f'{method.capitalize()} "{url}": token server sent no token')
        if isinstance(data.get("refresh_token"), str):
            self.refresh_token = data["refresh_token"]
        expires = data.get("expires_in") if isinstance(data.get("expires_in"), int) else 60
        self._tokens[scope] = _Token(token, time.monotonic() + max(expires - 5, 1))
        return token

    def _ssl(self, url: str) -> bool:
        return not (url.startswith("https://") and is_insecure(
            urlsplit(url).netloc, self.insecure_registries))  # fmt: skip

    async def _auth_headers(self, scope: str, url: str, method: str) -> dict[str, str]:
        ch = self.challenges or {}
        if "bearer" in ch:
            return {"Authorization": f"Bearer {await self._token(scope, url, method)}"}
        if "basic" in ch:
            if self.auth.registrytoken:
                return {"Authorization": f"Bearer {self.auth.registrytoken}"}
            if not self.auth.has_password:
                raise RegistryError(f'{method.capitalize()} "{url}": no basic auth credentials')
            return {"Authorization": _basic(self.auth)}
        return {}

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: str,
        path_or_url: str,
        scope: str,
        headers: dict[str, str] | None = None,
        data: Any = None,
        ok: tuple[int, ...] = (200,),
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """An authorized request; a status outside `ok` raises the registry's error."""
        if not self.base:
            await self.ping()
        url = path_or_url if "://" in path_or_url else self.base + path_or_url
        hdrs = {**(headers or {}), **await self._auth_headers(scope, url, method)}
        try:
            async with self.session.request(method, url, headers=hdrs, data=data,
                                            ssl=self._ssl(url)) as resp:  # fmt: skip
                if resp.status not in ok:
                    raise await _api_error(resp)
                yield resp
        except (TimeoutError, aiohttp.ClientError) as e:
            raise _net_error(method, url, e) from None

    # ---- manifests and blobs

    async def get_manifest(self, path: str, reference: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest by tag or digest; digest verified."""
        async with self.request("GET", f"/v2/{path}/manifests/{reference}",
                                f"repository:{path}:pull", {"Accept": ACCEPT}) as resp:
            raw = await resp.content.read(MAX_MANIFEST_BYTES + 1)
            if len(raw) > MAX_MANIFEST_BYTES:
                raise RegistryError("manifest too big")
            mtype = resp.headers.get("Content-Type", "").split(";")[0].strip()
            header_digest = resp.headers.get("Docker-Content-Digest", "")
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if reference.startswith("sha256:") and reference != digest:
            raise RegistryError(f"manifest verification failed for digest {reference}")
        if header_digest.startswith("sha256:") and header_digest != digest and \
                not reference.startswith("sha256:"):
            log.warning("registry %s: Docker-Content-Digest %s differs from content %s",
                        self.host, header_digest, digest)
        with contextlib.suppress(ValueError, AttributeError):
            mtype = json.loads(raw).get("mediaType") or mtype
        return raw, mtype, digest

    async def get_blob_bytes(self, path: str, digest: str, limit: int) -> bytes:
        hexd = _sha256_hex(digest)
        async with self.request("GET", f"/v2/{path}/blobs/{digest}",
                                f"repository:{path}:pull") as resp:  # fmt: skip
            raw = await resp.content.read(limit + 1)
        if len(raw) > limit:
            raise RegistryError(f"blob {digest} too large")
        if hashlib.sha256(raw).hexdigest() != hexd:
            raise RegistryError(f"image config verification failed for digest {digest}")
        return raw

    async def blob_exists(self, path: str, digest: str, scope: str) -> int | None:
        """HEAD a blob: its size, or None when the registry lacks it."""
        async with self.request("HEAD", f"/v2/{path}/blobs/{digest}", scope,
                                ok=(200, 404)) as resp:  # fmt: skip
            if resp.status == 404:
                return None
            return int(resp.headers.get("Content-Length", "0") or 0)

    async def start_upload(self, path: str, digest: str = "", mount_from: str = "") -> str | None:
        """POST an upload session: its URL. With mount_from, ask for a cross-repository
        mount of `digest` first: None when the registry mounted it (201), else the URL of
        the plain upload it opened instead (202)."""
        scope = push_scope(path) + (f" repository:{mount_from}:pull" if mount_from else "")
        q = f"?{urlencode({'mount': digest, 'from': mount_from})}" if mount_from else ""
        async with self.request("POST", f"/v2/{path}/blobs/uploads/{q}", scope,
                                ok=(201, 202)) as resp:  # fmt: skip
            if resp.status == 201:
                return None
            location = resp.headers.get("Location", "")
        if not location:
            raise RegistryError("registry sent no upload location")
        return urljoin(self.base + "/", location)

    async def cancel_upload(self, path: str, url: str) -> None:
        """DELETE an upload session we will not use (a mount the registry did not do)."""
        with contextlib.suppress(RegistryError):
            async with self.request("DELETE", url, push_scope(path), ok=(202, 204, 404)):
                pass

    async def patch_chunk(self, path: str, url: str, start: int, length: int, body: Any) -> str:
        """PATCH one chunk at `start` (Content-Range); returns the URL for the next request.
        The registry's Range answer must cover exactly what was sent so far."""
        end = start + length - 1
        headers = {"Content-Type": "application/octet-stream", "Content-Range": f"{start}-{end}",
                   "Content-Length": str(length)}  # fmt: skip
        async with self.request("PATCH", url, push_scope(path), headers, data=body,
                                ok=(202,)) as resp:  # fmt: skip
            location = resp.headers.get("Location", "")
            got = resp.headers.get("Range", "")
        if got and got.removeprefix("bytes=") != f"0-{end}":
            raise RegistryError(f"upload chunk rejected: registry has {got}, sent 0-{end}")
        return urljoin(url, location) if location else url

    async def finish_upload(
        self, path: str, url: str, digest: str, body: Any = b"", length: int = 0
    ) -> None:
        """PUT ?digest= closes the upload (with the whole blob: a monolithic upload)."""
        url += ("&" if "?" in url else "?") + urlencode({"digest": digest})
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        async with self.request("PUT", url, push_scope(path), headers, data=body,
                                ok=(201, 204)):  # fmt: skip
            pass

    async def upload_bytes(self, path: str, digest: str, data: bytes) -> None:
        url = await self.start_upload(path)
        assert url is not None
        await self.finish_upload(path, url, digest, data, len(data))

    async def put_manifest(self, path: str, tag: str, raw: bytes, media_type: str) -> str:
        async with self.request("PUT", f"/v2/{path}/manifests/{tag}",
                                push_scope(path), {"Content-Type": media_type}, data=raw,
                                ok=(200, 201, 202)):  # fmt: skip
            pass
        return "sha256:" + hashlib.sha256(raw).hexdigest()


# ---------------------------------------------------------------- errors as dockerd says them


def translate_pull_error(e: RegistryError, ref: Reference) -> RegistryError:
    """distribution/errors.go translatePullError."""
    if isinstance(e, APIError):
        if e.code == "DENIED":
            return RegistryNotFound(
                f"pull access denied for {ref.familiar_name()}, repository does not exist or "
                f"may require 'docker login': {e.message}"
            )
        if e.code == "MANIFEST_UNKNOWN":
            return RegistryNotFound(f"manifest for {ref.familiar()} not found: {e.message}")
        if e.code == "NAME_UNKNOWN":
            return RegistryNotFound(f"repository {ref.familiar_name()} not found: {e.message}")
    return e


def pull_reference(from_image: str, tag: str) -> Reference:
    """dockerd's postImagesCreate: fromImage plus tag (a tag or a digest)."""
    ref = parse_normalized(from_image)
    if tag:
        if re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}",
                        tag):  # fmt: skip
            ref = parse_normalized(f"{ref.name}@{tag}")
        else:
            ref = ref.with_tag(tag)
    if ref.tag is not None and ref.digest is not None:
        ref = Reference(ref.domain, ref.path, None, ref.digest)
    return ref.with_default_tag()


# ---------------------------------------------------------------- platforms


def parse_platform(value: str) -> tuple[str, str, str]:
    """`os/arch[/variant]` (or just `arch`) -> (os, arch, variant); default linux/amd64."""
    if not value:
        return "linux", "amd64", ""
    parts = value.lower().split("/")
    if len(parts) == 1:
        parts = ["linux", parts[0]]
    if len(parts) > 3 or not all(parts):
        raise InvalidParameter(f'"{value}": unknown operating system or architecture: '
                               "invalid argument")  # fmt: skip
    os_, arch = parts[0], {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64"}.get(
        parts[1], parts[1])
    variant = parts[2] if len(parts) == 3 else ""
    if arch == "arm64" and variant == "v8":
        variant = ""
    return os_, arch, variant


def select_manifest(index: dict[str, Any], platform: tuple[str, str, str]) -> dict[str, Any]:
    want_os, want_arch, want_variant = platform
    candidates = []
    for desc in index.get("manifests") or []:
        if not isinstance(desc, dict) or desc.get("mediaType", DOCKER_MANIFEST) not in (
            *MANIFEST_TYPES, "",
        ):
            continue
        p = desc.get("platform") or {}
        variant = p.get("variant") or ""
        if p.get("architecture") == "arm64" and variant == "v8":
            variant = ""
        if p.get("os") == want_os and p.get("architecture") == want_arch and (
            not want_variant or variant == want_variant
        ):
            candidates.append(desc)
    if not candidates:
        name = "/".join(x for x in platform if x)
        raise RegistryNotFound(f"no matching manifest for {name} in the manifest list entries")
    return candidates[0]


# ---------------------------------------------------------------- pull


class _PartialBlob:
    """A blob being downloaded: its file, the bytes so far and their running sha256."""

    def __init__(self, path: Path, start: float) -> None:
        self.path = path
        self.start = start
        self.file = open(path, "wb")  # noqa: SIM115
        self.hash = hashlib.sha256()
        self.size = 0
        self.resumed = False

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.hash.update(chunk)
        self.size += len(chunk)

    def truncate(self) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.hash = hashlib.sha256()
        self.size = 0
        self.resumed = False

    def close(self) -> None:
        _flush_close(self.file)

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


@dataclass
class _Layer:
    digest: str
    size: int
    media_type: str
    diff_id: str
    short: str
    path: Path | None = None
    task: asyncio.Task[Path] | None = None


class Puller:
    """`docker pull` of one reference into an ImageStore.

    resolve() talks to the registry until the top manifest is known (its errors become
    plain HTTP errors); run() streams the rest as progress lines (errors go in-stream).
    Downloaded blobs are cached under the store's tmp/pull-cache (verified, complete files
    only) so a retried pull does not fetch them again; the store commits the image in one
    atomic step, so a pull killed midway leaves nothing visible."""

    def __init__(
        self,
        store: Any,
        ref: Reference,
        auth: AuthConfig,
        opts: TransferOptions,
        platform: str = "",
    ) -> None:
        self.store = store
        self.ref = ref
        self.opts = opts
        self.platform = parse_platform(platform)
        self.client = RegistryClient(ref.domain, auth, list(opts.insecure_registries))
        self.manifest: bytes = b""
        self.media_type = ""
        self.manifest_digest = ""
        self.token = f"{os.getpid()}-{id(self):x}-{time.monotonic_ns()}"

    async def __aenter__(self) -> Puller:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.__aexit__(*exc)

    @property
    def tag_or_digest(self) -> str:
        return self.ref.digest or self.ref.tag or "latest"

    async def resolve(self) -> None:
        try:
            await self.client.ping()
            self.manifest, self.media_type, self.manifest_digest = \
                await self.client.get_manifest(self.ref.path, self.tag_or_digest)
        except RegistryError as e:
            raise translate_pull_error(e, self.ref) from None

    async def run(self, emit: Progress) -> tuple[Any, str]:
        """Returns (Image, final status line)."""
        path = self.ref.path
        emit(message(f"Pulling from {path}", self.tag_or_digest))
        manifest = _json_object(self.manifest, "manifest")
        mtype = self.media_type
        if mtype in INDEX_TYPES or "manifests" in manifest:
            desc = select_manifest(manifest, self.platform)
            raw, mtype, digest = await self.client.get_manifest(path, desc["digest"])
            manifest = _json_object(raw, "manifest")
        if mtype not in MANIFEST_TYPES and not ("config" in manifest and "layers" in manifest):
            raise RegistryError(f"unsupported manifest media type {mtype!r}")
        cfg_desc = manifest.get("config") or {}
        config_raw = await self.client.get_blob_bytes(path, str(cfg_desc.get("digest")),
                                                      MAX_CONFIG_BYTES)  # fmt: skip
        config = _json_object(config_raw, "image config")
        diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
        layer_descs = [d for d in manifest.get("layers") or [] if isinstance(d, dict)]
        if len(diff_ids) != len(layer_descs):
            raise RegistryError("layers from manifest don't match image configuration")
        image_id = "sha256:" + hashlib.sha256(config_raw).hexdigest()
        layers: list[_Layer] = []
        for desc, diff in zip(layer_descs, diff_ids, strict=True):
            mt = str(desc.get("mediaType") or "")
            if mt == DOCKER_FOREIGN_LAYER or desc.get("urls"):
                raise RegistryError(f"foreign layer {desc.get('digest')} is not supported")
            if mt and mt not in OCI_LAYERS:
                raise RegistryError(f"unsupported layer media type {mt!r}")
            digest = str(desc.get("digest"))
            _sha256_hex(digest)
            layers.append(_Layer(digest, int(desc.get("size") or -1), mt, str(diff),
                                 digest.split(":", 1)[-1][:12]))  # fmt: skip
        if not self.store.has_image(image_id):
            await self._download_all(layers, emit)
        return await self._commit(config_raw, layers, emit)

    async def _download_all(self, layers: list[_Layer], emit: Progress) -> None:
        sem = asyncio.Semaphore(self.opts.max_downloads)
        cache = self.store.pull_cache_dir()
        by_digest: dict[str, asyncio.Task[Path]] = {}
        for layer in layers:
            if self.store.has_layer(layer.diff_id):
                emit(status("Already exists", layer.short))
                continue
            if layer.digest in by_digest:
                layer.task = by_digest[layer.digest]
                continue
            emit(status("Pulling fs layer", layer.short))
            layer.task = asyncio.create_task(self._download(layer, cache, sem, emit))
            by_digest[layer.digest] = layer.task

    async def _download(
        self, layer: _Layer, cache: Path, sem: asyncio.Semaphore, emit: Progress
    ) -> Path:
        """Fetch and verify one blob. cache/<hex> is the shared, verified copy a retried
        pull reuses; this pull works on its own hard link (cache/<hex>.<token>), so that
        concurrent pulls of the same blob never trip over each other's clean-up."""
        hexd = _sha256_hex(layer.digest)
        final = cache / hexd
        mine = cache / f"{hexd}.{self.token}"
        with contextlib.suppress(FileNotFoundError):
            os.link(final, mine)  # verified by an earlier attempt
            emit(status("Download complete", layer.short))
            return mine
        if sem.locked():  # queued behind max_concurrent_downloads others
            emit(status("Waiting", layer.short))
        async with sem:
            partial = cache / f"{hexd}.{self.token}.partial"
            blob = await asyncio.to_thread(_PartialBlob, partial, time.time())
            try:
                await self._fetch_with_retries(layer, blob, emit)
            except BaseException:
                blob.discard()
                raise
            os.replace(partial, mine)
            with contextlib.suppress(FileExistsError):
                os.link(mine, final)
            emit(status("Download complete", layer.short))
            return mine

    async def _fetch_with_retries(self, layer: _Layer, blob: _PartialBlob, emit: Progress) -> None:
        """dockerd's download loop: a failed attempt is retried after 5 s, 10 s, ... with a
        `Retrying in N seconds` countdown (max_download_attempts retries), resuming with a
        Range request; a digest mismatch is final unless the download was resumed."""
        retries = 0
        while True:
            try:
                await self._fetch(layer, blob, emit)
                emit(status("Verifying Checksum", layer.short))
                if blob.hash.hexdigest() != _sha256_hex(layer.digest) or (
                    layer.size > 0 and blob.size != layer.size
                ):
                    resumed = blob.resumed
                    blob.truncate()
                    err = RegistryError(f"filesystem layer verification failed for digest "
                                        f"{layer.digest}")  # fmt: skip
                    err.retryable = resumed
                    raise err
                await asyncio.to_thread(blob.close)
                return
            except RegistryError as e:
                retries += 1
                if not e.retryable or retries > self.opts.max_download_attempts:
                    raise
                log.info("download of %s failed, retrying (%d/%d): %s", layer.digest, retries,
                         self.opts.max_download_attempts, e.message)
            await retry_countdown(emit, layer.short, retries)

    async def _fetch(self, layer: _Layer, blob: _PartialBlob, emit: Progress) -> None:
        """One GET of the blob into `blob`, from where the last attempt stopped."""
        headers = {"Range": f"bytes={blob.size}-"} if blob.size else {}
        async with self.client.request(
            "GET", f"/v2/{self.ref.path}/blobs/{layer.digest}",
            f"repository:{self.ref.path}:pull", headers, ok=(200, 206),
        ) as resp:
            if blob.size and (resp.status != 206 or not resp.headers.get(
                    "Content-Range", "").startswith(f"bytes {blob.size}-")):
                blob.truncate()  # no resume from this registry: start again
            elif blob.size:
                blob.resumed = True
            total = layer.size if layer.size > 0 else (resp.content_length or 0) + blob.size
            throttle = Throttle()
            shown = blob.size
            async for chunk in resp.content.iter_chunked(CHUNK):
                if layer.size > 0 and blob.size + len(chunk) > layer.size:
                    blob.hash.update(chunk)  # too long: the checksum will fail
                    blob.size += len(chunk)
                    break
                await asyncio.to_thread(blob.write, chunk)
                if throttle.ready():
                    shown = blob.size
                    emit(progress_line("Downloading", layer.short, blob.size, total, blob.start))
        if shown != blob.size:
            emit(progress_line("Downloading", layer.short, blob.size, total, blob.start))

    async def _commit(
        self, config_raw: bytes, layers: list[_Layer], emit: Progress
    ) -> tuple[Any, str]:
        loop = asyncio.get_running_loop()
        tasks = [layer.task for layer in layers if layer.task is not None]

        def source(layer: _Layer) -> Callable[[], Path | None]:
            def wait() -> Path | None:
                if layer.task is None:
                    return None
                fut = asyncio.run_coroutine_threadsafe(_await(layer.task), loop)
                return fut.result()
            return wait

        throttles: dict[int, Throttle] = {}

        def on_extract(i: int, current: int, total: int, done: bool) -> None:
            layer = layers[i]
            if layer.task is None:
                return
            if done:
                emit(status("Pull complete", layer.short))
            elif throttles.setdefault(i, Throttle()).ready(current >= total):
                emit(progress_line("Extracting", layer.short, current, total))

        refs = [self.ref]
        digest_ref = Reference(self.ref.domain, self.ref.path, None, self.manifest_digest)
        if digest_ref not in refs:
            refs.append(digest_ref)
        blobsums = [(layer.diff_id, {"digest": layer.digest, "size": layer.size,
                                     "mediaType": layer.media_type, "repo": self.ref.name})
                    for layer in layers]  # fmt: skip
        ok = False
        try:
            image, changed = await asyncio.to_thread(
                self.store.add_pulled_image, config_raw, [source(x) for x in layers], refs,
                blobsums, on_extract,
            )
            ok = True
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for t in tasks:  # our links go; the shared verified copies stay for a retry
                if t.cancelled() or t.exception() is not None:
                    continue
                mine = t.result()
                mine.unlink(missing_ok=True)
                if ok:  # the image is in: the compressed copies are not needed any more
                    (mine.parent / mine.name.split(".", 1)[0]).unlink(missing_ok=True)
        emit(status(f"Digest: {self.manifest_digest}"))
        name = self.ref.familiar()
        final = (f"Status: Downloaded newer image for {name}" if changed
                 else f"Status: Image is up to date for {name}")  # fmt: skip
        emit(status(final))
        return image, final


async def _await(task: asyncio.Task[Path]) -> Path:
    return await asyncio.shield(task)


def _flush_close(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise RegistryError(f"invalid {what}: {e}") from None
    if not isinstance(value, dict):
        raise RegistryError(f"invalid {what}: not a JSON object")
    return value


# ---------------------------------------------------------------- login


async def login(auth: AuthConfig, insecure_registries: list[str]) -> tuple[str, str]:
    """POST /auth: (status, identity token). Raises Unauthorized like dockerd's loginV2."""
    domain = domain_of_server(auth.serveraddress)
    async with RegistryClient(domain, auth, list(insecure_registries)) as client:
        code = await client.ping()
        url = f"{client.base}/v2/"
        if code == 200:
            return "Login Succeeded", ""
        ch = client.challenges or {}
        if "bearer" in ch:
            try:
                token = await client._token("", url, "GET")
            except RegistryError as e:
                raise Unauthorized(e.message) from None
            headers = {"Authorization": f"Bearer {token}"}
        elif "basic" in ch:
            headers = {"Authorization": _basic(auth)}
        else:
            headers = {}
        try:
            async with client.session.get(url, headers=headers, ssl=client._ssl(url)) as resp:
                await resp.read()
                if resp.status == 200:
                    return "Login Succeeded", client.refresh_token
                reason = resp.reason or ""
                raise Unauthorized(f"login attempt to {url} failed with status: {resp.status} "
                                   f"{reason}".rstrip())  # fmt: skip
        except (TimeoutError, aiohttp.ClientError) as e:
            raise _net_error("GET", url, e) from None


# ---------------------------------------------------------------- import from a URL


async def download_url(url: str, dst: Path, emit: Progress | None = None) -> None:
    """GET a URL to a file (docker import http://...), with `Importing` progress."""
    timeout = aiohttp.ClientTimeout(total=None, connect=60, sock_read=300)
    try:
        async with aiohttp.ClientSession(timeout=timeout, trust_env=True) as session, \
                session.get(url) as resp:
            if resp.status >= 400:
                body = (await resp.content.read(4096)).decode(errors="replace").strip()
                msg = f"failed to GET {url} with status {resp.status} {resp.reason}: {body}"
                raise (NotFound(msg) if resp.status == 404 else RegistryError(msg))
            total = resp.content_length or 0
            got = 0
            throttle = Throttle()
            start = time.time()
            with open(dst, "wb") as f:
                async for chunk in resp.content.iter_chunked(1 << 20):
                    await asyncio.to_thread(f.write, chunk)
                    got += len(chunk)
                    if emit is not None and throttle.ready(got >= total > 0):
                        emit(progress_line("Importing", "", got, total, start))
    except (TimeoutError, aiohttp.ClientError) as e:
        raise _net_error("GET", url, e) from None
