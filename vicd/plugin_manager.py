"""The plugin manager: built-ins and third-party plugins from the ``vicd`` entry-point group."""

from __future__ import annotations

import importlib
import inspect
import os
from importlib import metadata
from typing import Any

import pluggy

from vicd import hookspecs

# Built-in plugins by entry-point name, registered even when vicd runs from a
# source tree without its entry points installed.
BUILTIN_PLUGINS = {"microvm": "vicd.plugins.microvm.plugin",
                   "vsphere": "vicd.plugins.vsphere.plugin",
                   "nsx": "vicd.plugins.nsx.plugin"}
ALLOWLIST_ENV = "VICD_PLUGINS"


def make_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """Build the manager. ``VICD_PLUGINS=a,b`` limits third-party plugins to those names."""
    pm = pluggy.PluginManager("vicd")
    pm.add_hookspecs(hookspecs)
    for name, modname in BUILTIN_PLUGINS.items():
        pm.register(importlib.import_module(modname), name=name)
    if load_entry_points:
        allow = os.environ.get(ALLOWLIST_ENV)
        if allow:
            allowed = {n.strip() for n in allow.split(",")}
            for ep in metadata.entry_points(group="vicd"):
                if ep.name not in allowed and ep.name not in BUILTIN_PLUGINS:
                    pm.set_blocked(ep.name)
        # Skips names already registered, so built-ins are not loaded twice.
        pm.load_setuptools_entrypoints("vicd")
    return pm


def plugin_list(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """What is loaded: name, version and hooks, for ``vicd plugins`` and ``docker info``."""
    dists = {}
    for plugin, dist in pm.list_plugin_distinfo():
        dists[id(plugin)] = dist
    out = []
    for name, plugin in pm.list_name_plugin():
        dist = dists.get(id(plugin))
        version = dist.version if dist else _builtin_version(name)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        out.append({"name": name, "version": version, "hooks": hooks})
    return out


def _builtin_version(name: str) -> str:
    from vicd import __version__

    return __version__ if name in BUILTIN_PLUGINS else "unknown"


async def await_me_maybe(value: Any) -> Any:
    """Hook results may be plain values or awaitables: await the latter."""
    if inspect.isawaitable(value):
        return await value
    return value


async def call_broadcast(pm: pluggy.PluginManager, hook: str, **kwargs: Any) -> None:
    """Call a broadcast hook and await every async implementation's result."""
    for result in getattr(pm.hook, hook)(**kwargs):
        await await_me_maybe(result)
