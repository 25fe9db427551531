#!/usr/bin/env bash
# host-rootfs.sh DIR PROGRAM...: a minimal root file system made of this machine's programs and the libraries
# `ldd` lists for them (paths kept), plus /etc/os-release. Enough to chroot into and run those programs.
set -euo pipefail
dir=$1; shift
mkdir -p "$dir"/{etc,tmp,proc,dev}
copy() { mkdir -p "$dir$(dirname "$1")"; cp -L --preserve=mode "$1" "$dir$1"; }
for prog in "$@"; do
  path=$(command -v "$prog")
  copy "$path"
  ldd "$path" 2>/dev/null | grep -oE '/[^ ]+' | while read -r lib; do [ -e "$lib" ] && copy "$lib"; done
done
cp /etc/os-release "$dir/etc/os-release"
# Debian merges /bin into /usr/bin: keep the /bin/sh path working inside the image.
[ -e "$dir/bin" ] || ln -s usr/bin "$dir/bin"
