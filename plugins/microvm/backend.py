"""The microvm compute backend: QEMU's microvm machine, a tether in the guest.

Per container: a directory ``<data-root>/microvm/vms/<id16>/`` with the
copy-on-write root disk (qcow2 over the image's ext4), the QEMU pidfile,
console log and the two sockets (tether channel, QMP). QEMU runs in its own
session, so containers outlive a daemon that dies; a new daemon finds them
through the pidfile and reconnects.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from vicd.backend import OutputSink, StartError, VMSpec
from vicd.config import Config
from vicd.errors import InvalidParameter, VicdError
from vicd.plugins.microvm import archive
from vicd.plugins.microvm.binds import (
    NINEP_MSIZE,
    NINEP_SLOTS,
    Export,
    SharedFolder,
    SharedFolders,
    slot_exports,
    slot_tag,
)
from vicd.plugins.microvm.guest import TetherGuest, process_fields, slot_iface
from vicd.plugins.microvm.netns import (
    NetNS,
    NetNSError,
    namespace_for,
    plug_tap,
    root_digest,
    tap_name,
    unplug_tap,
)
from vicd.plugins.microvm.qemu import (
    QemuProcess,
    VMFiles,
    build_cmdline,
    live_qemu_pid,
    qemu_version,
)
from vicd.plugins.microvm.qmp import QMP, QMPError
from vicd.plugins.microvm.templates import Shape, Template, TemplateStore, template_key
from vicd.plugins.microvm.tether import (
    PROTOCOL_VERSION,
    TetherConnection,
    TetherError,
    TetherProcess,
)
from vicd.plugins.microvm.volumes import VOLUME_SLOT_BYTES

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 60.0  # TCG on a loaded 2-core CI box; a boot takes ~1.5 s idle
KVM_PROBE_TIMEOUT = 6.0
# Every root overlay has this virtual size (sparse), so one template's disk
# slot fits every container: the guest learnt the size at template boot.
ROOT_SLOT_BYTES = 64 << 30
# NICs a VM can have on daemon networks (docker network connect) besides eth0.
NIC_SLOTS = 3


class RestoreError(VicdError):
    """A template could not be restored; the caller cold-boots instead."""


class MicroVM(TetherGuest):
    def __init__(self, cid: str, files: VMFiles, proc: QemuProcess, conn: TetherConnection,
                 ephemeral: bool = False, memory_mb: int = 0, cpus: int = 1) -> None:
        self.cid = cid
        self.ephemeral = ephemeral
        self.files = files
        self.proc = proc
        self.conn = conn
        self.pid = proc.pid
        self.main: TetherProcess  # set once the main process runs
        self.next_chan = 2
        self.folders: SharedFolders | None = None
        self.memory_mb = memory_mb  # the boot size; the balloon stays under it
        self.netns: NetNS | None = None
        self.cpus = cpus  # vCPUs: a CPU quota set live must fit them
        self._qmp: QMP | None = None
        self._killed = False

    async def qmp(self) -> QMP:
        if self._qmp is None:
            self._qmp = await QMP.connect(str(self.files.qmp))
        return self._qmp

    async def set_memory(self, mb: int) -> None:
        """Balloon the guest to ``mb`` MiB (at most its boot size)."""
        if mb > self.memory_mb:
            raise InvalidParameter(
                f"Cannot update container {self.cid}: a running container's memory cannot "
                f"grow beyond the {self.memory_mb} MiB its VM booted with")
        # The guest's MemTotal follows the balloon, so stats need no correction.
        await (await self.qmp()).execute("balloon", value=mb << 20)

    async def connect_nic(self, nic: dict[str, Any]) -> None:
        if self.netns is None:
            raise InvalidParameter("this VM has no NIC slots for networks")
        await asyncio.to_thread(plug_tap, self.netns, self.cid, nic)
        await self.configure_nic(nic)

    async def disconnect_nic(self, slot: int) -> None:
        await self.unconfigure_nic(slot)
        if self.netns is not None:
            await asyncio.to_thread(unplug_tap, self.netns, self.cid, slot)

    async def pause(self) -> None:
        await (await self.qmp()).execute("stop")

    async def resume(self) -> None:
        await (await self.qmp()).execute("cont")

    async def power_off(self) -> None:
        """End a VM started with ``hold`` (no main process)."""
        await archive.power_off(self)

    async def kill(self) -> None:
        self._killed = True
        self.proc.kill()
        await self.proc.wait(10)

    async def wait(self) -> int:
        """The main process's exit code, once the VM has ended (so its disk is consistent)."""
        code = await self.main.wait()
        if self._killed or self.conn.closed.done() and not self.main.channel.exit.done():
            code = 137
        elif self.ephemeral:
            self.proc.kill()  # its disk is deleted next: nothing to flush
        else:
            # The guest syncs and unmounts its disks before it ends.
            with contextlib.suppress(Exception):
                self.conn.send_ctrl({"op": "poweroff"})
            if not await self.proc.wait(15):
                log.warning("container %s: guest did not power off, killing it", self.cid[:12])
                self.proc.kill()
        await self.proc.wait()
        await self.close()
        return code

    async def detach(self) -> None:
        """Let go of a VM that keeps running (daemon shutdown): the channel is
        QEMU's to hand to the next daemon at once."""
        await self.conn.close()
        if self._qmp:
            self._qmp.close()

    async def close(self) -> None:
        await self.detach()
        if self.folders:
            self.folders.cleanup()


