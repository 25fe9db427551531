// The image level: opened images and their layers, prefetch, and the Fetcher that composes the levels.
import type { AbortOptions } from '@strata/base'
import type { Descriptor } from '@strata/registry'
import type { Compression, TOC } from '@strata/stargz'
import type { ChunkEvent, LayerRef } from './chunk-types.js'

export type { Descriptor }

/** How a layer is served: lazily from its own TOC (eStargz family) or from a local index built after a whole download. */
export type ImageLayerFormat = 'estargz' | 'stargz' | 'zstd:chunked' | 'indexed'

/** One layer of an opened image, ready to read files from. */
export interface ImageLayer {
  descriptor: Descriptor
  /** The layer blob's digest. */
  digest: string
  /** The blob and the repository it was opened from: what every ChunkRef of this layer carries. */
  ref: LayerRef
  format: ImageLayerFormat
  toc: TOC
  /** sha256 of the TOC JSON bytes (for `indexed` layers: of the synthesized TOC). */
  tocDigest: string
  /** True when the TOC is vouched for by the manifest (TOC-digest annotation, or the layer digest for indexed layers). */
  verified: boolean
  /** How the blob is compressed. */
  compression: Compression | 'none'
}

/** An opened image: its manifest digest, config and layers (lowest first). */
export interface Image {
  ref: string
  digest: string
  config: Descriptor
  layers: ImageLayer[]
}

/** Progress and warnings of `openImage`, `prefetch` and reads; as `onProgress` callbacks and Fetcher events. */
export type FetchEvent =
  | { type: 'layer:toc'; layer: string; format: ImageLayerFormat; cached: boolean }
  | { type: 'layer:unverified'; layer: string; message: string }
  | { type: 'layer:download'; layer: string; bytes: number; total: number }
  | { type: 'layer:indexed'; layer: string; files: number; chunks: number }
  | { type: 'prefetch'; layer: string; bytes: number; total: number }
  | { type: 'image:stale'; ref: string; digest: string; message: string }
  | ChunkEvent

export interface PrefetchOptions extends AbortOptions {
  /** Also fetch every other chunk of every layer, at most this many bytes per second (0: no background fetch). */
  wholeLayerBytesPerSecond?: number
}
