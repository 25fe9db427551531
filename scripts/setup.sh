#!/usr/bin/env bash
# Brings a Debian 12 machine (as root) to where strata builds, runs and tests: the apt packages, Node 24,
# pnpm 10, the workspace's dependencies, the build, and the reference eStargz oracle for conformance tests.
# Safe to run again: each step is skipped when it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/bin:$PATH"

APT_PACKAGES=(
  docker-registry skopeo umoci          # a real OCI registry and image tools for tests and the demo
  fuse3 mount util-linux procps         # FUSE: fusermount3, mount(8), setpriv for the relay; pgrep in tests
  iproute2 apache2-utils attr           # tc/netns for benchmarks; htpasswd; getfattr/setfattr
  golang-go golang-github-containerd-stargz-snapshotter-dev   # Go 1.19 + reference estargz sources for test/oracle
  debootstrap                           # real root file systems for benchmarks
  containerd runc                       # the container runtime strata serves snapshots to (test/containerd)
  podman                                # the runtime p2pd --layer-store serves layers to (test/podman)
  ca-certificates curl git python3 make g++
)

step() { printf '\n== %s\n' "$*"; }

missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  step "apt: installing ${missing[*]}"
  if [ "$(id -u)" != 0 ]; then echo "setup: run as root to install apt packages: ${missing[*]}" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
if [ "$(node_major)" -lt 22 ]; then
  step "node: installing Node 24 LTS into /usr/local (found $(node --version 2>/dev/null || echo none))"
  case "$(uname -m)" in x86_64) arch=x64 ;; aarch64) arch=arm64 ;; *) echo "setup: unsupported CPU $(uname -m)" >&2; exit 1 ;; esac
  npm install -g --prefix /usr/local --no-fund --no-audit "node-linux-$arch@24" >/dev/null
  hash -r
fi
echo "node $(node --version)"

if ! pnpm --version 2>/dev/null | grep -q '^10\.'; then
  step "pnpm: installing pnpm 10"
  npm install -g --prefix /usr/local --no-fund --no-audit pnpm@10 >/dev/null
  hash -r
fi
echo "pnpm $(pnpm --version)"

step "dependencies"
pnpm install --frozen-lockfile --reporter=append-only | tail -n 3

step "build"
pnpm run build --output-logs=errors-only

# The conformance oracle (test/oracle) over Debian's estargz sources; rebuilt when its source is newer.
oracle=.tools/oracle/oracle
if [ ! -x $oracle ] || [ test/oracle/main.go -nt $oracle ] || [ test/oracle/build.sh -nt $oracle ]; then
  step "oracle: building the reference eStargz implementation from test/oracle"
  rm -rf .tools/oracle
  sh test/oracle/build.sh $oracle
fi
echo "oracle $oracle"

# ctr-remote: stargz-snapshotter's ctr, whose `images rpull` passes the image and layer to the snapshotter as
# labels (what test/containerd's remote pull drives), built from Debian's sources in GOPATH mode (no network;
# about a minute the first time).
ctr_remote=.tools/ctr-remote/ctr-remote
if [ ! -x $ctr_remote ]; then
  step "ctr-remote: building it from golang-github-containerd-stargz-snapshotter-dev"
  mkdir -p .tools/ctr-remote/gopath
  GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH="$PWD/.tools/ctr-remote/gopath:/usr/share/gocode" \
    GOCACHE="${GOCACHE:-$PWD/.tools/gocache}" \
    go build -trimpath -o $ctr_remote.tmp github.com/containerd/stargz-snapshotter/cmd/ctr-remote
  mv $ctr_remote.tmp $ctr_remote
fi
echo "ctr-remote $ctr_remote"
