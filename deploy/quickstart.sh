#!/usr/bin/env bash
# The strata quick start, on one machine (as root, Debian 12):
#   1. set-up (apt packages, Node 24, pnpm, build) — skipped when already done;
#   2. a local registry on loopback with a sample image (this machine's own programs) converted to eStargz;
#   3. three p2pd nodes joined into one cluster;
#   4. node 1 warms the image from the registry;
#   5. node 2 mounts it lazily with p2p-mount and runs a command inside it: its chunks come from node 1;
#   6. how many bytes came from peers and how many from the registry;
# and everything is stopped and removed on exit (also on Ctrl-C or failure).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

if [ "$(id -u)" != 0 ]; then echo "quickstart: run as root (it mounts a FUSE file system and chroots into it)" >&2; exit 1; fi
# STRATA_SKIP_SETUP=1: the caller has run scripts/setup.sh already (the end-to-end test of this script does).
if [ "${STRATA_SKIP_SETUP:-}" != 1 ]; then
  echo "set-up (apt packages, Node 24, pnpm, build; a few minutes the first time): log in /tmp/strata-quickstart-setup.log"
  ./scripts/setup.sh >/tmp/strata-quickstart-setup.log 2>&1 || { cat /tmp/strata-quickstart-setup.log >&2; exit 1; }
fi
export PATH="/usr/local/bin:$PATH"

p2pctl() { node "$root/packages/cli/bin/p2pctl.js" "$@"; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

work=$(mktemp -d /tmp/strata-quickstart.XXXXXX)
mnt="$work/mnt"
pids=()
cleanup() {
  set +e
  if mountpoint -q "$mnt" 2>/dev/null; then node "$root/packages/cli/bin/p2p-mount.js" --unmount "$mnt" >/dev/null 2>&1; fi
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits until FILE contains PATTERN (a process's log), or fails after SECONDS.
wait_for() {
  local file=$1 pattern=$2 seconds=${3:-60} i
  for ((i = 0; i < seconds * 10; i++)); do
    grep -q "$pattern" "$file" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "quickstart: timed out waiting for '$pattern' in $file:" >&2; cat "$file" >&2; return 1
}

free_port() { node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }

say "a local registry"
port=$(free_port)
registry="127.0.0.1:$port"
cat >"$work/registry.yml" <<EOF
version: 0.1
log: { level: error, accesslog: { disabled: true } }
storage: { filesystem: { rootdirectory: $work/registry } }
http: { addr: $registry }
EOF
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -fs "http://$registry/v2/" >/dev/null 2>&1 && break; sleep 0.1; done
echo "registry at http://$registry"

say "a sample image, converted to eStargz"
./scripts/lib/host-rootfs.sh "$work/rootfs" sh ls cat sha256sum find du >/dev/null
# Some bulk the demo command does not read: a lazy mount fetches only what is read.
mkdir -p "$work/rootfs/usr/share/bulk"
cp -r /usr/share/perl5 /usr/share/i18n "$work/rootfs/usr/share/bulk/" 2>/dev/null || true
echo "hello from inside a lazily mounted image" >"$work/rootfs/hello.txt"
./scripts/lib/make-image.sh "$work/rootfs" "$work/oci" demo >/dev/null
image="$registry/demo:estargz"
p2pctl convert "oci:$work/oci:demo" "$image"
p2pctl inspect "$image" | sed 's/^/  /'

say "three p2pd nodes"
start_node() {
  local i=$1; shift
  mkdir -p "$work/node$i"
  node "$root/packages/cli/bin/p2pd.js" --data-dir "$work/node$i" --socket "$work/node$i.sock" \
    --listen /ip4/127.0.0.1/tcp/0 --insecure-registry "$registry" "$@" >"$work/node$i.log" 2>&1 &
  pids+=($!)
  wait_for "$work/node$i.log" 'p2pd ready' 60
  sed -n 's/^/  /; /p2pd ready/p' "$work/node$i.log"
}
start_node 1
addr1=$(p2pctl --socket "$work/node1.sock" status --json | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).addrs[0]))')
start_node 2 --bootstrap "$addr1"
start_node 3 --bootstrap "$addr1"

say "node 1 warms the image from the registry"
p2pctl --socket "$work/node1.sock" warm "$image"

say "node 2 mounts the image lazily"
mkdir -p "$mnt"
node "$root/packages/cli/bin/p2p-mount.js" "$image" "$mnt" --socket "$work/node2.sock" >"$work/mount.log" 2>&1 &
pids+=($!)
wait_for "$work/mount.log" 'mounted' 120
cat "$work/mount.log" | sed 's/^/  /'

say "a command inside the image"
echo "$ chroot $mnt /bin/sh -c 'cat /hello.txt; ls /usr/bin; sha256sum /usr/bin/ls'"
chroot "$mnt" /bin/sh -c 'cat /hello.txt; ls /usr/bin; sha256sum /usr/bin/ls'

say "where node 2's bytes came from"
p2pctl --socket "$work/node2.sock" status --json | node -e '
let s = ""
process.stdin.on("data", (d) => (s += d)).on("end", () => {
  const { fetched } = JSON.parse(s).bytes
  const mib = (n) => `${((n ?? 0) / 1048576).toFixed(1)} MiB`
  console.log(`  from peers:    ${mib(fetched.peer)}`)
  console.log(`  from registry: ${mib(fetched.registry)}`)
})'
du -sh "$work/rootfs" | awk '{print "  (the whole image unpacked is " $1 ")"}'

say "done: stopping the nodes and removing $work"
