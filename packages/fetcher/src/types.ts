import type { AbortOptions, Chunk, Compression } from '@strata/stargz'

/** A chunk and where it lives: enough for any source to find it and for the fetcher to verify it. */
export interface ChunkRef extends Chunk {
  /** The layer blob's digest (the layer's key on the DHT and in the registry). */
  layer: string
  compression: Compression
}

/**
 * Somewhere chunks can come from (peers, the registry). Returns bytes UNVERIFIED: the fetcher
 * checks sha256(bytes) === chunk.digest before anyone sees them. `undefined` means "I do not have it".
 */
export interface ChunkSource {
  readonly name: string
  get(chunk: ChunkRef, options?: AbortOptions): Promise<Uint8Array | undefined>
  /** Optional batched form: yields the chunks it could get, in any order. */
  getMany?(chunks: ChunkRef[], options?: AbortOptions): AsyncIterable<{ chunk: ChunkRef; bytes: Uint8Array }>
  /** Told when bytes from this source failed verification. */
  reportBad?(chunk: ChunkRef, reason: string): void
}
