#!/usr/bin/env bash
# Build the simulator main into OUT (default .cache/vcsim/vcsim). Needs
# golang-go and golang-github-vmware-govmomi-dev (library only, no binary).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:-$REPO/.cache/vcsim/vcsim}
GP=$REPO/.cache/vcsim/gopath
mkdir -p "$GP/src/vicd-vcsim" "$(dirname "$OUT")"
cp "$HERE/main.go" "$GP/src/vicd-vcsim/main.go"
if [ -x "$OUT" ] && [ "$OUT" -nt "$HERE/main.go" ]; then exit 0; fi
cd "$GP/src/vicd-vcsim"
GOPATH="$GP:/usr/share/gocode" GO111MODULE=off go build -o "$OUT" .
