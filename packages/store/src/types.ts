/** The chunk store contract: chunks by `sha256:<hex>` digest of their bytes. Both implementations pass one suite. */

export interface AbortOptions {
  signal?: AbortSignal
}

export interface PutOptions extends AbortOptions {
  /** The layer (blob digest) this chunk belongs to: recorded in the index. */
  layer?: string
}

export interface StoreStats {
  chunks: number
  bytes: number
  /** The size cap (Infinity when none). */
  maxBytes: number
  hits: number
  misses: number
  evictions: number
  pinned: number
}

/**
 * Events: `put` (detail: { digest, size, layer? }) after a chunk is stored, and `evict`
 * (detail: { digests }) after chunks were removed by the size cap or gc.
 */
export interface ChunkStore extends EventTarget {
  /** The bytes, or undefined on a miss. Callers have verified what they put; the store does not re-hash on get. */
  get(digest: string, options?: AbortOptions): Promise<Uint8Array | undefined>
  has(digest: string, options?: AbortOptions): Promise<boolean>
  /** Stores bytes the caller has verified against `digest`. Idempotent. May evict others to stay under the cap. */
  put(digest: string, bytes: Uint8Array, options?: PutOptions): Promise<void>
  delete(digest: string, options?: AbortOptions): Promise<boolean>
  /** Every stored digest. */
  keys(options?: AbortOptions): AsyncIterable<string>
  stats(options?: AbortOptions): Promise<StoreStats>
  /** Pinned chunks are never evicted. `name` is the pin's owner (e.g. an image digest or a mount). */
  pin(name: string, digests: Iterable<string>, options?: AbortOptions): Promise<void>
  unpin(name: string, options?: AbortOptions): Promise<void>
  /** Small metadata by key (cached TOCs, manifests, layer indexes). */
  getMeta(key: string, options?: AbortOptions): Promise<Uint8Array | undefined>
  putMeta(key: string, value: Uint8Array, options?: AbortOptions): Promise<void>
  close(): Promise<void>
}