class MicroVMBackend:
    name = "microvm"
    # VMSpec.hold is honoured: a stopped container's files are served by a VM
    # that starts no process (vicd/archive.py).
    supports_hold = True

    def __init__(self, config: Config) -> None:
        self.config = config
        self.root = config.data_root / "microvm"
        self.vms = self.root / "vms"
        self.guest_dir = config.resolved_guest_dir
        self.accel = "tcg"
        self.kernel_release = ""
        self.templates = TemplateStore(self.root / "templates", config.templates_max)
        self.run_dir = _run_dir(config.data_root)
        self.netns: NetNS | None = namespace_for(config.data_root) if NetNS.usable() else None
        self.nic_slots = NIC_SLOTS if self.netns else 0
        # What an unused 9p slot exports (read-only).
        self.empty_export = self.root / "empty"
        self._prebuild: asyncio.Task[None] | None = None

    # --- setup ----------------------------------------------------------------

    async def setup(self) -> None:
        self.vms.mkdir(parents=True, exist_ok=True)
        self.empty_export.mkdir(mode=0o555, exist_ok=True)
        for name in ("vmlinux", "initrd.img", "kernel.release"):
            if not (self.guest_dir / name).is_file():
                raise VicdError(
                    f"guest build missing: {self.guest_dir / name} "
                    "(run contrib/guest/build.sh DIR and pass --guest-dir DIR)"
                )
        if shutil.which("qemu-system-x86_64") is None:
            raise VicdError("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
        self.kernel_release = (self.guest_dir / "kernel.release").read_text().strip()
        self._cleanup_stale_folders()
        if self.netns is not None:
            try:
                await asyncio.to_thread(self.netns.ensure)
            except NetNSError as e:
                log.warning("no user-defined networks: %s", e)
                self.netns, self.nic_slots = None, 0
        self.accel = await self._choose_accel()
        log.info("microvm backend: accelerator %s, guest kernel %s", self.accel,
                 self.kernel_release)
        if self.config.templates and self.config.templates_prebuild:
            # The default shape's template, built before the first `docker run`
            # needs it (a start that comes first waits for this same build).
            self._prebuild = asyncio.create_task(self._prebuild_default())

    def _cleanup_stale_folders(self) -> None:
        """Host-folder staging of VMs that ended while no daemon was there."""
        binds = self.root / "binds"
        if not binds.exists():
            return
        for d in binds.iterdir():
            vm_dir = self.vms / d.name
            if live_qemu_pid(VMFiles(vm_dir, self.run_dir)) is None:
                SharedFolders(d).cleanup()

    async def close(self, networks_kept: bool) -> None:
        """Daemon stop: the network namespace goes too when nothing needs it
        (no VM runs, no user-defined network is kept for the next daemon)."""
        if self.netns is None or networks_kept or await self.running_ids():
            return
        try:
            await asyncio.to_thread(self.netns.remove)
        except NetNSError as e:
            log.warning("network namespace %s not removed: %s", self.netns.name, e)

    async def _choose_accel(self) -> str:
        want = self.config.accel
        if want in ("tcg", "kvm"):
            return want
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "tcg"
        key = f"{platform.release()}|{qemu_version()}|{self._guest_stamp()}"
        cache = self.root / "accel.json"
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return data["accel"]
        ok = await self._probe_kvm()
        verdict = "kvm" if ok else "tcg"
        cache.write_text(json.dumps({"key": key, "accel": verdict}))
        return verdict

    def _guest_stamp(self) -> str:
        try:
            return (self.guest_dir / "build.json").read_text()
        except OSError:
            return self.kernel_release

    async def _probe_kvm(self) -> bool:
        """Boot a guest under KVM and wait for the tether's hello.

        Nested KVM here crawls and then fails with an emulation error, so a
        short deadline decides; a working KVM answers well inside it.
        """
        files = VMFiles(self.root / "kvm-probe", self.run_dir)
        shutil.rmtree(files.dir, ignore_errors=True)
        files.dir.mkdir(parents=True)
        argv = self._argv(files, "kvm", 128, 1, [])
        proc = QemuProcess.spawn(argv, files)
        try:
            conn = await TetherConnection.connect(str(files.ctl), 3)
            try:
                await conn.request("hello", version=PROTOCOL_VERSION, timeout=KVM_PROBE_TIMEOUT)
                return True
            finally:
                await conn.close()
        except (TetherError, OSError):
            return False
        finally:
            proc.kill()
            await proc.wait(5)
            shutil.rmtree(files.dir, ignore_errors=True)

    def info(self) -> dict[str, Any]:
        entries = self.templates.entries()
        size = sum(e["size"] for e in entries)
        return {
            "backend": "microvm",
            "accelerator": self.accel,
            "guest_kernel": self.kernel_release,
            "qemu": qemu_version(),
            "templates": (f"{len(entries)} ({size / 2**20:.1f} MiB)"
                          if self.config.templates else "off"),
        }

    # --- per container -----------------------------------------------------------

    def files(self, cid: str) -> VMFiles:
        return VMFiles(self.vms / cid[:16], self.run_dir)

    def _folders(self, cid: str) -> SharedFolders:
        return SharedFolders(self.root / "binds" / cid[:16])

    def _argv(
        self,
        files: VMFiles,
        accel: str,
        mem: int,
        cpus: int,
        disks: list[tuple[Path, str, bool]],
        mem_path: Path | None = None,
        mem_shared: bool = False,
        nic: dict[str, Any] | None = None,
        taps: list[int] | None = None,
        exports: list[Export] | None = None,
    ) -> list[str]:
        if exports is None:  # every slot empty (templates, the KVM probe)
            exports = slot_exports([], self.empty_export)
        return build_cmdline(
            files=files,
            kernel=self.guest_dir / "vmlinux",
            initrd=self.guest_dir / "initrd.img",
            accel=accel,
            memory_mb=mem,
            cpus=cpus,
            disks=disks,
            mem_path=mem_path,
            mem_shared=mem_shared,
            nic=nic,
            taps=taps,
            exports=[(slot_tag(i), e.path, e.read_only) for i, e in enumerate(exports)],
        )

    async def create(self, spec: VMSpec) -> None:
        files = self.files(spec.container_id)
        files.dir.mkdir(parents=True, exist_ok=True)
        (files.dir / "id").write_text(spec.container_id)
        cmd = [
            "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
            "-b", str(spec.image_disk), str(files.root_disk),
        ]
        if spec.image_disk.stat().st_size <= ROOT_SLOT_BYTES:
            cmd.append(str(ROOT_SLOT_BYTES))
            (files.dir / "slot").write_text(str(ROOT_SLOT_BYTES))
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise VicdError(f"cannot create the container disk: {out.decode().strip()}")
        # What an empty overlay takes (qcow2 metadata), so SizeRw starts at 0.
        (files.dir / "disk0.base").write_text(str(files.root_disk.stat().st_blocks * 512))

    async def start(self, spec: VMSpec, sink: OutputSink) -> MicroVM:
        files = self.files(spec.container_id)
        for sock in (files.ctl, files.qmp):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        disks = [(files.root_disk, "qcow2", False)]
        # Read-only volumes are attached writable and mounted read-only by the
        # guest: ext4 may need to replay its journal even for a read-only mount.
        disks += [(d.path, d.fmt, False) for d in spec.disks]
        t0 = time.monotonic()
        folders = self._folders(spec.container_id)
        taps: list[int] = []
        try:
            shared = folders.prepare(spec.binds)
            exports = slot_exports(shared, self.empty_export)
            taps = await self._open_taps(spec.container_id, spec.nics[1:])
            launched = None
            if len(shared) <= NINEP_SLOTS:
                launched = await self._launch_from_template(spec, files, disks, taps, exports)
            else:
                log.info("container %s: cold boot (%d host folders, templates have %d 9p slots)",
                         spec.container_id[:12], len(shared), NINEP_SLOTS)
            how = "restored from template"
            if launched is None:
                how = "booted"
                argv = self._argv(files, self.accel, spec.memory_mb, spec.cpus, disks,
                                  nic=_nic(spec), taps=taps, exports=exports)
                launched = await self._launch(argv, files, taps)
            if shared:
                how += f" with {len(shared)} host folder(s) over 9p"
        except BaseException:
            folders.cleanup()
            raise
        finally:
            for fd in taps:  # QEMU holds its own copies: the taps live as long as it
                os.close(fd)
        proc, conn, hello = launched
        t_boot = time.monotonic() - t0
        # Volumes outlive the container: only a VM without them may end unflushed.
        vm = MicroVM(spec.container_id, files, proc, conn, spec.ephemeral and not spec.disks,
                     spec.memory_mb, spec.cpus)
        vm.netns = self.netns
        try:
            channel = conn.open_channel(1, sink)
            config = {
                "root": "/dev/vda",
                "fstype": "ext4",
                "hostname": spec.hostname,
                "time_ns": time.time_ns(),
                "seed": base64.b64encode(os.urandom(64)).decode(),
                "network": _guest_network(spec),
                "mounts": _guest_mounts(spec) + _guest_binds(shared) + [
                    {"device": "tmpfs", "fstype": "tmpfs", "target": target, "options": opts}
                    for target, opts in spec.tmpfs],
                **process_fields(spec.process),
                "hold": spec.hold,
                "cpu_max": _cpu_max(spec.cpu_max),
            }
            try:
                reply = await conn.request("run", config=config, timeout=30)
            except TetherError as e:
                code = (getattr(e, "reply", None) or {}).get("exit_code", 1)
                raise StartError(_runtime_error(e.message), int(code)) from None
        except BaseException:
            proc.kill()
            await proc.wait(5)
            await conn.close()
            folders.cleanup()
            raise
        vm.folders = folders
        vm.main = TetherProcess(conn, 1, channel, int(reply.get("pid", 0)))
        log.info(
            "container %s: VM pid %d %s in %.0f ms, process started %.0f ms later "
            "(guest: %s; %s, kernel %s)",
            spec.container_id[:12], proc.pid, how, t_boot * 1000,
            (time.monotonic() - t0 - t_boot) * 1000,
            ", ".join(f"{k[:-3]} {v / 1000:.0f} ms" for k, v in reply.items() if k.endswith("_us")),
            self.accel, hello.get("kernel"),
        )
        return vm

    async def _open_taps(self, cid: str, nics: list[dict[str, Any]]) -> list[int]:
        """Every NIC slot's tap (the device layout needs them all), the
        connected ones already on their networks' bridges."""
        if self.netns is None:
            if nics:
                raise InvalidParameter("user-defined networks need vicd to run as root "
                                       "(CAP_NET_ADMIN) with iproute2")
            return []
        ns = self.netns

        def open_all() -> list[int]:
            fds: list[int] = []
            try:
                for slot in range(1, self.nic_slots + 1):
                    fds.append(ns.open_tap(tap_name(cid, slot)))
                for nic in nics:
                    plug_tap(ns, cid, nic)
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            return fds

        try:
            return await asyncio.to_thread(open_all)
        except NetNSError as e:
            raise VicdError(f"cannot plug the container's NICs: {e}") from None

    async def _launch(
        self, argv: list[str], files: VMFiles, taps: list[int] | None = None
    ) -> tuple[QemuProcess, TetherConnection, dict[str, Any]]:
        """Cold boot: start QEMU and wait for the tether's hello."""
        proc = QemuProcess.spawn(argv, files, tuple(taps or ()))
        try:
            conn = await TetherConnection.connect(str(files.ctl), 10)
            try:
                hello = await conn.request("hello", version=PROTOCOL_VERSION,
                                           timeout=BOOT_TIMEOUT)
            except BaseException:
                await conn.close()
                raise
        except BaseException as e:
            proc.kill()
            await proc.wait(5)
            if isinstance(e, TetherError):
                tail = _tail(files.console)
                raise VicdError(f"the container VM failed to boot: {e.message}{tail}") from None
            raise
        return proc, conn, hello

    # --- templates ------------------------------------------------------------

    def _shape(self, spec: VMSpec) -> Shape:
        return Shape(spec.memory_mb, spec.cpus, self.accel, ROOT_SLOT_BYTES, len(spec.disks),
                     self.nic_slots)

    async def _launch_from_template(
        self, spec: VMSpec, files: VMFiles, disks: list[tuple[Path, str, bool]], taps: list[int],
        exports: list[Export],
    ) -> tuple[QemuProcess, TetherConnection, dict[str, Any]] | None:
        """Restore the shape's template, building it first if needed; None: cold-boot."""
        if not self.config.templates:
            return None
        if not (files.dir / "slot").is_file() or any(
            d.fmt != "raw" or d.path.stat().st_size != VOLUME_SLOT_BYTES for d in spec.disks
        ):
            log.info("container %s: cold boot (disk layout has no template)",
                     spec.container_id[:12])
            return None
        shape = self._shape(spec)
        try:
            t = await self._ensure_template(shape)
        except Exception as e:
            log.warning("container %s: cold boot, no template could be built: %s",
                        spec.container_id[:12], e)
            return None
        self.templates.touch(t)
        try:
            return await self._restore(t, shape, files, disks, _nic(spec), taps, exports)
        except (RestoreError, TetherError, QMPError, OSError) as e:
            self.templates.discard(t, f"restore failed: {e}")
            log.warning("container %s: cold boot after a failed restore", spec.container_id[:12])
            return None

    async def _prebuild_default(self) -> None:
        shape = Shape(max(self.config.vm_memory_mb, self.config.vm_min_memory_mb), 1,
                      self.accel, ROOT_SLOT_BYTES, nic_slots=self.nic_slots)
        try:
            await self._ensure_template(shape)
        except Exception as e:  # the first start will try again, or cold-boot
            log.warning("template prebuild failed: %s", e)

    async def _ensure_template(self, shape: Shape) -> Template:
        key = template_key(shape, self._guest_stamp(), qemu_version())
        return await self.templates.ensure(key, shape, lambda d: self._build_template(d, shape))

    async def _build_template(self, tmp: Path, shape: Shape) -> None:
        """Boot a guest to the tether's wait for ``run``, then save it without its RAM."""
        files = VMFiles(tmp, self.run_dir)
        placeholder = tmp / "slot0.qcow2"
        await _run(["qemu-img", "create", "-q", "-f", "qcow2", str(placeholder),
                    str(shape.root_slot_bytes)])
        disks = [(placeholder, "qcow2", False)]
        for i in range(shape.extra_disks):  # volume slots: sparse raw files
            path = tmp / f"slot{i + 1}.raw"
            with open(path, "wb") as f:
                f.truncate(VOLUME_SLOT_BYTES)
            disks.append((path, "raw", False))
        taps: list[int] = []
        if shape.nic_slots:
            assert self.netns is not None
            tag = f"b{os.urandom(4).hex()}"
            taps = [await asyncio.to_thread(self.netns.open_tap, f"{tag}.{i}")
                    for i in range(1, shape.nic_slots + 1)]
        argv = self._argv(files, shape.accel, shape.memory_mb, shape.cpus, disks,
                          mem_path=tmp / "mem", mem_shared=True, taps=taps)
        try:
            proc, conn, _ = await self._launch(argv, files, taps)
        finally:
            for fd in taps:
                os.close(fd)
        try:
            qmp = await QMP.connect(str(files.qmp))
            try:
                await qmp.execute("migrate-set-capabilities", capabilities=[
                    {"capability": "x-ignore-shared", "state": True}])
                await qmp.execute("migrate", uri=f"exec:cat > {tmp / 'state'}")
                await _wait_migration(qmp, "query-migrate", {"completed"}, {"failed", "cancelled"})
            finally:
                qmp.close()
        finally:
            await conn.close()
            proc.kill()
            await proc.wait(5)
        for path in [files.ctl, files.qmp, tmp / "qemu.pid", *tmp.glob("slot*")]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def _restore(
        self, t: Template, shape: Shape, files: VMFiles, disks: list[tuple[Path, str, bool]],
        nic: dict[str, Any] | None, taps: list[int], exports: list[Export],
    ) -> tuple[QemuProcess, TetherConnection, dict[str, Any]]:
        # The 9p slots were never mounted in the template: each clone gives
        # its own folders here.
        argv = self._argv(files, shape.accel, shape.memory_mb, shape.cpus, disks,
                          mem_path=t.mem, mem_shared=False, nic=nic, taps=taps,
                          exports=exports)
        argv += ["-incoming", "defer"]
        proc = QemuProcess.spawn(argv, files, tuple(taps))
        try:
            qmp = await QMP.connect(str(files.qmp))
            try:
                await qmp.execute("migrate-set-capabilities", capabilities=[
                    {"capability": "x-ignore-shared", "state": True}])
                await qmp.execute("migrate-incoming", uri=f"exec:cat {t.state}")
                # Bytes written to the guest before it runs are lost: wait.
                await _wait_running(qmp, proc)
            finally:
                qmp.close()
            conn = await TetherConnection.connect(str(files.ctl), 5)
            try:
                hello = await conn.request("hello", version=PROTOCOL_VERSION, timeout=10)
            except BaseException:
                await conn.close()
                raise
        except BaseException:
            proc.kill()
            await proc.wait(5)
            raise
        return proc, conn, hello

    async def reattach(self, container_id: str, sink: OutputSink) -> MicroVM | None:
        files = self.files(container_id)
        pid = live_qemu_pid(files)
        if pid is None:
            return None
        proc = QemuProcess(pid)
        try:
            conn = await TetherConnection.connect(str(files.ctl), 5)
            channel = conn.open_channel(1, sink)
            # A daemon that is still going away may hold the channel a little longer.
            hello = await conn.request("hello", version=PROTOCOL_VERSION, timeout=30)
        except (TetherError, OSError) as e:
            log.warning("container %s: cannot reach its guest (%s); killing the VM",
                        container_id[:12], e)
            proc.kill()
            return None
        if hello.get("state") == "waiting":
            # The daemon died between boot and run: that start never happened.
            proc.kill()
            await conn.close()
            return None
        vm = MicroVM(container_id, files, proc, conn, memory_mb=_boot_arg(pid, "-m"),
                     cpus=_boot_arg(pid, "-smp") or 1)
        vm.netns = self.netns
        vm.folders = self._folders(container_id)  # undone when this VM ends
        vm.main = TetherProcess(conn, 1, channel, int(hello.get("pid", 0) or 0))
        if hello.get("state") == "exited" and not channel.exit.done():
            channel.exit.set_result(int(hello.get("exit_code") or 0))
        return vm

    async def recover_containers(self) -> list[dict[str, Any]]:
        return []  # records live in the data root only

    def disk_usage(self, container_id: str) -> int:
        files = self.files(container_id)
        try:
            used = files.root_disk.stat().st_blocks * 512
            base = int((files.dir / "disk0.base").read_text())
        except (OSError, ValueError):
            return 0
        return max(0, used - base)

    async def running_ids(self) -> set[str]:
        out = set()
        if not self.vms.exists():
            return out
        for d in self.vms.iterdir():
            files = VMFiles(d, self.run_dir)
            if live_qemu_pid(files) is None:
                continue
            try:
                out.add((d / "id").read_text().strip())
            except OSError:
                out.add(d.name)
        return out

    async def destroy(self, container_id: str) -> None:
        files = self.files(container_id)
        pid = live_qemu_pid(files)
        if pid is not None:
            proc = QemuProcess(pid)
            proc.kill()
            await proc.wait(5)
        self._folders(container_id).cleanup()

    async def remove(self, container_id: str) -> None:
        await self.destroy(container_id)
        files = self.files(container_id)
        for sock in (files.ctl, files.qmp):
            sock.unlink(missing_ok=True)
        shutil.rmtree(self.files(container_id).dir, ignore_errors=True)


def _boot_arg(pid: int, flag: str) -> int:
    """A number a running QEMU was started with (``-m``, ``-smp``), for a VM found
    after a restart."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return int(argv[argv.index(flag.encode()) + 1])
    except (OSError, ValueError, IndexError):
        return 0


def _run_dir(data_root: Path) -> Path:
    """A short folder for the VMs' sockets, stable for a data root across restarts."""
    digest = root_digest(data_root)
    base = Path("/run/vicd") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
    d = base / digest
    d.mkdir(parents=True, exist_ok=True)
    return d


def _nic(spec: VMSpec) -> dict[str, Any] | None:
    return spec.nics[0] if spec.nics else None


def _cpu_max(limit: tuple[int, int] | None) -> dict[str, int] | None:
    return {"quota": limit[0], "period": limit[1]} if limit else None


def _guest_network(spec: VMSpec) -> dict[str, Any]:
    """The run request's network: what the tether configures inside the guest."""
    ifaces = [
        {"name": "eth0", "mac": n.get("mac", ""), "address": n.get("address", ""),
         "gateway": n.get("gateway", "")}
        for n in spec.nics[:1]
    ] + [slot_iface(n) for n in spec.nics[1:]]
    return {"interfaces": ifaces, "hosts": spec.hosts, "resolv": spec.resolv}


def _guest_binds(shared: list[SharedFolder]) -> list[dict[str, Any]]:
    opts = f"trans=virtio,version=9p2000.L,msize={NINEP_MSIZE}"
    return [
        {"device": f.tag, "fstype": "9p", "target": f.target, "readonly": f.export.read_only,
         "file": f.file, "options": opts}
        for f in shared
    ]


def _guest_mounts(spec: VMSpec) -> list[dict[str, Any]]:
    """Volume disks follow the root disk: vdb, vdc, ... in spec order."""
    return [
        {"device": f"/dev/vd{chr(ord('b') + i)}", "fstype": "ext4", "target": d.target,
         "readonly": d.read_only, "copy_up": d.copy_up}
        for i, d in enumerate(spec.disks)
    ]


async def _run(cmd: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise VicdError(f"{cmd[0]} failed: {out.decode().strip()}")


async def _wait_migration(qmp: QMP, query: str, done: set[str], failed: set[str],
                          timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await qmp.execute(query)
        status = (info or {}).get("status")
        if status in done:
            return
        if status in failed:
            raise RestoreError(f"migration {status}: {info.get('error-desc', '')}")
        await asyncio.sleep(0.01)
    raise RestoreError("migration did not finish in time")


async def _wait_running(qmp: QMP, proc: QemuProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.exited.done():
            raise RestoreError("QEMU exited during the restore")
        status = (await qmp.execute("query-status") or {}).get("status")
        if status == "running":
            return
        if status not in ("inmigrate", "prelaunch", "restore-vm"):
            raise RestoreError(f"restored VM is {status}")
        await asyncio.sleep(0.005)
    raise RestoreError("restore did not finish in time")


def _runtime_error(msg: str) -> str:
    # The shape runc's errors have on dockerd, which the CLI matches to pick exit codes.
    return (
        "failed to create task for container: failed to create shim task: "
        f"OCI runtime create failed: {msg}: unknown"
    )


def _tail(path: Path, n: int = 600) -> str:
    try:
        data = path.read_bytes()[-n:].decode(errors="replace").strip()
    except OSError:
        return ""
    return f" (console: ...{data})" if data else ""
