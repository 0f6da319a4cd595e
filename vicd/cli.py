"""The ``vicd`` command: ``serve`` and ``plugins``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

from vicd import __version__
from vicd.config import load_config
from vicd.errors import VicdError


class KeyValueFormatter(logging.Formatter):
    """One structured line per record: time, level, logger, then the message's key=values."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = f"{self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}.{int(record.msecs):03d}"
        base = (f"time={stamp} "
                f"level={record.levelname.lower()} logger={record.name} "
                f"msg={json.dumps(record.getMessage())}")
        if record.exc_info:
            base += " exc=" + json.dumps(self.formatException(record.exc_info))
        return base


def setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vicd", description="Docker API daemon, one VM a container")
    p.add_argument("--version", action="version", version=f"vicd {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("-H", "--host", action="append", dest="hosts",
                   help="socket to listen on, e.g. unix:///var/run/vicd.sock (repeatable)")
    s.add_argument("--data-root", type=Path)
    s.add_argument("--backend")
    s.add_argument("--config", type=Path, help="TOML configuration file")
    s.add_argument("--guest-dir", type=Path, help="where contrib/guest/build.sh put the guest")
    s.add_argument("--accel", choices=["auto", "kvm", "tcg"])
    s.add_argument("-D", "--debug", action="store_true", default=None)
    s.add_argument("--group", dest="socket_group", help="group owning the unix socket")
    s.add_argument("--no-templates", dest="templates", action="store_false", default=None,
                   help="cold-boot every VM (no template snapshots)")
    for opt in ("url", "datacenter", "cluster", "resource-pool", "folder", "datastore",
                "network", "template"):
        s.add_argument(f"--vsphere-{opt}", help=f"[plugins.vsphere] {opt}")
    s.add_argument("--vsphere-insecure", action="store_true", default=None,
                   help="do not verify vCenter's TLS certificate")
    sub.add_parser("plugins", help="list loaded plugins")
    t = sub.add_parser("templates", help="manage the microvm backend's template snapshots")
    t.add_argument("action", choices=["ls", "rm", "prune"])
    t.add_argument("key", nargs="?", default="", help="key or key prefix (rm)")
    t.add_argument("--data-root", type=Path, default=Path("/var/lib/vicd"))
    args = p.parse_args(argv)
    if args.cmd == "templates":
        return templates_cmd(args.action, args.key, args.data_root)
    if args.cmd == "plugins":
        from vicd.plugin_manager import make_plugin_manager, plugin_list

        for item in plugin_list(make_plugin_manager()):
            print(f"{item['name']}\t{item['version']}\t{','.join(item['hooks'])}")
        return 0
    overrides = {k: getattr(args, k) for k in
                 ("hosts", "data_root", "backend", "guest_dir", "accel", "debug",
                  "socket_group", "templates")}
    try:
        config = load_config(args.config, overrides)
    except VicdError as e:
        print(f"vicd: {e.message}", file=sys.stderr)
        return 2
    # --vsphere-* flags win over the [plugins.vsphere] table.
    vsphere = {k[len("vsphere_"):]: v for k, v in vars(args).items()
               if k.startswith("vsphere_") and v is not None}
    if vsphere:
        config.plugins["vsphere"] = {**(config.plugins.get("vsphere") or {}), **vsphere}
    setup_logging(config.debug)
    from vicd.daemon import serve

    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        pass
    return 0


def templates_cmd(action: str, key: str, data_root: Path) -> int:
    from vicd.plugins.microvm.templates import TemplateStore

    store = TemplateStore(data_root / "microvm" / "templates", max_count=1 << 30)
    if action == "ls":
        print("KEY                       SIZE       MEMORY  CPUS  LAST USED")
        for e in store.entries():
            shape = e.get("shape", {})
            used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["last_used"]))
            print(f"{e['key']:<25} {e['size'] / 2**20:7.1f}MiB  {shape.get('memory_mb', '?'):>5}M"
                  f"  {shape.get('cpus', '?'):>4}  {used}")
        return 0
    if action == "rm" and not key:
        print("vicd templates rm: a key (or prefix) is required", file=sys.stderr)
        return 2
    for gone in store.remove("" if action == "prune" else key):
        print(f"removed {gone}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
