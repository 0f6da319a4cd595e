"""A small synchronous client for NSX-T's Policy API (``/policy/api/v1``).

The driver's methods run in worker threads, so plain blocking HTTP
(urllib) fits. Basic auth on every request; the password goes into the
Authorization header and nowhere else. NSX's error body
(``error_code``, ``error_message``) becomes an ``NsxError`` whose message
names the URL without credentials.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import time
import urllib.error
import urllib.request
from typing import Any

from vicd.errors import VicdError
from vicd.plugins.nsx.settings import NsxSettings

log = logging.getLogger(__name__)
API = "/policy/api/v1"
RETRIES = 5


class NsxError(VicdError):
    """NSX Manager refused a request or could not be reached."""

    def __init__(self, message: str, http_status: int = 0, code: int = 0) -> None:
        super().__init__(message)
        self.http_status, self.code = http_status, code
        # NSX refusing the request's content is the user's input (400); the rest is ours.
        self.status = 400 if http_status == 400 else 500


class PolicyClient:
    def __init__(self, settings: NsxSettings) -> None:
        self.settings = settings
        self.calls = 0
        token = base64.b64encode(f"{settings.user}:{settings.password}".encode()).decode()
        self._auth = f"Basic {token}"
        self._ssl: ssl.SSLContext | None = None
        if settings.url.startswith("https"):
            self._ssl = ssl.create_default_context(cafile=settings.ca_file or None)
            if settings.insecure:
                self._ssl.check_hostname = False
                self._ssl.verify_mode = ssl.CERT_NONE

    def get(self, path: str) -> dict[str, Any]:
        return self.request("GET", path)

    def patch(self, path: str, body: dict[str, Any]) -> None:
        self.request("PATCH", path, body)

    def delete(self, path: str) -> None:
        self.request("DELETE", path)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None
                ) -> dict[str, Any]:
        """One request; NSX's "too many requests" (429) and "busy" (503) answers are
        retried after Retry-After (or a short backoff), as NSX asks clients to."""
        for attempt in range(RETRIES):
            try:
                return self._request(method, path, body)
            except _Busy as e:
                if attempt == RETRIES - 1:
                    raise e.error from None
                time.sleep(e.retry_after if e.retry_after is not None
                           else min(0.2 * 2 ** attempt, 2.0))
        raise AssertionError("unreachable")

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        url = self.settings.url.rstrip("/") + API + path
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": self._auth, "Accept": "application/json",
            **({"Content-Type": "application/json"} if data is not None else {})})
        self.calls += 1
        where = f"NSX Manager {self.settings.safe_url}"
        try:
            with urllib.request.urlopen(req, timeout=self.settings.timeout,
                                        context=self._ssl) as resp:
                raw = resp.read()
                log.debug("nsx: %s %s -> %d", method, path, resp.status)
                return json.loads(raw) if raw else {}
        except urllib.error.HTTPError as e:
            err = _error_body(e)
            log.info("nsx: %s %s -> %d %s", method, path, e.code, err.get("error_message", ""))
            if e.code in (401, 403):
                raise NsxError(f"nsx: {where} refused the credentials of user "
                               f"{self.settings.user!r}", e.code) from None
            msg = err.get("error_message") or e.reason
            code = int(err.get("error_code") or 0)
            error = NsxError(f"nsx: {msg} ({where}, {method} {API}{path}: HTTP {e.code}"
                             f"{f', error {code}' if code else ''})", e.code, code)
            if e.code in (429, 503):
                raise _Busy(error, _retry_after(e.headers.get("Retry-After"))) from None
            raise error from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, ssl.SSLError):
                raise NsxError(f"nsx: TLS to {where} failed: {reason.reason} (insecure = "
                               "true or ca_file in [plugins.nsx])") from None
            raise NsxError(f"nsx: cannot reach {where}: "
                           f"{getattr(reason, 'strerror', None) or reason}") from None


class _Busy(Exception):
    def __init__(self, error: NsxError, retry_after: float | None) -> None:
        self.error, self.retry_after = error, retry_after


def _retry_after(value: str | None) -> float | None:
    try:
        return min(max(float(value or ""), 0.0), 10.0)
    except ValueError:
        return None


def _error_body(e: urllib.error.HTTPError) -> dict[str, Any]:
    try:
        body = json.loads(e.read() or b"{}")
    except (ValueError, OSError):
        return {}
    return body if isinstance(body, dict) else {}
