#!/usr/bin/env bash
# Build the simulator main into OUT (default .cache/vcsim/vcsim). Needs
# golang-go and golang-github-vmware-govmomi-dev (library only, no binary).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:-$REPO/.cache/vcsim/vcsim}
GP=$REPO/.cache/vcsim/gopath
mkdir -p "$GP/src/vicd-vcsim" "$(dirname "$OUT")"
cp "$HERE"/*.go "$GP/src/vicd-vcsim/"
NEWEST=$(ls -t "$HERE"/*.go | head -n1)
if [ -x "$OUT" ] && [ "$OUT" -nt "$NEWEST" ]; then exit 0; fi
cd "$GP/src/vicd-vcsim"
GOPATH="$GP:/usr/share/gocode" GO111MODULE=off go build -o "$OUT" .
