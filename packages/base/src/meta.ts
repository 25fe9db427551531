// The key spaces of the chunk store's metadata (ChunkStore.getMeta/putMeta): one table, so that no two modules
// write under one key and an operator reading a store knows what each key holds. Keys are stable across
// versions: a store outlives upgrades.

export const META = {
  /** An image reference resolved for a platform: the manifest it named last (fetcher, for outages). */
  image: (ref: string, platform: string | undefined) => `image/${platform ?? ''}@${ref}`,
  /** A layer's TOC JSON as fetched or synthesized (fetcher). */
  toc: (layer: string) => `toc/${layer}`,
  /** A layer's record: format, TOC digest, verification (fetcher). */
  layer: (layer: string) => `layer/${layer}`,
  /** The mirror's index of a blob's chunks (node's P2P mirror). */
  mirrorBlob: (digest: string) => `mirror/blob/${digest}`,
  /** The manifest a tag named when the mirror last served it (node's P2P mirror). */
  mirrorManifest: (ref: string) => `mirror/manifest/${ref}`,
  /** The coarse DHT keys (layers) this node announces, to announce again at start (node). */
  nodeCoarse: 'node/coarse-keys',
  /** The images this node opened, for `p2pctl images` (node). */
  nodeImages: 'node/images'
} as const
