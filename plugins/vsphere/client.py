"""A thin synchronous layer over pyvmomi: login, re-login, task waits, a call counter.

Every SOAP round trip goes through ``SoapStubAdapter.InvokeMethod`` (property
reads included: pyvmomi turns them into ``Fetch``/``RetrieveContents``), so
wrapping that method counts them all. Callers run these methods in threads
(``asyncio.to_thread``); pyvmomi's stub keeps a connection pool and is safe
for concurrent calls.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from vicd.errors import VicdError
from vicd.plugins.vsphere.settings import VSphereSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors after which the session is re-established and the call retried:
# an expired session, or a server that restarted (dead pooled sockets).
CONNECTION_ERRORS = (ConnectionError, http.client.HTTPException, OSError, EOFError)


class VSphereError(VicdError):
    """A vCenter operation failed; the message never carries credentials."""


def fault_message(e: BaseException) -> str:
    msg = getattr(e, "msg", None) or getattr(e, "localizedMessage", None) or ""
    name = type(e).__name__
    return f"{name}: {msg}" if msg and msg != name else name


class VimClient:
    def __init__(self, settings: VSphereSettings, label: str = "main") -> None:
        self.settings = settings
        self.label = label
        self.si: Any = None
        self.content: Any = None
        self.calls = 0  # SOAP round trips, all kinds
        self.logins = 0
        self.generation = 0  # bumped on every (re)login: cached object ids may be stale
        self._lock = threading.Lock()
        self._last_call = time.monotonic()

    # --- session ----------------------------------------------------------------

    def connect(self) -> None:
        s = self.settings
        kwargs: dict[str, Any] = {}
        if s.scheme == "https" and s.insecure:
            kwargs["disableSslCertValidation"] = True
        try:
            si = SmartConnect(protocol=s.scheme, host=s.host, port=s.port, path=s.path,
                              user=s.user, pwd=s.password, connectionPoolTimeout=-1, **kwargs)
        except vim.fault.InvalidLogin:
            raise VSphereError(f"vsphere: login to {s.safe_url} refused "
                               "(check the user and password)") from None
        except ssl.SSLError as e:
            raise VSphereError(f"vsphere: TLS to {s.safe_url} failed: {e.reason} "
                               "(--vsphere-insecure skips verification)") from None
        except (*CONNECTION_ERRORS, vmodl.MethodFault) as e:
            raise VSphereError(f"vsphere: cannot reach {s.safe_url}: {fault_message(e)}") from None
        stub = si._stub
        orig = stub.InvokeMethod

        def counted(mo: Any, info: Any, args: Any) -> Any:
            self.calls += 1
            self._last_call = time.monotonic()
            return orig(mo, info, args)

        stub.InvokeMethod = counted
        self.calls += 2  # RetrieveServiceContent and Login inside SmartConnect
        self.si = si
        self.content = si.RetrieveContent()
        self.logins += 1
        self.generation += 1
        log.info("vsphere[%s]: logged in to %s (API %s)", self.label, s.safe_url,
                 self.content.about.apiVersion)

    def relogin(self) -> None:
        """A new session on the same stub, so managed object handles stay usable."""
        with self._lock:
            s = self.settings
            try:
                self._login()
            except CONNECTION_ERRORS:
                # The first call after a server restart may hit a dead pooled socket.
                self._login()
            self.logins += 1
            self.generation += 1
            log.info("vsphere[%s]: session re-established with %s", self.label, s.safe_url)

    def _login(self) -> None:
        s = self.settings
        try:
            self.content.sessionManager.Login(s.user, s.password)
        except vim.fault.InvalidLogin:
            # Also the answer when this session is still logged in (a retry raced us).
            if self.content.sessionManager.currentSession is None:
                raise VSphereError(f"vsphere: login to {s.safe_url} refused") from None

    def call(self, fn: Callable[[], T], retry: bool = True) -> T:
        """Run ``fn`` (SOAP calls); on an expired session or a dropped connection,
        log in again and (if ``retry``) run it once more."""
        try:
            return fn()
        except (vim.fault.NotAuthenticated, *CONNECTION_ERRORS) as e:
            if not retry and not isinstance(e, vim.fault.NotAuthenticated):
                raise
            log.info("vsphere[%s]: %s; logging in again", self.label, type(e).__name__)
            self._relogin_until_ok()
            return fn()

    def _relogin_until_ok(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.relogin()
                return
            except (vim.fault.NotAuthenticated, *CONNECTION_ERRORS) as e:
                if time.monotonic() > deadline:
                    raise VSphereError(f"vsphere: {self.settings.safe_url} unreachable: "
                                       f"{fault_message(e)}") from None
                time.sleep(0.5)

    def keepalive(self) -> None:
        """Touch the session if it has been idle (vCenter expires idle sessions)."""
        if time.monotonic() - self._last_call >= self.settings.keepalive_seconds:
            self.call(lambda: self.content.sessionManager.currentSession)

    def close(self) -> None:
        if self.si is not None:
            try:
                Disconnect(self.si)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass

    # --- helpers ----------------------------------------------------------------

    def wait_task(self, task: Any, timeout: float = 600, by_parts: bool = False) -> Any:
        """Poll the task's state; tasks on loopback finish in ~10 ms, so start fast.
        ``by_parts``: the task's entity is no ManagedEntity (VirtualDiskManager,
        FileManager, a snapshot), which pyvmomi refuses in a whole ``info``: read
        state, result and error alone (also the fallback on that refusal)."""
        delay = 0.005
        deadline = time.monotonic() + timeout
        while True:
            try:
                if by_parts:
                    raise TypeError
                info = self.call(lambda: task.info)
                state, result, error = info.state, info.result, info.error
            except TypeError:
                p = self.props(task, ["info.state", "info.result", "info.error"])
                state, result, error = p.get("info.state"), p.get("info.result"), p.get(
                    "info.error")
            if state == vim.TaskInfo.State.success:
                return result
            if state == vim.TaskInfo.State.error:
                raise error
            if time.monotonic() > deadline:
                raise VSphereError("vsphere: a task did not finish in time")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def props(self, obj: Any, paths: list[str]) -> dict[str, Any]:
        """Read properties with one RetrieveContents; unset ones are left out
        (pyvmomi's per-property Fetch crashes the simulator on unset ones)."""
        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(objectSet=[pc.ObjectSpec(obj=obj)],
                             propSet=[pc.PropertySpec(type=type(obj), pathSet=paths)])
        res = self.call(lambda: self.content.propertyCollector.RetrieveContents([spec]))
        if not res and self.call(lambda: self.content.sessionManager.currentSession) is None:
            # govmomi's simulator answers an expired session with no objects
            # rather than NotAuthenticated: log in again and ask once more.
            self._relogin_until_ok()
            res = self.call(lambda: self.content.propertyCollector.RetrieveContents([spec]))
        out: dict[str, Any] = {}
        for oc in res or []:
            for p in oc.propSet or []:
                out[p.name] = p.val
        return out

    def find_child(self, parent: Any, name: str) -> Any:
        return self.call(lambda: self.content.searchIndex.FindChild(parent, name))

    def by_path(self, path: str) -> Any:
        return self.call(lambda: self.content.searchIndex.FindByInventoryPath(path))
