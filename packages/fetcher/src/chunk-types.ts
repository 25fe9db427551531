// The chunk level: chunks, where they come from, and the engine that gets them verified into the store.
import type { AbortOptions } from '@strata/base'
import type { Chunk, Compression } from '@strata/stargz'
import type { ByteBudget } from './budget.js'

/** A layer blob and where the registry serves it: what a source needs to find any chunk of it. */
export interface LayerRef {
  /** the layer blob's digest: its key on the DHT and in the store */
  digest: string
  /** where the registry serves it: "host[:port]/name" as in a Reference */
  repository: string
}

/** A chunk and where it lives: enough for any source to find it and for the fetcher to verify it. */
export interface ChunkRef extends Chunk {
  layer: LayerRef
  /**
   * How the layer blob is compressed. For eStargz layers [offset, end) are compressed members; for
   * `indexed` layers (plain tar layers fetched whole) they are offsets in the decompressed tar stream.
   */
  compression: Compression | 'none'
  /**
   * Set for chunks of an `indexed` layer: their offsets are in the decompressed tar stream, so the registry
   * cannot serve them by Range; a source reads the blob whole instead.
   */
  indexed?: true
}

/** How a request travels among peers. Sources read it; the fetcher passes it to every source it asks, untouched. */
export interface Route {
  /** Serving another node's forwarded request: sources must not forward it again; what is fetched is for that peer. */
  forwarded?: boolean
  /** The cluster to spread chunks over (a cluster warm-up) instead of the connected peers. */
  members?: readonly string[]
}

/** What the fetcher passes a source with each request. */
export interface SourceOptions extends AbortOptions {
  /** The route the caller of the fetch gave (see Route). */
  route?: Route
  /**
   * For a source to call whenever bytes towards what it was asked arrive, before a chunk is whole: the fetcher
   * gives a source up only when it has made no progress (no chunk, no call) for its timeout. Optional to call:
   * a source that does not is judged by the chunks it delivers.
   */
  onProgress?(): void
}

/**
 * Somewhere chunks can come from (peers, the registry). Returns bytes UNVERIFIED: the fetcher
 * checks sha256(bytes) === chunk.digest before anyone sees them. `undefined` means "I do not have it".
 */
export interface ChunkSource {
  readonly name: string
  get(chunk: ChunkRef, options?: SourceOptions): Promise<Uint8Array | undefined>
  /** Optional batched form: yields the chunks it could get, in any order. */
  getMany?(chunks: ChunkRef[], options?: SourceOptions): AsyncIterable<{ chunk: ChunkRef; bytes: Uint8Array }>
  /** Told when bytes from this source failed verification. */
  reportBad?(chunk: ChunkRef, reason: string): void
}

/** What the engine reports of chunks as it goes: bytes a source gave that were not the chunk, a store that failed. */
export type ChunkEvent =
  | { type: 'chunk:bad'; digest: string; layer: string; source: string; reason: string }
  | { type: 'store:error'; digest: string; message: string }

/** Counters and fixed-bucket latency histograms; a snapshot, safe to serialise. */
export interface FetcherMetrics {
  /**
   * Per source name, plus `store`: chunks and bytes served, requests made (a batched call counts once),
   * misses (`does not have it`), errors (for `store`: failed reads, which count as misses too, and failed writes).
   */
  sources: Record<string, { requests: number; chunks: number; bytes: number; misses: number; errors: number }>
  /** Chunks whose bytes failed sha256 verification, per source name. */
  verificationFailures: Record<string, number>
  /** Callers that joined an in-flight request instead of starting one. */
  singleFlightJoins: number
  /** Hedges started (the next source asked because the previous one was slow). */
  hedges: number
  /** Latency of a `get` that missed the store, by source that answered: bucket upper bounds in ms -> count. */
  latencyMs: Record<string, { buckets: Array<{ le: number; count: number }>; count: number; sumMs: number }>
}

/** Options of a fetch of chunks. */
export interface GetOptions extends AbortOptions {
  /**
   * Passed to every source this fetch asks. A caller that joins a chunk already in flight joins it as it was
   * started: with the first caller's route.
   */
  route?: Route
}

export interface GetManyOptions extends GetOptions {
  /**
   * This batch's hedge delay instead of the fetcher's: a warm-up, which is not waiting on a reader, can wait
   * longer on its peers before it also asks the registry.
   */
  hedgeDelayMs?: number
  /**
   * When `signal` aborts, the chunks this call started fetching and no other caller joined are given up (a
   * warm-up that failed or was stopped). By default they still land in the store for the next reader.
   */
  cancelOnAbort?: boolean
}

/**
 * The chunk engine: verified bytes of chunks, from the store, an in-flight request for the same digest (single
 * flight), or the sources in order, hedged (see HedgedBatch). Every byte a source gives is checked here.
 */
export interface ChunkEngine {
  /** Verified bytes of one chunk: from the store, an in-flight request for the same digest, or the sources in order. */
  get(chunk: ChunkRef, options?: GetOptions): Promise<Uint8Array>
  /** Verified bytes of many chunks (same order as asked), using the sources' batched form where they have one. */
  getMany(chunks: ChunkRef[], options?: GetManyOptions): Promise<Uint8Array[]>
  /**
   * getMany, chunk by chunk: one promise per chunk of `chunks` (same order), each settled as soon as that chunk is
   * verified and stored, or known unavailable, in one batch to the sources. Rejections are marked handled: a
   * caller may await only some. `getMany` is `Promise.all` of these.
   */
  getEach(chunks: ChunkRef[], options?: GetManyOptions): Array<Promise<Uint8Array>>
  /**
   * The chunks of `chunks` the store does not hold now (one lookup each, no read): what a warm-up left out
   * because the store could not keep it (a full disk, a cap smaller than the image).
   */
  missing(chunks: ChunkRef[], options?: AbortOptions): Promise<ChunkRef[]>
  /**
   * Gets the chunks the store lacks into it, reading none it has, in windows whose bytes in flight `budget` bounds
   * (default: 32 MiB for this call): what read-ahead and prefetch use. The bytes of the chunks that were missing.
   */
  ensure(chunks: ChunkRef[], options?: AbortOptions, budget?: ByteBudget): Promise<number>
  metrics(): FetcherMetrics
}
