#!/bin/bash
# Build the vicd guest: OUTDIR/{vmlinux,initrd.img,kernel.release,build.json}.
#
# The kernel comes from Debian's generic linux-image-amd64 (apt-get download +
# dpkg -x into OUTDIR/cache, never installed on the host): unlike the cloud
# kernel it has the 9p modules that host bind mounts need. The initramfs holds
# the tether as /init plus the modules the guest needs that are not built in. Idempotent: a stamp of (kernel package, tether source hash, this
# script's hash) makes a second run exit at once.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
CACHE="$OUT/cache"
mkdir -p "$CACHE"
PY=$(command -v python3)
APT_OPTS=(-o DPkg::Lock::Timeout=300 -o Acquire::Retries=3)

log() { echo "guest-build: $*" >&2; }

# Modules the guest needs beyond what is built in: the microvm transport, the
# devices, ext4 (a module in the generic kernel; it finds crc32c through the
# crypto API, so that one is named) and 9p for host folders. Their
# dependencies are added from modules.dep or the modules' own depends= field.
WANT_MODULES=(virtio_mmio virtio_blk virtio_console virtio_rng virtio_net virtio_balloon
    crc32c_generic ext4 9pnet_virtio 9p)
META_PKG=linux-image-amd64

# Prints "PACKAGE VERSION" of the kernel the meta package depends on. One
# apt-cache call: Debian's meta package pins the exact version.
resolve_pkg() {
    apt-cache show --no-all-versions "$META_PKG" 2>/dev/null |
        sed -n 's/^Depends:.*\(linux-image-[0-9][^ ,]*-amd64\)\( (= \([^)]*\))\)\{0,1\}.*/\1 \3/p' | head -n1
}

RESOLVED=$(resolve_pkg || true)
if [ -z "$RESOLVED" ]; then
    log "apt-cache cannot resolve $META_PKG: running apt-get update"
    apt-get "${APT_OPTS[@]}" update >&2
    RESOLVED=$(resolve_pkg || true)
fi
if [ -z "$RESOLVED" ]; then
    log "cannot resolve the kernel package behind $META_PKG"
    exit 1
fi
read -r PKG PKGVER <<<"$RESOLVED"
if [ -z "${PKGVER:-}" ]; then
    PKGVER=$(apt-cache show --no-all-versions "$PKG" | awk '$1 == "Version:" { print $2; exit }')
