#!/bin/sh
# Compiles strata.c into dist/strata.node against the headers of the node that runs the build. N-API only, so
# the addon needs no node-gyp, no download, and keeps working across Node upgrades (the ABI is stable).
set -eu
cd "$(dirname "$0")/.."
node_bin=$(command -v node)
include="$(dirname "$(readlink -f "$node_bin")")/../include/node"
[ -f "$include/node_api.h" ] || { echo "build.sh: no node_api.h under $include (install Node with its headers)" >&2; exit 1; }
mkdir -p dist
cc=${CC:-$(command -v cc || command -v gcc || echo "g++ -x c")}
$cc -O2 -Wall -Wextra -Werror -fPIC -shared -I"$include" -o dist/strata.node.tmp src/strata.c
mv dist/strata.node.tmp dist/strata.node
