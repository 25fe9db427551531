import type { Entry } from '@strata/stargz'
import { ByteBudget } from './budget.js'
import { chunkRef } from './chunk-ref.js'
import type { ChunkEngine, ImageLayer } from './types.js'

export interface ReadAheadLimits {
  /** At most this many bytes of the rest of a file per read-ahead; 0 disables. */
  bytes: number
  /** Read-aheads running at once; more are dropped, not queued. */
  concurrency: number
  /** Chunk bytes all read-aheads together have in flight (see READ_AHEAD_IN_FLIGHT_BYTES). */
  inFlightBytes: number
}

/**
 * THE read-ahead of a file reader: after the first read of a file, its next chunks (up to `bytes`) into the store
 * in the background, and the next ones again once a reader has passed the middle of those: bounded in bytes, in
 * bytes in flight and in count. Chunks are in memory only as they arrive; a reader then finds them in the store
 * and reads them in place.
 */
export class ReadAhead {
  private readonly engine: Pick<ChunkEngine, 'ensure'>
  private readonly limits: ReadAheadLimits
  /** Per file read: the chunk index its last read-ahead started at, and the one it ended before. */
  private readonly done = new Map<string, { from: number; end: number }>()
  private running = 0
  /** The bytes read-aheads may have in flight, shared by all of them. */
  private readonly budget: ByteBudget

  constructor(engine: Pick<ChunkEngine, 'ensure'>, limits: ReadAheadLimits) {
    this.engine = engine
    this.limits = limits
    this.budget = new ByteBudget(limits.inFlightBytes)
  }

  /** A reader of `entry` is about to read its chunk `from`. */
  after(layer: ImageLayer, entry: Entry, from: number): void {
    const key = `${layer.digest}\0${entry.path}`
    if (this.limits.bytes <= 0 || from >= entry.chunks.length) return
    const done = this.done.get(key)
    if (done !== undefined && (from < (done.from + done.end) / 2 || done.end >= entry.chunks.length)) return
    if (this.running >= this.limits.concurrency) return
    const start = done === undefined ? from : Math.max(from, done.end)
    // A bounded memory of files read: forgetting one only costs a repeated read-ahead of chunks now in the store.
    if (this.done.size >= 10_000) this.done.clear()
    const refs = []
    let bytes = 0
    for (const c of entry.chunks.slice(start)) {
      if (bytes + c.size > this.limits.bytes) break
      bytes += c.size
      refs.push(chunkRef(layer, c))
    }
    this.done.set(key, { from: start, end: start + refs.length })
    if (refs.length === 0) return
    this.running++
    this.engine
      .ensure(refs, {}, this.budget)
      .catch(() => {
        // A failed read-ahead is only a missed optimisation: the chunks are fetched again when read.
      })
      .finally(() => {
        this.running--
      })
  }
}
