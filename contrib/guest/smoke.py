#!/usr/bin/env python3
"""Smoke test of the vicd guest: boots microVMs with the built guest
(contrib/guest/build.sh) and a busybox ext4 root disk and drives tether
protocol v1 (docs/tether.md) end to end. Standard library only.

    python3 contrib/guest/smoke.py [--out .cache/guest] [--keep] [--no-build]

It first runs contrib/guest/build.sh OUT (a no-op when OUT is up to date).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

CTRL, STDIN, STDOUT, STDERR, STDIN_CLOSE = 1, 2, 3, 4, 5
MAGIC = b"VT"

# A decoded control message (JSON object) or a request's config.
Msg = dict[str, Any]


def host_tsc_khz() -> int:
    """Host TSC rate for tsc_early_khz (microvm has no timer to calibrate)."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
        for pat in (r"tsc: Refined TSC clocksource calibration: ([\d.]+) MHz",
                    r"tsc: Detected ([\d.]+) MHz"):
            m = re.findall(pat, out)
            if m:
                return int(float(m[-1]) * 1000)
    except (OSError, subprocess.SubprocessError):
        pass
    with open("/proc/cpuinfo") as f:
        m = re.search(r"cpu MHz\s*:\s*([\d.]+)", f.read())
    return int(float(m.group(1)) * 1000)


def qemu_cmd(out: str, work: str, disk: str, khz: int) -> list[str]:
    append = ("console=ttyS0 quiet panic=-1 reboot=t cryptomgr.notests mitigations=off "
              f"8250.nr_uarts=1 i8042.noaux i8042.nokbd tsc_early_khz={khz}")
    return [
        "qemu-system-x86_64",
        "-M", "microvm,pit=off,pic=off,isa-serial=on,rtc=on",
        "-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", f"{out}/vmlinux", "-initrd", f"{out}/initrd.img",
        "-append", append,
        "-serial", f"file:{work}/console.log",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=ctl,path={work}/ctl.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=ctl,name=vicd.0",
        "-drive", f"id=root,file={disk},format=raw,if=none,cache=unsafe",
        "-device", "virtio-blk-device,drive=root",
        "-qmp", f"unix:{work}/qmp.sock,server=on,wait=off",
    ]


class Failure(Exception):
    pass


def check(cond: object, what: str) -> None:
    if not cond:
        raise Failure(what)
    print(f"  ok  {what}")


