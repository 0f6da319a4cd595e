"""An in-memory view of this daemon's VM folder, kept current by the PropertyCollector.

A thread of its own (with its own session: WaitForUpdatesEx blocks) holds a
ContainerView of the folder and waits for updates; each VM's name, power
state and extraConfig land in ``vms``. ``docker ps`` and every lookup read
that dict, so they cost no SOAP call. Changes are handed to the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyVmomi import vim, vmodl

from vicd.plugins.vsphere.client import CONNECTION_ERRORS, VimClient, fault_message

log = logging.getLogger(__name__)

PROPS = ["name", "runtime.powerState", "summary.runtime.bootTime", "config.extraConfig",
         "config.annotation"]
WAIT_SECONDS = 10


@dataclass
class VMState:
    moid: str
    name: str = ""
    power: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    annotation: str = ""
    raw: dict[str, Any] = field(default_factory=dict)  # other requested properties

    @property
    def container_id(self) -> str:
        return self.extra.get("vicd.id", "")


# (kind, before, after): kind is "enter", "modify" or "leave".
Listener = Callable[[str, VMState | None, VMState | None], None]


def _extra(val: Any) -> dict[str, str]:
    # Later duplicates win (a server that appends rather than replaces keys).
    return {o.key: str(o.value) for o in (val or [])}


class FolderView:
    def __init__(self, client: VimClient, resolve_folder: Callable[[VimClient], Any],
                 loop: asyncio.AbstractEventLoop, listener: Listener,
                 props: list[str] | None = None) -> None:
        self.client = client
        self.props = props or PROPS
        self.resolve_folder = resolve_folder
        self.loop = loop
        self.listener = listener
        self.vms: dict[str, VMState] = {}
        self.synced = threading.Event()
        self.generation = 0  # bumped after each full (re)sync
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vsphere-view", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def by_container(self, cid: str) -> VMState | None:
        for st in self.vms.values():
            if st.container_id == cid:
                return st
        return None

    # --- the thread ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._watch()
            except Exception as e:  # noqa: BLE001 - reconnect whatever went wrong
                if self._stop.is_set():
                    return
                log.warning("vsphere view: %s; reconnecting", fault_message(e))
                time.sleep(0.5)
                try:
                    self.client._relogin_until_ok(timeout=3600)
                except Exception as e2:  # noqa: BLE001
                    log.warning("vsphere view: re-login failed: %s", fault_message(e2))

    def _watch(self) -> None:
        c = self.client
        folder = self.resolve_folder(c)
        if folder is None:
            # The folder is gone (deleted, or a fresh server): every VM left.
            self._resync({})
            time.sleep(1)
            return
        content = c.content
        view = c.call(lambda: content.viewManager.CreateContainerView(
            folder, [vim.VirtualMachine], True))
        pcm = vmodl.query.PropertyCollector
        pc = c.call(lambda: content.propertyCollector.CreatePropertyCollector())
        spec = pcm.FilterSpec(
            objectSet=[pcm.ObjectSpec(obj=view, skip=True, selectSet=[
                pcm.TraversalSpec(name="v", type=vim.view.ContainerView, path="view",
                                  skip=False)])],
            propSet=[pcm.PropertySpec(type=vim.VirtualMachine, pathSet=self.props)])
        pc.CreateFilter(spec, partialUpdates=False)
        c.calls += 1
        version = ""
        first = True
        try:
            while not self._stop.is_set():
                us = pc.WaitForUpdatesEx(version, pcm.WaitOptions(maxWaitSeconds=WAIT_SECONDS))
                c.calls += 1
                if us is None:
                    if first:
                        self._resync({})
                        first = False
                    continue
                version = us.version
                if first:
                    fresh: dict[str, VMState] = {}
                    self._apply(us, fresh, notify=False)
                    self._resync(fresh)
                    first = False
                else:
                    self._apply(us, self.vms, notify=True)
        finally:
            try:
                pc.Destroy()
                view.Destroy()
            except (vmodl.MethodFault, *CONNECTION_ERRORS):
                pass

    def _apply(self, us: Any, vms: dict[str, VMState], notify: bool) -> None:
        for fu in us.filterSet or []:
            for ou in fu.objectSet or []:
                moid = ou.obj._moId
                before = vms.get(moid)
                if ou.kind == "leave":
                    vms.pop(moid, None)
                    if notify and before:
                        self._emit("leave", before, None)
                    continue
                st = VMState(moid) if before is None else VMState(
                    moid, before.name, before.power, dict(before.extra), before.annotation,
                    dict(before.raw))
                for ch in ou.changeSet or []:
                    if ch.name == "name":
                        st.name = ch.val or ""
                    elif ch.name == "runtime.powerState":
                        st.power = str(ch.val or "")
                    elif ch.name == "config.extraConfig":
                        st.extra = _extra(ch.val)
                    elif ch.name == "config.annotation":
                        st.annotation = ch.val or ""
                    else:
                        st.raw[ch.name] = ch.val
                vms[moid] = st
                if notify:
                    self._emit("enter" if before is None else "modify", before, st)

    def _resync(self, fresh: dict[str, VMState]) -> None:
        """After a (re)connect: diff the full picture against what we knew."""
        old = self.vms
        self.vms = fresh
        self.generation += 1
        if self.synced.is_set():
            for moid, st in old.items():
                if moid not in fresh:
                    self._emit("leave", st, None)
            for moid, st in fresh.items():
                before = old.get(moid)
                if before is None:
                    self._emit("enter", None, st)
                elif (before.power != st.power or before.extra != st.extra
                      or before.raw != st.raw):
                    self._emit("modify", before, st)
        self.synced.set()

    def _emit(self, kind: str, before: VMState | None, after: VMState | None) -> None:
        self.loop.call_soon_threadsafe(self.listener, kind, before, after)
