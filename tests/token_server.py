"""A Docker-style token server for Debian's docker-registry (Distribution 2.8) configured with
`auth: token:`, so the bearer-token dance runs against the real registry's verifier.

It signs JWTs (ES256) in the form Distribution's token auth checks
(registry/auth/token/token.go): the header carries `x5c` (the signing key's self-signed cert,
which is the registry's `rootcertbundle`) and `kid` (libtrust's key id of that key); the claims
are iss, sub, aud (the service), exp, nbf, iat, jti and `access`. It serves the two ways
dockerd asks (registry/client/auth/session.go): GET with basic credentials (and
`offline_token=true`: a refresh token comes back, which `docker login` stores as the identity
token) and the OAuth2 POST form (`grant_type=refresh_token` or `password`).

Policy: USER may pull and push everywhere except the repository `LOCKED`, for which the token
carries no actions (a token without pull scope). Anonymous requests get tokens with no access.
Every token request is recorded in `requests` so tests can see which flow was used.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SERVICE = "vicd-test-registry"
ISSUER = "vicd-test-token-issuer"
LOCKED = "locked"
TOKEN_LIFETIME = 300


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """libtrust's KeyID: base32 of the first 240 bits of sha256(DER SubjectPublicKeyInfo),
    in groups of four joined by ':' (what Distribution keys its trusted keys by)."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))


def parse_scopes(values: list[str]) -> list[tuple[str, str, list[str]]]:
    """`repository:name:pull,push` (several params, or space-separated) -> (type, name, actions)."""
    out = []
    for value in values:
        for scope in value.split():
            typ, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if typ and name:
                out.append((typ, name, [a for a in actions.split(",") if a]))
    return out


@dataclass
class TokenServer:
    """Keys, a cert for the registry's rootcertbundle, and the aiohttp app in its own thread."""

    dir: Path
    users: dict[str, str]
    port: int = 0
    requests: list[dict[str, str]] = field(default_factory=list)
    refresh_tokens: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vicd test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=30))
                     .sign(self.key, hashes.SHA256()))
        self.cert_path = self.dir / "token-signer.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def registry_auth_yaml(self) -> str:
        """The `auth:` section of the registry's config."""
        return (f"auth:\n  token:\n    realm: {self.realm}\n    service: {SERVICE}\n"
                f"    issuer: {ISSUER}\n    rootcertbundle: {self.cert_path}\n")

    # ---- tokens

    def sign(self, subject: str, access: list[dict]) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + TOKEN_LIFETIME,
                  "nbf": now - 10, "iat": now, "jti": secrets.token_hex(16), "access": access}
        der = self.cert.public_bytes(serialization.Encoding.DER)
        headers = {"typ": "JWT", "kid": libtrust_key_id(self.key.public_key()),
                   "x5c": [base64.b64encode(der).decode()]}
        return jwt.encode(claims, self.key, algorithm="ES256", headers=headers)

    def grant(self, user: str, scopes: list[tuple[str, str, list[str]]]) -> list[dict]:
        access = []
        for typ, name, actions in scopes:
            allowed = [a for a in actions if a in ("pull", "push")]
            if not user or (typ == "repository" and name == LOCKED):
                allowed = []
            access.append({"type": typ, "name": name, "actions": allowed})
        return access

    def _answer(self, user: str, scopes: list[tuple[str, str, list[str]]],
                offline: bool) -> web.Response:
        body: dict = {"token": self.sign(user, self.grant(user, scopes)),
                      "expires_in": TOKEN_LIFETIME,
                      "issued_at": datetime.datetime.now(datetime.UTC).isoformat()}
        body["access_token"] = body["token"]
        if offline and user:
            refresh = secrets.token_urlsafe(24)
            self.refresh_tokens[refresh] = user
            body["refresh_token"] = refresh
        return web.json_response(body)

    @staticmethod
    def _refused() -> web.Response:
        return web.json_response({"details": "incorrect username or password"}, status=401)

    async def _get(self, request: web.Request) -> web.Response:
        """GET realm?service&scope&account&offline_token, basic credentials (or none)."""
        user = ""
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            name, _, pw = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(name) != pw:
                self.requests.append({"method": "GET", "result": "refused"})
                return self._refused()
            user = name
        scopes = parse_scopes(request.query.getall("scope", []))
        self.requests.append({"method": "GET", "user": user,
                              "scope": " ".join(request.query.getall("scope", []))})
        return self._answer(user, scopes, request.query.get("offline_token") == "true")

    async def _post(self, request: web.Request) -> web.Response:
        """The OAuth2 form: grant_type=refresh_token|password."""
        form = await request.post()
        grant = str(form.get("grant_type", ""))
        if grant == "refresh_token":
            user = self.refresh_tokens.get(str(form.get("refresh_token", "")), "")
        elif grant == "password":
            name = str(form.get("username", ""))
            user = name if self.users.get(name) == str(form.get("password", "")) else ""
        else:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        self.requests.append({"method": "POST", "grant": grant, "user": user,
                              "scope": str(form.get("scope", ""))})
        if not user:
            return self._refused()
        return self._answer(user, parse_scopes([str(form.get("scope", ""))]),
                            form.get("access_type") == "offline")

    # ---- lifecycle

    def start(self) -> None:
        app = web.Application()
        app.router.add_get("/token", self._get)
        app.router.add_post("/token", self._post)
        ready = threading.Event()

        async def serve() -> None:
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            await site.start()
            self.port = self._runner.addresses[0][1]
            ready.set()

        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        ready.wait(10)

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop = None
