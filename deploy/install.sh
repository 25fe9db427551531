#!/usr/bin/env bash
# Installs strata on this machine from this checkout: dependencies and build (scripts/setup.sh), the code under
# /opt/strata, p2pd / p2pctl / p2p-mount in /usr/local/bin, and the p2pd systemd unit (enabled and started).
# Run as root. Re-running upgrades in place; /etc/strata/p2pd.env is kept if it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (it installs a systemd unit and mounts FUSE file systems)" >&2; exit 1; }
PREFIX=${PREFIX:-/opt/strata}

./scripts/setup.sh
echo "== installing into $PREFIX"
mkdir -p "$PREFIX"
# A self-contained copy with production dependencies only.
rm -rf "$PREFIX.new"
pnpm --filter @strata/cli deploy --prod --legacy "$PREFIX.new" >/dev/null
rm -rf "$PREFIX.old"; [ -d "$PREFIX" ] && mv "$PREFIX" "$PREFIX.old"; mv "$PREFIX.new" "$PREFIX"; rm -rf "$PREFIX.old"
for bin in p2pd p2pctl p2p-mount; do
  printf '#!/bin/sh\nexec /usr/local/bin/node %s/bin/%s.js "$@"\n' "$PREFIX" "$bin" > "/usr/local/bin/$bin"
  chmod 755 "/usr/local/bin/$bin"
done

mkdir -p /etc/strata
[ -f /etc/strata/p2pd.env ] || install -m 0640 deploy/systemd/p2pd.env /etc/strata/p2pd.env
install -m 0644 deploy/systemd/p2pd.service /etc/systemd/system/p2pd.service
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable --now p2pd.service
  systemctl --no-pager status p2pd.service | head -5
else
  echo "systemd is not running here: start p2pd by hand (p2pd --help)"
fi
echo "installed: $(command -v p2pd) $(command -v p2pctl) $(command -v p2p-mount)"
