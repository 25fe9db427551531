import { createHash, randomBytes } from 'node:crypto'
import type { RegistryClient } from '../src/index.js'

/** Test fixtures: blobs and manifests pushed with the client under test. */
export const sha = (b: Uint8Array | string) => `sha256:${createHash('sha256').update(b).digest('hex')}`

export interface PushedImage {
  digest: string
  manifestBytes: Uint8Array
  config: Uint8Array
  layers: Uint8Array[]
}

/** Pushes an OCI image of random layers (not real tars: the client does not look inside). */
export async function pushImage(
  client: RegistryClient,
  ref: string,
  layerSizes: number[],
  extra: { architecture?: string; layerAnnotations?: Record<string, string> } = {}
): Promise<PushedImage> {
  const layers = layerSizes.map((n) => new Uint8Array(randomBytes(n)))
  const config = new TextEncoder().encode(
    JSON.stringify({
      architecture: extra.architecture ?? 'amd64',
      os: 'linux',
      rootfs: { type: 'layers', diff_ids: layers.map(sha) }
    })
  )
  for (const l of layers) await client.pushBlob(ref, sha(l), l)
  await client.pushBlob(ref, sha(config), config)
  const manifest = {
    schemaVersion: 2,
    mediaType: 'application/vnd.oci.image.manifest.v1+json',
    config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: sha(config), size: config.length },
    layers: layers.map((l) => ({
      mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip',
      digest: sha(l),
      size: l.length,
      ...(extra.layerAnnotations !== undefined ? { annotations: extra.layerAnnotations } : {})
    }))
  }
  const manifestBytes = new TextEncoder().encode(JSON.stringify(manifest))
  const digest = await client.putManifest(ref, manifestBytes, manifest.mediaType)
  return { digest, manifestBytes, config, layers }
}
