#!/usr/bin/env bash
# The test command: set-up (idempotent), lint, type check, then every test. Run as root: FUSE tests mount.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="/usr/local/bin:$PATH"
echo; echo "== lint"; pnpm run lint
echo; echo "== typecheck"; pnpm run typecheck
echo; echo "== tests"; pnpm exec vitest run "$@"