fi
KREL=${PKG#linux-image-}

# One build at a time per output folder (tests and the installer may race).
mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

# The stamp covers everything that goes into the outputs.
TETHER_HASH=$(cd "$HERE/tether" && find . -type f \( -name '*.go' -o -name 'go.mod' -o -name 'go.sum' \) -print0 |
    LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
SELF_HASH=$(sha256sum "$HERE/build.sh" | cut -d' ' -f1)
STAMP="$PKG $PKGVER $TETHER_HASH $SELF_HASH"
if [ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$STAMP" ] &&
    [ -f "$OUT/vmlinux" ] && [ -f "$OUT/initrd.img" ] && [ -f "$OUT/build.json" ]; then
    log "up to date ($KREL, package $PKGVER)"
    exit 0
fi
log "kernel package $PKG $PKGVER"

# --- kernel package -------------------------------------------------------
DEBDIR="$CACHE/debs"
mkdir -p "$DEBDIR"
DEB=$(find "$DEBDIR" -maxdepth 1 -name "${PKG}_*.deb" -print | while read -r f; do
    if [ "$(dpkg-deb -f "$f" Version)" = "$PKGVER" ]; then echo "$f"; fi
done | head -n1)
if [ -z "$DEB" ]; then
    log "downloading $PKG=$PKGVER"
    # _apt cannot write into root's cache dir: download unsandboxed.
    (cd "$DEBDIR" && apt-get "${APT_OPTS[@]}" -o APT::Sandbox::User=root download "$PKG=$PKGVER" >&2)
    DEB=$(find "$DEBDIR" -maxdepth 1 -name "${PKG}_*.deb" -print | while read -r f; do
        if [ "$(dpkg-deb -f "$f" Version)" = "$PKGVER" ]; then echo "$f"; fi
    done | head -n1)
    [ -n "$DEB" ] || { log "download produced no .deb"; exit 1; }
fi

KROOT="$CACHE/kernel-$KREL-$PKGVER"
if [ ! -f "$KROOT/.extracted" ]; then
    log "extracting $(basename "$DEB")"
    rm -rf "$KROOT"
    mkdir -p "$KROOT"
    dpkg -x "$DEB" "$KROOT"
    touch "$KROOT/.extracted"
fi
BZIMAGE="$KROOT/boot/vmlinuz-$KREL"
MODDIR="$KROOT/lib/modules/$KREL"
[ -f "$BZIMAGE" ] || { log "no $BZIMAGE in the package"; exit 1; }

# --- vmlinux: the XZ payload of the bzImage (PVH entry; the bzImage boots ~2.9 s
# slower, ../shared/specs/microvm-notes.md) ---
log "extracting vmlinux"
OFF=$("$PY" - "$BZIMAGE" <<'EOF'
import sys
data = open(sys.argv[1], "rb").read()
i = data.find(b"\xfd7zXZ\x00")
if i < 0:
    sys.exit("no XZ magic in the bzImage")
print(i)
EOF
)
# xz complains about the bytes after the compressed stream ("compressed data
# is corrupt"); the ELF check below is what matters.
tail -c +"$((OFF + 1))" "$BZIMAGE" | xz -dc >"$OUT/vmlinux.tmp" 2>/dev/null || true
if [ "$(head -c 4 "$OUT/vmlinux.tmp" | od -An -tx1 | tr -d ' \n')" != "7f454c46" ]; then
    log "decompressed kernel is not an ELF file"
    exit 1
fi
mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"

# --- modules ----------------------------------------------------------------
log "resolving modules: ${WANT_MODULES[*]}"
STAGE="$CACHE/initrd-root"
rm -rf "$STAGE"
mkdir -p "$STAGE/modules" "$STAGE/proc" "$STAGE/sys" "$STAGE/dev" "$STAGE/root" "$STAGE/tmp"
"$PY" - "$MODDIR" "$STAGE/modules" "${WANT_MODULES[@]}" <<'EOF'
import os, shutil, subprocess, sys

moddir, dest, want = sys.argv[1], sys.argv[2], sys.argv[3:]

def name(path):
    base = os.path.basename(path)
    for ext in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base.replace("-", "_")

builtin = set()
bpath = os.path.join(moddir, "modules.builtin")
if os.path.exists(bpath):
    builtin = {name(l.strip()) for l in open(bpath) if l.strip()}

deps, paths = {}, {}
dep_path = os.path.join(moddir, "modules.dep")
if os.path.exists(dep_path):
    for line in open(dep_path):
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        paths[name(mod)] = mod
        deps[name(mod)] = [name(d) for d in rest.split()]
else:
    # No modules.dep in the package (and no depmod here): read the
    # "depends=" field of each module's .modinfo section.
    for root, _, files in os.walk(os.path.join(moddir, "kernel")):
        for f in files:
            if ".ko" in f:
                rel = os.path.relpath(os.path.join(root, f), moddir)
                paths[name(f)] = rel
    def modinfo_deps(rel):
        data = open(os.path.join(moddir, rel), "rb").read()
        i = data.find(b"depends=")
        if i < 0:
            return []
        val = data[i + 8 : data.index(b"\0", i)].decode()
        return [d.replace("-", "_") for d in val.split(",") if d]
    deps = {n: None for n in paths}

def get(n):
    if deps.get(n) is None:
        deps[n] = modinfo_deps(paths[n])
    return deps[n]

order, seen = [], set()
def visit(n, chain=()):
    if n in seen:
        return
    if n in builtin and n not in paths:
        print(f"  {n}: built in", file=sys.stderr)
        seen.add(n)
        return
    if n not in paths:
        sys.exit(f"module {n} is neither built in nor shipped")
    seen.add(n)
    ds = deps[n] if deps[n] is not None else get(n)
    for d in ds:
        visit(d)
    order.append(n)

for w in want:
    visit(w)

SIG_MAGIC = b"~Module signature appended~\n"

def strip_signature(path):
    """Drop Debian's module signature: the guest's kernel does not enforce
    signatures, and checking them (sha256 + RSA under TCG) slows every boot."""
    data = open(path, "rb").read()
    if not data.endswith(SIG_MAGIC):
        return
    # struct module_signature (12 bytes) ends with the big-endian signature length.
    info = data[-len(SIG_MAGIC) - 12 : -len(SIG_MAGIC)]
    sig_len = int.from_bytes(info[8:12], "big")
    with open(path, "wb") as f:
        f.write(data[: len(data) - len(SIG_MAGIC) - 12 - sig_len])

with open(os.path.join(dest, "order"), "w") as fo:
    for n in order:
        src = os.path.join(moddir, paths[n])
        out = os.path.join(dest, n + ".ko")
        if src.endswith(".ko.xz"):
            with open(out, "wb") as o:
                subprocess.run(["xz", "-dc", src], stdout=o, check=True)
        elif src.endswith(".ko.zst"):
            with open(out, "wb") as o:
                subprocess.run(["zstd", "-dc", src], stdout=o, check=True)
        elif src.endswith(".ko.gz"):
            with open(out, "wb") as o:
                subprocess.run(["gzip", "-dc", src], stdout=o, check=True)
        else:
            shutil.copyfile(src, out)
        strip_signature(out)
        fo.write(n + ".ko\n")
        print(f"  {n}.ko", file=sys.stderr)
EOF

# --- tether -------------------------------------------------------------------
log "building tether"
mkdir -p "$CACHE/gocache" "$CACHE/gopath"
(cd "$HERE/tether" &&
    CGO_ENABLED=0 GOOS=linux GOARCH=amd64 GOFLAGS= GOPROXY=off GO111MODULE=on \
        GOCACHE="$CACHE/gocache" GOPATH="$CACHE/gopath" HOME="${HOME:-$CACHE}" \
        go build -trimpath -ldflags "-s -w" -o "$STAGE/init" .)
chmod 0755 "$STAGE/init"

# --- mke2fs: blank volume disks (a VMDK made by CreateVirtualDisk_Task) get
# their ext4 in the guest on first use. The host's binary with the libraries
# ldd names, at the same paths.
log "adding mke2fs"
MKE2FS=$(command -v mke2fs || echo /sbin/mke2fs)
mkdir -p "$STAGE/sbin"
cp -L "$MKE2FS" "$STAGE/sbin/mke2fs"
ldd "$MKE2FS" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' | while read -r lib; do
    mkdir -p "$STAGE$(dirname "$lib")"
    cp -L "$lib" "$STAGE$lib"
done
if [ -f /etc/mke2fs.conf ]; then mkdir -p "$STAGE/etc" && cp /etc/mke2fs.conf "$STAGE/etc/"; fi

# --- initrd: newc cpio written by Python (no cpio tool needed, and it can add
# /dev/console without root-owned device nodes on disk), gzip -n for
# reproducibility.
log "packing initrd.img"
"$PY" - "$STAGE" "$OUT/initrd.img.tmp" <<'EOF'
import gzip, os, stat, sys

stage, out = sys.argv[1], sys.argv[2]
entries = []
for root, dirs, files in os.walk(stage):
    dirs.sort()
    rel = os.path.relpath(root, stage)
    if rel != ".":
        entries.append((rel, os.lstat(root)))
    for f in sorted(files):
        p = os.path.join(root, f)
        entries.append((os.path.relpath(p, stage), os.lstat(p)))

ino = [1000]
def hdr(name, mode, size, nlink=1, rdevmaj=0, rdevmin=0):
    ino[0] += 1
    nb = name.encode() + b"\0"
    h = b"070701" + b"".join(b"%08X" % v for v in (
        ino[0], mode, 0, 0, nlink, 0, size, 0, 0, rdevmaj, rdevmin, len(nb), 0))
    h += nb
    h += b"\0" * ((4 - len(h) % 4) % 4)
    return h

buf = bytearray()
def pad():
    buf.extend(b"\0" * ((4 - len(buf) % 4) % 4))
for name, st in entries:
    if stat.S_ISDIR(st.st_mode):
        buf += hdr(name, stat.S_IFDIR | 0o755, 0, 2)
    elif stat.S_ISLNK(st.st_mode):
        target = os.readlink(os.path.join(stage, name)).encode()
        buf += hdr(name, stat.S_IFLNK | 0o777, len(target)); buf += target; pad()
    else:
        data = open(os.path.join(stage, name), "rb").read()
        perm = 0o755 if st.st_mode & 0o111 else 0o644
        buf += hdr(name, stat.S_IFREG | perm, len(data)); buf += data; pad()
# The kernel opens /dev/console for init's stdio before init runs.
buf += hdr("dev/console", stat.S_IFCHR | 0o600, 0, 1, 5, 1)
buf += hdr("TRAILER!!!", 0, 0, 1)
buf.extend(b"\0" * ((512 - len(buf) % 512) % 512))
with open(out, "wb") as f:
    with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9, mtime=0) as g:
        g.write(bytes(buf))
EOF
mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
echo "$KREL" >"$OUT/kernel.release"

"$PY" - "$OUT" "$KREL" "$PKGVER" "$STAGE/init" <<'EOF'
import hashlib, json, sys
out, krel, ver, tether = sys.argv[1:5]
h = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
doc = {
    "kernel_release": krel,
    "kernel_package_version": ver,
    "tether_sha256": h(tether),
    "initrd_sha256": h(out + "/initrd.img"),
    "vmlinux_sha256": h(out + "/vmlinux"),
}
with open(out + "/build.json.tmp", "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
EOF
mv "$OUT/build.json.tmp" "$OUT/build.json"
echo "$STAMP" >"$OUT/.stamp"
log "done: $OUT ($KREL, initrd $(stat -c %s "$OUT/initrd.img") bytes)"
