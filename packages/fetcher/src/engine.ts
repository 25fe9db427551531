import type { AbortOptions } from '@strata/base'
import { verifyChunk } from '@strata/stargz'
import type { ChunkStore } from '@strata/store'
import { describe, mapLimit, raceSignal } from './async.js'
import { type BatchEngine, HedgedBatch } from './batch.js'
import { ByteBudget } from './budget.js'
import {
  DEFAULT_HEDGE_DELAY_MS,
  DEFAULT_SOURCE_TIMEOUT_MS,
  DEFAULT_STALLED_TIMEOUT_MS,
  type Liveness,
  newLiveness
} from './liveness.js'
import { Metrics } from './metrics.js'
import type {
  ChunkEngine,
  ChunkEvent,
  ChunkRef,
  ChunkSource,
  FetcherMetrics,
  GetManyOptions,
  GetOptions,
  Route
} from './types.js'

export interface ChunkEngineInit {
  store: ChunkStore
  /** Asked in order (e.g. peers, then the registry). */
  sources: ChunkSource[]
  /** When a source has delivered nothing for this long, what it still owes is asked of the next one too (one more source at a time). Default 300 ms. */
  hedgeDelayMs?: number
  /**
   * A liveness timeout: a source asked for chunks is given up for them (the next source is asked, or the read
   * fails) once it has made no progress for this long: no verified chunk and no bytes arriving, for any
   * request of this fetcher. A slow but moving source is never given up. Default 24 s (see stallBound).
   */
  sourceTimeoutMs?: number
  /**
   * A source given up for making no progress is stalled until it delivers a chunk, for at most the next
   * sourceTimeoutMs: every ask to it is given up after this long without progress, those waiting already at
   * once. The kernel asks again for a read that failed: its retry fails as fast, instead of waiting out the
   * timeout again (and a source that recovered shows it within this long). Default 1 s.
   */
  stalledTimeoutMs?: number
  /**
   * When the bytes the last source gave for a chunk fail their check (a digest that does not match, a compressed
   * member that does not inflate: a byte flipped on the way), it is asked again for that chunk this many times
   * before the chunk is unavailable. Default 2. (An earlier source is not asked again: the next one is.)
   */
  badBytesRetries?: number
  /** Per-chunk requests in flight for one batch, to sources without `getMany`. Default 8. */
  concurrency?: number
  /** Told of bad bytes from a source and of store failures (the Fetcher dispatches them as events). */
  onEvent?(event: ChunkEvent): void
  /** The counters to count in (the Fetcher shares its engine's with its reader). Default: the engine's own. */
  counters?: Metrics
}

/**
 * What ensure (read-ahead, prefetch) asks for at once, and holds in memory until it is stored: windows of up to
 * 8 MiB (the registry source's longest Range read), 32 MiB in flight per prefetch, 16 MiB for all read-aheads
 * together (four 4 MiB chunks ahead of a sequential reader: 128 ms of a 1 Gbit/s link; the mount's reads join what
 * is in flight). 64 MiB per read-ahead, four at once, made read-ahead alone able to hold 256 MiB.
 */
const ENSURE_WINDOW_BYTES = 8 * 1024 * 1024
const ENSURE_IN_FLIGHT_BYTES = 32 * 1024 * 1024
export const READ_AHEAD_IN_FLIGHT_BYTES = 16 * 1024 * 1024

/** Store lookups of one batch in flight at once. */
const LOOKUPS_IN_FLIGHT = 16

/** THE check of bytes against the chunk a source was asked for (size and sha256); the reason when it fails. */
function verify(chunk: ChunkRef, bytes: Uint8Array): string | undefined {
  try {
    verifyChunk(bytes, chunk)
    return undefined
  } catch (err) {
    return describe(err)
  }
}

export function sum(refs: ChunkRef[]): number {
  return refs.reduce((a, r) => a + r.size, 0)
}

/** The chunk engine: store, then single flight, then hedged batches to the sources; every byte checked here. */
class Engine implements ChunkEngine, BatchEngine {
  readonly store: ChunkStore
  readonly sources: ChunkSource[]
  readonly counters: Metrics
  readonly limits: BatchEngine['limits']
  private readonly hedgeDelayMs: number
  private readonly onEvent: (event: ChunkEvent) => void
  private readonly inflight = new Map<string, Promise<Uint8Array>>()
  /** Digests in flight that a later caller joined (a getMany with cancelOnAbort does not give those up). */
  private readonly joined = new Set<string>()
  /** How each source is doing: see Liveness. */
  private readonly live = new Map<ChunkSource, Liveness>()

