#!/usr/bin/env bash
# Install vicd's dependencies, build the guest, and (unless --no-start) start
# vicd on the embedded default backend (local QEMU microVMs).
#   sudo bash contrib/install.sh            # install and start
#   sudo bash contrib/install.sh --no-start # install only (CI, tests)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
START=1
[ "${1:-}" = "--no-start" ] && START=0

APT_PACKAGES=(qemu-system-x86 qemu-utils busybox-static golang-go e2fsprogs lz4 xz-utils
              socat docker.io cpio python3-venv golang-github-docker-docker-dev
              docker-registry apache2-utils skopeo golang-github-vmware-govmomi-dev
              docker-compose)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo ">> apt-get install ${missing[*]}" >&2
  apt-get update -q -o DPkg::Lock::Timeout=300 >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 \
    "${missing[@]}" >&2
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >&2 || true
.venv/bin/pip install -q -e '.[test]' >&2

GUEST_DIR=${VICD_GUEST_DIR:-$REPO/.cache/guest}
bash contrib/guest/build.sh "$GUEST_DIR" >&2

if [ "$START" = 1 ]; then
  DATA_ROOT=${VICD_DATA_ROOT:-/var/lib/vicd}
  SOCK=${VICD_SOCKET:-/var/run/vicd.sock}
  mkdir -p "$DATA_ROOT"
  if [ -f "$DATA_ROOT/vicd.pid" ] && kill -0 "$(cat "$DATA_ROOT/vicd.pid")" 2>/dev/null; then
    echo ">> vicd already running (pid $(cat "$DATA_ROOT/vicd.pid"))" >&2
  else
    setsid "$REPO/.venv/bin/vicd" serve --host "unix://$SOCK" --data-root "$DATA_ROOT" \
      --guest-dir "$GUEST_DIR" >>"$DATA_ROOT/vicd.log" 2>&1 < /dev/null &
    echo $! > "$DATA_ROOT/vicd.pid"
    for _ in $(seq 1 600); do
      [ -S "$SOCK" ] && break
      kill -0 "$(cat "$DATA_ROOT/vicd.pid")" 2>/dev/null || { tail -20 "$DATA_ROOT/vicd.log"; exit 1; }
      sleep 0.1
    done
  fi
  echo ">> vicd is running; log: $DATA_ROOT/vicd.log" >&2
  echo "export DOCKER_HOST=unix://$SOCK"
fi
