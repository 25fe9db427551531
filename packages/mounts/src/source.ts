import type { AbortOptions } from '@strata/base'
import type { FetchEvent, Image, ImageLayer } from '@strata/fetcher'
import type { LayerReader } from '@strata/fs'

/**
 * Where mounts get their images and read them: p2pd passes its node (the store, then peers, then the registry);
 * embedded p2p-mount a fetcher of its own store and the registry. The service imports neither.
 */
export interface ImageSource {
  openImage(ref: string, options?: OpenImageOptions): Promise<Image>
  /** Reads the mounts' files, and fetches an image's prioritized files (`prefetch`). */
  readonly fetcher: MountReader
}

export interface OpenImageOptions extends AbortOptions {
  /** The registry could not be reached and the image `ref` named before is used: why, for the operator. */
  onStale?: (message: string) => void
  /** What opening says as it goes, for a progress display. */
  onProgress?: (progress: OpenProgress) => void
}

/** The fetcher's events while an image opens, and first the manifest resolved (its layers' digests, lowest first). */
export type OpenProgress = FetchEvent | { type: 'image:resolved'; ref: string; layers: string[] }

export interface MountReader extends LayerReader<ImageLayer> {
  prefetch(image: Image, options?: AbortOptions): Promise<void>
}
