#!/usr/bin/env bash
# make-image.sh ROOTFS_DIR OCI_DIR TAG: writes an OCI image layout holding ROOTFS_DIR as one gzip layer.
# Used by the quick start and benchmarks to build images without a Docker engine or the internet.
set -euo pipefail
rootfs=$1 oci=$2 tag=$3
mkdir -p "$oci/blobs/sha256"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
tar --format=pax --numeric-owner -C "$rootfs" -cf "$tmp/layer.tar" .
diff_id=$(sha256sum "$tmp/layer.tar" | cut -d' ' -f1)
gzip -n -6 -c "$tmp/layer.tar" > "$tmp/layer.tar.gz"
layer=$(sha256sum "$tmp/layer.tar.gz" | cut -d' ' -f1); layer_size=$(stat -c %s "$tmp/layer.tar.gz")
mv "$tmp/layer.tar.gz" "$oci/blobs/sha256/$layer"
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
printf '{"architecture":"%s","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"strata make-image.sh"}]}' \
  "$arch" "$diff_id" > "$tmp/config.json"
config=$(sha256sum "$tmp/config.json" | cut -d' ' -f1); config_size=$(stat -c %s "$tmp/config.json")
mv "$tmp/config.json" "$oci/blobs/sha256/$config"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%d}]}' \
  "$config" "$config_size" "$layer" "$layer_size" > "$tmp/manifest.json"
manifest=$(sha256sum "$tmp/manifest.json" | cut -d' ' -f1); manifest_size=$(stat -c %s "$tmp/manifest.json")
mv "$tmp/manifest.json" "$oci/blobs/sha256/$manifest"
printf '{"imageLayoutVersion":"1.0.0"}' > "$oci/oci-layout"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
  "$manifest" "$manifest_size" "$tag" > "$oci/index.json"
echo "sha256:$manifest"