  constructor(init: ChunkEngineInit) {
    this.store = init.store
    this.sources = init.sources
    this.counters = init.counters ?? new Metrics()
    this.hedgeDelayMs = init.hedgeDelayMs ?? DEFAULT_HEDGE_DELAY_MS
    this.limits = {
      sourceTimeoutMs: init.sourceTimeoutMs ?? DEFAULT_SOURCE_TIMEOUT_MS,
      stalledTimeoutMs: init.stalledTimeoutMs ?? DEFAULT_STALLED_TIMEOUT_MS,
      badBytesRetries: init.badBytesRetries ?? 2,
      concurrency: init.concurrency ?? 8
    }
    this.onEvent = init.onEvent ?? (() => {})
  }

  metrics(): FetcherMetrics {
    return this.counters.snapshot()
  }

  async get(chunk: ChunkRef, options: GetOptions = {}): Promise<Uint8Array> {
    const cached = await this.fromStore(chunk, options)
    if (cached !== undefined) return cached
    return raceSignal(
      this.join(chunk, () => this.batch([chunk], undefined, options.route).results.get(chunk.digest)!),
      options.signal
    )
  }

  getMany(chunks: ChunkRef[], options: GetManyOptions = {}): Promise<Uint8Array[]> {
    return Promise.all(this.getEach(chunks, options))
  }

  getEach(chunks: ChunkRef[], options: GetManyOptions = {}): Array<Promise<Uint8Array>> {
    const unique = [...new Map(chunks.map((c) => [c.digest, c])).values()]
    const byDigest = new Map(unique.map((c) => [c.digest, Promise.withResolvers<Uint8Array>()]))
    const settle = (digest: string, p: Promise<Uint8Array>) => {
      const { resolve, reject } = byDigest.get(digest)!
      p.then(resolve, reject)
    }
    const { signal, route } = options
    let stop: (() => void) | undefined
    const start = async () => {
      // A chunk found in the store settles at once; the rest wait for the lookups, then go in one batch.
      const cached = await mapLimit(unique, LOOKUPS_IN_FLIGHT, async (chunk) => {
        const bytes = await this.fromStore(chunk, options)
        if (bytes !== undefined) byDigest.get(chunk.digest)!.resolve(bytes)
        return bytes
      })
      const missing: ChunkRef[] = []
      unique.forEach((chunk, i) => {
        if (cached[i] !== undefined) return
        if (this.inflight.has(chunk.digest))
          settle(
            chunk.digest,
            this.join(chunk, () => this.batch([chunk], undefined, route).results.get(chunk.digest)!)
          )
        else missing.push(chunk)
      })
      if (missing.length === 0) return
      const batch = this.batch(missing, options.hedgeDelayMs, route)
      for (const chunk of missing)
        settle(
          chunk.digest,
          this.join(chunk, () => batch.results.get(chunk.digest)!)
        )
      if (options.cancelOnAbort === true && signal !== undefined) {
        // What this call started and nobody joined since is given up with it.
        stop = () => {
          for (const chunk of missing) if (!this.joined.has(chunk.digest)) batch.cancel(chunk.digest, signal.reason)
        }
        if (signal.aborted) stop()
        else signal.addEventListener('abort', stop, { once: true })
      }
    }
    // A failed lookup (only when `signal` aborts) fails what it had not found.
    start().catch((err: unknown) => {
      for (const { reject } of byDigest.values()) reject(err)
    })
    const inner = [...byDigest.values()].map((d) => d.promise)
    // Chunks a caller stops waiting for still land in the store for the next reader (unless cancelOnAbort).
    void Promise.allSettled(inner).finally(() => {
      if (stop !== undefined) signal?.removeEventListener('abort', stop)
    })
    const results = new Map(
      unique.map((c) => {
        const p = raceSignal(byDigest.get(c.digest)!.promise, signal)
        p.catch(() => {})
        return [c.digest, p]
      })
    )
    return chunks.map((c) => results.get(c.digest)!)
  }

  async missing(chunks: ChunkRef[], options: AbortOptions = {}): Promise<ChunkRef[]> {
    const unique = [...new Map(chunks.map((c) => [c.digest, c])).values()]
    // A store that fails to answer does not hold the chunk, as far as its reader can tell.
    const present = await mapLimit(unique, LOOKUPS_IN_FLIGHT, (c) =>
      this.store.has(c.digest, options).catch(() => {
        options.signal?.throwIfAborted()
        return false
      })
    )
    return unique.filter((_, i) => !present[i])
  }

