#!/bin/sh
# Builds the conformance oracle from main.go beside this script into .tools/oracle/oracle (or the path
# given as $1). Only Debian packages are used: golang-go (Go 1.19) and
# golang-github-containerd-stargz-snapshotter-dev, whose sources (estargz, zstdchunked and their
# dependencies) live under /usr/share/gocode/src. scripts/setup.sh installs both and calls this.
#
# GOPATH mode: Debian's estargz directory has no go.mod, so modules cannot point at it; imports are
# resolved from /usr/share/gocode instead, with no module proxy and no network.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$root/.tools/oracle/oracle}
mkdir -p "$(dirname "$out")"
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
lib=/usr/share/gocode/src/github.com/containerd/stargz-snapshotter/estargz
if ! command -v go >/dev/null || [ ! -d "$lib" ]; then
  echo "oracle: needs the Debian packages golang-go and golang-github-containerd-stargz-snapshotter-dev" >&2
  exit 1
fi
export GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off GOFLAGS= CGO_ENABLED=0
export GOCACHE="${GOCACHE:-$root/.tools/gocache}"
cd "$here"
go vet .
go build -trimpath -o "$out.tmp" .
mv "$out.tmp" "$out"
echo "oracle: built $out ($(go version | cut -d' ' -f3))"
