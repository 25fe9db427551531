// The layer store's contract (layer-store.ts mounts it; layer-store-fs.ts and layer-store-session.ts serve it).
import type { AbortOptions } from '@strata/base'
import type { TOC } from '@strata/stargz'
import type { ReadFailure } from './operations.js'
import type { LayerReader } from './serve.js'

/** One layer of an opened image, as the fetcher's ImageLayer has it (structurally: fs does not import the fetcher). */
export interface StoreLayer {
  digest: string
  descriptor: { size: number; annotations?: Record<string, string> }
  format: string
  toc: TOC
  tocDigest: string
  /** The manifest vouches for the TOC. */
  verified: boolean
  compression: string
}

export interface StoreImage<L extends StoreLayer> {
  digest: string
  config: { digest: string }
  layers: readonly L[]
}

/** What the store reads through: in p2pd, its node (images, chunks) and the registry (the config, the blob). */
export interface LayerStoreSource<L extends StoreLayer> {
  /** Opens the image a reference names now (p2pd: as a local caller). */
  openImage(ref: string, options?: AbortOptions): Promise<StoreImage<L>>
  /** A small blob read whole and digest-checked: the image config, for its diff IDs. */
  fetchBlob(ref: string, digest: string, options?: AbortOptions): Promise<Uint8Array>
  /** `length` bytes of the compressed layer blob from `offset` (fewer at its end). */
  readBlob(ref: string, layer: L, offset: number, length: number, options?: AbortOptions): Promise<Uint8Array>
  fetcher: LayerReader<L>
}

export interface LayerStoreInit<L extends StoreLayer> {
  source: LayerStoreSource<L>
  /** The directory to mount the store on (created when missing; a store left mounted there is unmounted). */
  mountpoint: string
  /** What happened: images opened, layers used and released, failures (one line each). */
  log?: (message: string) => void
  /** A read of a layer's file failed and the reader got EIO. */
  onError?: (failure: ReadFailure) => void
  /** Each FUSE request, one line on stderr. */
  debug?: boolean
  /**
   * How long opening an image for a lookup may take (default 5 min: layers that are not eStargz are downloaded
   * whole first). podman's stat waits that long; when it fails, podman pulls the layers itself.
   */
  openTimeoutMs?: number
}

export interface LayerStoreStats {
  /** Images opened for lookups. */
  images: number
  /** Layer directories looked up. */
  layers: number
  /** `use` files podman created (layers it took) and layer directories it removed (let go). */
  uses: number
  releases: number
  /** Bytes read from `blob` files, and from files under `diff`. */
  blobBytes: number
  diffBytes: number
}

export interface LayerStore {
  readonly mountpoint: string
  stats(): LayerStoreStats
  /** Unmounts (lazily: a store in use by containers goes too; their reads fail from then on). */
  unmount(): Promise<void>
}