  /**
   * Gets the chunks the store does not have into it, without reading those it has (a read-ahead or prefetch
   * of a file already stored costs lookups only). Returns the bytes of the chunks that were missing.
   *
   * In windows of at most ENSURE_WINDOW_BYTES, each taking its bytes from `budget` until it is stored: a getMany
   * keeps every chunk's bytes until the last of its batch is in, and one batch of a whole file or of a layer's
   * prioritized files held all of them in memory at once (a 250 MB image read through a mount left p2pd 190 MB
   * larger, mostly this and the chunk buffer).
   */
  async ensure(
    chunks: ChunkRef[],
    options: AbortOptions = {},
    budget = new ByteBudget(ENSURE_IN_FLIGHT_BYTES)
  ): Promise<number> {
    // A store that fails to answer counts as not having the chunk: getMany then sorts it out.
    const missing = await this.missing(chunks, options)
    const windows: ChunkRef[][] = []
    const most = Math.min(ENSURE_WINDOW_BYTES, budget.max)
    let bytes = Number.POSITIVE_INFINITY
    for (const c of missing) {
      if (bytes + c.size > most) {
        windows.push([])
        bytes = 0
      }
      windows.at(-1)!.push(c)
      bytes += c.size
    }
    const running = new Set<Promise<void>>()
    let failure: { err: unknown } | undefined
    for (const window of windows) {
      if (failure !== undefined) break
      const size = sum(window)
      await budget.take(size, options.signal)
      const p: Promise<void> = this.getMany(window, options).then(
        () => {},
        (err: unknown) => {
          failure ??= { err }
        }
      )
      const done = p.finally(() => {
        budget.give(size)
        running.delete(done)
      })
      running.add(done)
    }
    await Promise.all(running)
    if (failure !== undefined) throw failure.err
    return sum(missing)
  }

  liveness(source: ChunkSource): Liveness {
    let live = this.live.get(source)
    if (live === undefined) {
      live = newLiveness()
      this.live.set(source, live)
    }
    return live
  }

  /** THE choke point: bytes from `source` are checked here; a failure is counted, reported and returned as a reason. */
  check(source: ChunkSource, chunk: ChunkRef, bytes: Uint8Array): string | undefined {
    const bad = verify(chunk, bytes)
    if (bad !== undefined) return this.badBytes(source, chunk, bad)
    const m = this.counters.source(source.name)
    m.chunks++
    m.bytes += bytes.byteLength
    return undefined
  }

  /** Bytes from `source` that are not `chunk`: counted, reported and returned as the attempt's reason. */
  badBytes(source: ChunkSource, chunk: ChunkRef, reason: string): string {
    this.counters.verificationFailure(source.name)
    source.reportBad?.(chunk, reason)
    this.onEvent({ type: 'chunk:bad', digest: chunk.digest, layer: chunk.layer.digest, source: source.name, reason })
    return `${source.name}: bad bytes (${reason})`
  }

  /**
   * Keeps verified bytes in the store. A store that fails (a full disk) does not fail the read: the bytes are
   * good; the failure is counted and announced.
   */
  async keep(chunk: ChunkRef, bytes: Uint8Array): Promise<void> {
    try {
      await this.store.put(chunk.digest, bytes, { layer: chunk.layer.digest })
    } catch (err) {
      this.counters.source('store').errors++
      this.onEvent({ type: 'store:error', digest: chunk.digest, message: describe(err) })
    }
  }

  /** The chunk from the store; a store that fails to read counts as a miss (the sources still have it). */
  private async fromStore(chunk: ChunkRef, options: AbortOptions): Promise<Uint8Array | undefined> {
    const m = this.counters.source('store')
    m.requests++
    const bytes = await this.store.get(chunk.digest, options).catch((err: unknown) => {
      options.signal?.throwIfAborted()
      m.errors++
      this.onEvent({ type: 'store:error', digest: chunk.digest, message: describe(err) })
      return undefined
    })
    if (bytes === undefined) {
      m.misses++
      return undefined
    }
    m.chunks++
    m.bytes += bytes.byteLength
    return bytes
  }

  /**
   * Single flight: one fetch per digest at a time; later callers share its result. A caller that joins a fetch in
   * flight joins it as it was started: with the first caller's route and hedge delay.
   */
  private join(chunk: ChunkRef, start: () => Promise<Uint8Array>): Promise<Uint8Array> {
    const running = this.inflight.get(chunk.digest)
    if (running !== undefined) {
      this.counters.singleFlightJoins++
      this.joined.add(chunk.digest)
      return running
    }
    const p = start().finally(() => {
      this.inflight.delete(chunk.digest)
      this.joined.delete(chunk.digest)
    })
    this.inflight.set(chunk.digest, p)
    return p
  }

  private batch(chunks: ChunkRef[], hedgeDelayMs = this.hedgeDelayMs, route?: Route): HedgedBatch {
    return new HedgedBatch(this, chunks, hedgeDelayMs, route)
  }
}

export function createChunkEngine(init: ChunkEngineInit): ChunkEngine {
  return new Engine(init)
}