class VM:
    """One guest: QEMU process plus a tether protocol client."""

    def __init__(self, out: str, work: str, disk: str, khz: int) -> None:
        self.work = work
        os.makedirs(work, exist_ok=True)
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(qemu_cmd(out, work, disk, khz), stdin=subprocess.DEVNULL,
                                     stdout=open(f"{work}/qemu.log", "wb"),
                                     stderr=subprocess.STDOUT)
        self.req = 0
        self.replies: dict[int, Msg] = {}
        self.events: list[Msg] = []
        self.output: dict[tuple[int, int], bytearray] = {}
        self.cv = threading.Condition()
        self.sock: socket.socket  # set by connect()
        self.connect()

    def connect(self) -> None:
        path = f"{self.work}/ctl.sock"
        deadline = time.monotonic() + 10
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)
                break
            except OSError as e:
                s.close()
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise Failure(f"cannot connect to {path}") from e
                time.sleep(0.005)
        self.sock = s
        threading.Thread(target=self._reader, args=(s,), daemon=True).start()

    def disconnect(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _reader(self, s: socket.socket) -> None:
        buf = b""
        while True:
            try:
                data = s.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while len(buf) >= 12:
                if buf[:2] != MAGIC:
                    raise SystemExit("guest sent a bad magic")
                typ, ch, n = buf[2], *struct.unpack(">II", buf[4:12])
                if len(buf) < 12 + n:
                    break
                payload, buf = buf[12:12 + n], buf[12 + n:]
                with self.cv:
                    if typ == CTRL:
                        msg = json.loads(payload)
                        if msg.get("op") == "reply":
                            self.replies[msg["req"]] = msg
                        else:
                            if msg.get("op") == "log":
                                print(f"  [guest log] {msg.get('msg')}")
                            self.events.append(msg)
                    else:
                        self.output.setdefault((ch, typ), bytearray()).extend(payload)
                    self.cv.notify_all()

    def send(self, typ: int, ch: int, payload: bytes = b"") -> None:
        header = MAGIC + bytes([typ, 0]) + struct.pack(">II", ch, len(payload))
        self.sock.sendall(header + payload)

    def request(self, op: str, timeout: float = 20, **fields: Any) -> Msg:
        self.req += 1
        n = self.req
        self.send(CTRL, 0, json.dumps({"op": op, "req": n, **fields}).encode())
        return self.wait_reply(n, timeout)

    def wait_reply(self, n: int, timeout: float = 20) -> Msg:
        with self.cv:
            if not self.cv.wait_for(lambda: n in self.replies, timeout):
                raise Failure(f"no reply to request {n}")
            return self.replies.pop(n)

    def wait_exit(self, ch: int, timeout: float = 20) -> int:
        def ev() -> Msg | None:
            return next((e for e in self.events
                         if e.get("op") == "exit" and e.get("chan") == ch), None)

        with self.cv:
            if not self.cv.wait_for(ev, timeout):
                raise Failure(f"no exit event on channel {ch}")
            e = ev()
            assert e is not None
            self.events.remove(e)
            return e["code"]

    def out(self, ch: int, typ: int = STDOUT) -> str:
        with self.cv:
            return bytes(self.output.get((ch, typ), b"")).decode(errors="replace")

    def wait_output(self, ch: int, text: str, timeout: float = 20, typ: int = STDOUT) -> None:
        def seen() -> bool:
            return text in bytes(self.output.get((ch, typ), b"")).decode(errors="replace")

        with self.cv:
            ok = self.cv.wait_for(seen, timeout)
        if not ok:
            raise Failure(f"channel {ch}: {text!r} not seen in {self.out(ch, typ)!r}")

    def poweroff(self, timeout: float = 20) -> float:
        self.send(CTRL, 0, json.dumps({"op": "poweroff"}).encode())
        t = time.monotonic()
        self.proc.wait(timeout)
        return time.monotonic() - t

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_config(args: list[str], **kw: Any) -> Msg:
    cfg: Msg = {"root": "/dev/vda", "fstype": "ext4", "args": args,
           "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
           "cwd": "/", "user": "", "hostname": "smoke", "tty": False, "stdin": False,
           "rows": 0, "cols": 0, "time_ns": time.time_ns(),
           "seed": base64.b64encode(os.urandom(64)).decode()}
    cfg.update(kw)
    return cfg


def ms(s: float) -> str:
    return f"{s * 1000:.0f} ms"


def boot(vm: VM, kernel: str, timings: dict[str, float], label: str) -> float:
    t = time.monotonic()
    r = vm.request("hello", timeout=30, version=1)
    timings[f"{label}: launch -> hello reply"] = time.monotonic() - vm.t0
    check(r["ok"] and r["state"] == "waiting" and r["kernel"] == kernel and r["exit_code"] is None,
          f"hello: {r}")
    return t


def vm_main(vm: VM, kernel: str, timings: dict[str, float]) -> None:
    boot(vm, kernel, timings, "vm1")
    r = vm.request("hello", version=2)
    check(not r["ok"], "hello with version 2 is refused")
    r = vm.request("bogus")
    check(not r["ok"] and "unknown op" in r["error"], "unknown op -> ok:false")
    vm.send(CTRL, 0, b"{not json")
    vm.send(CTRL, 0, b'{"op":"hello","req":"x"}')
    vm.sock.sendall(b"garbage\x00\xffVx")  # bad magic: the guest must resync
    r = vm.request("hello", version=1)
    check(r["ok"], "hello after garbage and bad JSON (resync)")

    t = time.monotonic()
    r = vm.request("run", config=run_config(
        ["sh", "-c", "echo main-out; echo main-err >&2; read x; echo got:$x; exec sleep 1000"],
        stdin=True, hostname="smoke1"))
    timings["vm1: run reply"] = time.monotonic() - t
    check(r["ok"] and r["pid"] > 1, f"run: {r}")
    vm.wait_output(1, "main-out")
    vm.wait_output(1, "main-err", typ=STDERR)
    vm.send(STDIN, 1, b"hello\n")
    vm.send(STDIN_CLOSE, 1)
    vm.wait_output(1, "got:hello")
    check(True, "main stdout/stderr/stdin")
    r = vm.request("run", config=run_config(["true"]))
    check(not r["ok"], "second run refused")

    t = time.monotonic()
    r = vm.request("exec", chan=2, args=["uname", "-r"], env=[], cwd="/", user="", tty=False,
                   stdin=False)
    check(r["ok"], f"exec uname: {r}")
    code = vm.wait_exit(2)
    timings["exec uname -r round trip"] = time.monotonic() - t
    check(code == 0 and vm.out(2).strip() == kernel,
          f"uname -r -> {vm.out(2).strip()!r}, code {code}")

    r = vm.request("exec", chan=3, args=["sh", "-c", "echo out; echo err >&2; exit 3"], env=[],
                   cwd="/", user="", tty=False, stdin=False)
    check(r["ok"], "exec sh -c exit 3")
    code = vm.wait_exit(3)
    check(code == 3 and vm.out(3) == "out\n" and vm.out(3, STDERR) == "err\n",
          f"exit 3 with stdout {vm.out(3)!r} stderr {vm.out(3, STDERR)!r}")

    r = vm.request("exec", chan=4, args=["sh", "-c", "hostname; id; pwd; echo $HOME; date +%s"],
                   env=[], cwd="/tmp", user="nobody", tty=False, stdin=False)
    check(r["ok"], "exec as nobody")
    check(vm.wait_exit(4) == 0, "exec as nobody exits 0")
    lines = vm.out(4).splitlines()
    check(lines[0] == "smoke1", f"hostname {lines[0]!r}")
    check(lines[1].startswith("uid=65534(nobody) gid=65534(nobody)"), f"id {lines[1]!r}")
    check(lines[2] == "/tmp" and lines[3] == "/home", f"cwd {lines[2]!r}, HOME {lines[3]!r}")
    check(abs(int(lines[4]) - time.time()) < 10, f"guest clock {lines[4]} is the host's")

    r = vm.request("exec", chan=5, args=["id", "-u"], env=[], cwd="", user="1234:5678", tty=False,
                   stdin=False)
    check(r["ok"] and vm.wait_exit(5) == 0 and vm.out(5).strip() == "1234",
          "numeric uid not in passwd")

    r = vm.request("exec", chan=6, args=["nope"], env=[], cwd="/", user="", tty=False, stdin=False)
    check(not r["ok"] and r.get("exit_code") == 127 and "executable file not found" in r["error"],
          f"exec nope -> {r}")
    r = vm.request("exec", chan=6, args=["/etc/passwd"], env=[], cwd="/", user="", tty=False,
                   stdin=False)
    check(not r["ok"] and r.get("exit_code") == 126, f"exec /etc/passwd -> {r}")
    r = vm.request("exec", chan=6, args=["true"], env=[], cwd="/", user="ghost", tty=False,
                   stdin=False)
    check(not r["ok"], f"unknown user -> {r.get('error')}")

    r = vm.request("exec", chan=7, args=["sh", "-c", "tty; stty size; read x; stty size; exit 4"],
                   env=[], cwd="/", user="", tty=True, stdin=True, rows=24, cols=80)
    check(r["ok"], "exec with tty")
    vm.wait_output(7, "24 80")
    check(re.search(r"/dev/pts/\d+", vm.out(7)) is not None, f"tty is a pts: {vm.out(7)!r}")
    r = vm.request("resize", chan=7, rows=40, cols=120)
    check(r["ok"], "resize")
    vm.send(STDIN, 7, b"\r")
    check(vm.wait_exit(7) == 4, "tty exec exit 4")
    check("40 120" in vm.out(7), f"size after resize: {vm.out(7)!r}")

    t = time.monotonic()
    r = vm.request("exec", chan=10, args=["dd", "if=/dev/zero", "bs=1M", "count=32"], env=[],
                   cwd="/", user="", tty=False, stdin=False)
    check(r["ok"] and vm.wait_exit(10, timeout=60) == 0, "exec dd 32 MiB to stdout")
    timings["32 MiB stdout"] = time.monotonic() - t
    check(len(vm.output.get((10, STDOUT), b"")) == 32 << 20, "all 32 MiB arrived")

    t = time.monotonic()
    r = vm.request("exec", chan=11, args=["wc", "-c"], env=[], cwd="/", user="", tty=False,
                   stdin=True)
    check(r["ok"], "exec wc -c with stdin")
    blob = os.urandom(256 * 1024)
    for _ in range(16):
        vm.send(STDIN, 11, blob)
    vm.send(STDIN_CLOSE, 11)
    check(vm.wait_exit(11, timeout=60) == 0 and vm.out(11).strip() == str(16 * len(blob)),
          f"4 MiB through stdin: wc says {vm.out(11).strip()}")
    timings["4 MiB stdin"] = time.monotonic() - t

    r = vm.request("exec", chan=8, args=["sleep", "1000"], env=[], cwd="/", user="", tty=False,
                   stdin=False)
    check(r["ok"], "exec sleep (to be killed with the container)")

    t = time.monotonic()
    r = vm.request("ps")
    timings["ps"] = time.monotonic() - t
    cmds = [p["cmd"] for p in r.get("processes", [])]
    check(r["ok"] and "sleep 1000" in cmds and all(p["pid"] > 1 for p in r["processes"]),
          f"ps: {cmds}")
    print(f"       {r['processes'][0]}")
    r = vm.request("stats")
    check(r["ok"] and r["mem_total"] > 100 << 20 and r["cpu_ns"] > 0 and r["online_cpus"] == 1
          and r["pids"] >= 2, f"stats: { {k: v for k, v in r.items() if k not in ('op', 'req')} }")

    vm.disconnect()
    time.sleep(0.1)
    vm.connect()
    r = vm.request("hello", version=1)
    check(r["ok"] and r["state"] == "running", f"reconnect: hello -> {r['state']}")

    r = vm.request("signal", chan=1, signal=15)
    check(r["ok"], "signal SIGTERM")
    check(vm.wait_exit(1) == 143, "main exit 143 after SIGTERM")
    check(vm.wait_exit(8) == 137, "exec killed with the container (137)")
    r = vm.request("hello", version=1)
    check(r["state"] == "exited" and r["exit_code"] == 143,
          f"hello after exit: {r['state']} {r['exit_code']}")
    r = vm.request("exec", chan=9, args=["true"], env=[], cwd="/", user="", tty=False, stdin=False)
    check(not r["ok"], "exec after exit refused")
    timings["vm1: poweroff -> qemu exit"] = vm.poweroff()
    check(vm.proc.returncode == 0, f"qemu exit status {vm.proc.returncode}")


def vm_tty(vm: VM, kernel: str, timings: dict[str, float]) -> None:
    boot(vm, kernel, timings, "vm2")
    r = vm.request("run", config=run_config(
        ["sh", "-c", "tty; stty size; echo to-stderr >&2; exit 5"], tty=True, rows=30, cols=100))
    check(r["ok"], "tty run")
    check(vm.wait_exit(1) == 5, "tty run exit 5")
    out = vm.out(1)
    check("/dev/pts/0" in out and "30 100" in out and "to-stderr" in out
          and vm.out(1, STDERR) == "", f"tty output (all on stdout): {out!r}")
    vm.disconnect()
    vm.connect()
    r = vm.request("hello", version=1)
    check(r["state"] == "exited" and r["exit_code"] == 5,
          "reconnect after exit: hello repeats the exit")
    timings["vm2: poweroff -> qemu exit"] = vm.poweroff()


def vm_notfound(vm: VM, kernel: str, timings: dict[str, float]) -> None:
    boot(vm, kernel, timings, "vm3")
    r = vm.request("run", config=run_config(["no-such-binary"]))
    check(not r["ok"] and r.get("exit_code") == 127, f"run of a missing binary: {r}")
    r = vm.request("hello", version=1)
    check(r["state"] == "exited" and r["exit_code"] == 127, "hello after failed run")
    timings["vm3: poweroff -> qemu exit"] = vm.poweroff()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, ".cache", "guest"),
                    help="build.sh output dir")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (console logs)")
    ap.add_argument("--no-build", action="store_true", help="do not run build.sh first")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    if not args.no_build:
        subprocess.run([f"{HERE}/build.sh", out], check=True)
    kernel = open(f"{out}/kernel.release").read().strip()
    work = tempfile.mkdtemp(prefix="vicd-smoke-")
    timings: dict[str, float] = {}
    vm: VM | None = None
    try:
        t = time.monotonic()
        tar = f"{work}/rootfs.tar"
        subprocess.run([f"{HERE}/mkrootfs-busybox.sh", tar], check=True)
        rootdir = f"{work}/rootfs"
        with tarfile.open(tar) as tf:
            tf.extractall(rootdir)
        disk = f"{work}/disk.img"
        subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", rootdir, "-F", disk, "256M"],
                       check=True)
        timings["rootfs tar + ext4 image"] = time.monotonic() - t
        khz = host_tsc_khz()
        print("qemu:", " ".join(qemu_cmd(out, f"{work}/vmN", disk, khz)))
        for i, test in enumerate((vm_main, vm_tty, vm_notfound), 1):
            print(f"{test.__name__}:")
            vm = VM(out, f"{work}/vm{i}", disk, khz)
            test(vm, kernel, timings)
            vm = None
        fsck = subprocess.run(["e2fsck", "-fn", disk], capture_output=True, text=True)
        check(fsck.returncode == 0,
              f"root disk clean after the poweroffs (e2fsck {fsck.returncode})")
    except Failure as e:
        print(f"FAIL: {e}")
        if vm is not None:
            vm.kill()
            print(f"console log: {vm.work}/console.log")
            print(open(f"{vm.work}/console.log", errors="replace").read()[-3000:])
        args.keep = True
        sys.exit(1)
    finally:
        if vm is not None:
            vm.kill()
        print("timings:")
        for k, v in timings.items():
            print(f"  {k:34s} {ms(v)}")
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("PASS")


if __name__ == "__main__":
    main()
