#!/bin/bash
# Make a busybox root filesystem tarball from Debian's busybox-static, for
# `docker import OUT.tar busybox:latest`. No root-owned files are needed on
# disk: Python's tarfile writes every entry as 0:0.
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 OUT.tar" >&2
    exit 2
fi
BB=${BUSYBOX:-/bin/busybox}
if ! "$BB" --list >/dev/null 2>&1; then
    echo "mkrootfs: no usable busybox at $BB (apt-get install busybox-static)" >&2
    exit 1
fi
exec python3 - "$BB" "$1" <<'PYEOF'
import io, os, sys, subprocess, tarfile, time

bb, out = sys.argv[1], sys.argv[2]
applets = sorted(set(subprocess.run([bb, "--list"], check=True, capture_output=True, text=True).stdout.split()))
now = int(time.time())

def info(name, kind, mode, **kw):
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname, ti.mtime = kind, mode, 0, 0, "root", "root", now
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti

files = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
    "etc/group": "root:x:0:\nnobody:x:65534:\n",
    "etc/hostname": "busybox\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "etc/nsswitch.conf": "hosts: files dns\n",
}
tmp = out + ".tmp"
with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
    for d, mode in [("bin", 0o755), ("dev", 0o755), ("etc", 0o755), ("home", 0o755), ("proc", 0o555),
                    ("root", 0o700), ("sys", 0o555), ("tmp", 0o1777), ("usr", 0o755), ("usr/bin", 0o755),
                    ("usr/sbin", 0o755), ("sbin", 0o755), ("var", 0o755), ("var/spool", 0o755),
                    ("var/spool/mail", 0o755), ("var/www", 0o755)]:
        tar.addfile(info(d, tarfile.DIRTYPE, mode))
    data = open(bb, "rb").read()
    tar.addfile(info("bin/busybox", tarfile.REGTYPE, 0o755, size=len(data)), io.BytesIO(data))
    for a in applets:
        if a != "busybox":
            tar.addfile(info("bin/" + a, tarfile.SYMTYPE, 0o777, linkname="busybox"))
    for name, text in files.items():
        b = text.encode()
        tar.addfile(info(name, tarfile.REGTYPE, 0o644, size=len(b)), io.BytesIO(b))
os.replace(tmp, out)
print(f"mkrootfs: {out}: busybox with {len(applets)} applets", file=sys.stderr)
PYEOF
