import type { AbortOptions } from '@strata/base'
import type { Chunk, Entry } from '@strata/stargz'
import type { ChunkStore } from '@strata/store'
import { describe } from './async.js'
import { ChunkBuffer } from './chunk-buffer.js'
import { chunkRef } from './chunk-ref.js'
import { READ_AHEAD_IN_FLIGHT_BYTES } from './engine.js'
import { Metrics } from './metrics.js'
import { ReadAhead } from './read-ahead.js'
import type { ChunkEngine, ChunkEvent, FileReader, ImageLayer } from './types.js'

export interface FileReaderInit {
  /** Where chunks not in the store come from. */
  engine: ChunkEngine
  /** The engine's store: read in place when it has the chunks. */
  store: ChunkStore
  /** After the first read of a file, at most this many bytes of the rest of it are fetched in the background. Default 64 MiB; 0 disables. */
  readAheadBytes?: number
  /** Read-aheads running at once; more are dropped, not queued. Default 4. */
  readAheadConcurrency?: number
  /**
   * Chunk bytes all read-aheads together have in flight (being fetched, checked and stored), in windows of up to
   * 8 MiB: what read-ahead can hold in memory at once. Default 16 MiB (see READ_AHEAD_IN_FLIGHT_BYTES).
   */
  readAheadInFlightBytes?: number
  /**
   * Memory for whole chunks being read (default 32 MiB, see CHUNK_BUFFER_BYTES), shared by every reader of this
   * one (all the mounts of a p2pd). The kernel reads at most 1 MiB at a time; a chunk is usually MiBs, and
   * without this every piece of a chunk not yet stored would fetch (and copy) the whole chunk again. Chunks no read
   * touched for `chunkBufferIdleMs` (default 10 s) are let go: an idle or ended mount holds none.
   */
  chunkBufferBytes?: number
  chunkBufferIdleMs?: number
  /** Told of store failures (the Fetcher dispatches them as events). */
  onEvent?(event: ChunkEvent): void
  /** Where reads in place are counted, as the `store` source (the Fetcher shares its engine's). */
  counters?: Metrics
}

/**
 * The chunk buffer's bound. A sequential reader needs the chunk it is in; pieces of a chunk that fell out are read
 * from the store in place. 64 MiB, mostly chunks of files already read to their end, was a third of what p2pd kept
 * after reading a 250 MB image through a mount.
 */
const CHUNK_BUFFER_BYTES = 32 * 1024 * 1024
const CHUNK_BUFFER_IDLE_MS = 10_000
/** Chunks larger than this (a whole-file chunk of a legacy layer) are fetched for each read, not buffered. */
const MAX_BUFFERED_CHUNK = 16 * 1024 * 1024

/**
 * Chunks after a read in place that the store is asked to check ahead of the reader. A first read through FUSE of
 * a file whose chunk files were not in the page cache measured 0.34x the unchecked read with none, 0.45x with
 * one, 0.50x with two (cached: 0.34x, 0.33x, 0.35x: there the hash, 1.7 GB/s, is slower than the read).
 */
const VERIFY_AHEAD = 2

/** Reads files of a layer: the chunk arithmetic, the store's in-place fast path, the chunk buffer, read-ahead. */
class Reader implements FileReader {
  private readonly engine: ChunkEngine
  private readonly store: ChunkStore
  private readonly counters: Metrics
  private readonly onEvent: (event: ChunkEvent) => void
  private readonly buffer: ChunkBuffer
  private readonly readAhead: ReadAhead

  constructor(init: FileReaderInit) {
    this.engine = init.engine
    this.store = init.store
    this.counters = init.counters ?? new Metrics()
    this.onEvent = init.onEvent ?? (() => {})
    this.buffer = new ChunkBuffer(
      init.chunkBufferBytes ?? CHUNK_BUFFER_BYTES,
      init.chunkBufferIdleMs ?? CHUNK_BUFFER_IDLE_MS
    )
    this.readAhead = new ReadAhead(init.engine, {
      bytes: init.readAheadBytes ?? 64 * 1024 * 1024,
      concurrency: init.readAheadConcurrency ?? 4,
      inFlightBytes: init.readAheadInFlightBytes ?? READ_AHEAD_IN_FLIGHT_BYTES
    })
  }

  async readRange(
    layer: ImageLayer,
    entry: Entry,
    offset: number,
    into: Uint8Array,
    options: AbortOptions = {}
  ): Promise<number> {
    options.signal?.throwIfAborted()
    const end = Math.min(entry.size, offset + into.length)
    if (offset >= end) return 0
    const out = into.length === end - offset ? into : into.subarray(0, end - offset)
    const first = layer.toc.chunkIndexAt(entry, offset)
    const last = layer.toc.chunkIndexAt(entry, end - 1)
    if (first < 0 || last < 0) throw new RangeError(`${entry.path}: [${offset}, ${end}) is outside its chunks`)
    const touched = entry.chunks.slice(first, last + 1)
    // Straight from the store, with no chunk in memory, unless every chunk is in the buffer already (being fetched
    // for another piece of it, or read just now).
    if (!touched.every((c) => this.buffer.has(c)) && (await this.inPlace(touched, offset, out, options))) {
      this.verifyAhead(entry, last + 1)
      this.readAhead.after(layer, entry, last + 1)
      return out.length
    }
    // Whole chunks into the buffer (the kernel reads a chunk in pieces of up to 1 MiB), but for huge ones. Those
    // not there yet in one batch (the registry reads adjacent chunks in one request), each buffered as it arrives.
    let parts: Uint8Array[]
    if (touched.some((c) => c.size > MAX_BUFFERED_CHUNK)) {
      parts = await this.engine.getMany(
        touched.map((c) => chunkRef(layer, c)),
        options
      )
    } else {
      const need = touched.filter((c) => !this.buffer.has(c))
      const each =
        need.length > 0
          ? this.engine.getEach(
              need.map((c) => chunkRef(layer, c)),
              options
            )
          : []
      // (One buffered at the check but pushed out since by another of this read is fetched again.)
      const load = (c: Chunk) => each[need.indexOf(c)] ?? this.engine.get(chunkRef(layer, c), options)
      parts = await Promise.all(touched.map((c) => this.buffer.get(c, () => load(c))))
    }
    this.readAhead.after(layer, entry, last + 1)
    parts.forEach((bytes, i) => {
      const c = touched[i]!
      const from = Math.max(offset, c.fileOffset)
      const to = Math.min(end, c.fileOffset + c.size)
      out.set(bytes.subarray(from - c.fileOffset, to - c.fileOffset), from - offset)
      // Read to its end, a chunk is let go (it is in the store now): a sequential reader is done with it, and
      // another reader reads it from the store in place.
      if (to === c.fileOffset + c.size) this.buffer.drop(c)
    })
    return out.length
  }

  async storedFile(_layer: ImageLayer, entry: Entry, options: AbortOptions = {}): Promise<string | undefined> {
    const chunk = entry.chunks.length === 1 ? entry.chunks[0]! : undefined
    if (chunk === undefined || chunk.fileOffset !== 0 || chunk.size !== entry.size) return undefined
    if (this.store.verifiedPath === undefined) return undefined
    const m = this.counters.source('store')
    const path = await this.store.verifiedPath(chunk.digest, options).catch((err) => {
      options.signal?.throwIfAborted()
      m.errors++
      this.onEvent({ type: 'store:error', digest: chunk.digest, message: describe(err) })
      return undefined
    })
    if (path !== undefined) {
      m.requests++
      m.chunks++
      m.bytes += chunk.size
    }
    return path
  }

  /**
   * [offset, offset + out.length) of the file copied from the store straight into `out`; false when a chunk it
   * needs is not in the store (or the store failed to read it): the chunks are fetched then.
   */
  private async inPlace(
    touched: Entry['chunks'],
    offset: number,
    out: Uint8Array,
    options: AbortOptions
  ): Promise<boolean> {
    const end = offset + out.length
    const m = this.counters.source('store')
    let at = 0
    for (const c of touched) {
      const from = Math.max(offset, c.fileOffset) - c.fileOffset
      const to = Math.min(end, c.fileOffset + c.size) - c.fileOffset
      const n = await this.store.read(c.digest, from, out.subarray(at, at + to - from), options).catch((err) => {
        options.signal?.throwIfAborted()
        m.errors++
        this.onEvent({ type: 'store:error', digest: c.digest, message: describe(err) })
        return undefined
      })
      // A miss is counted by the fetch that follows; a chunk read in pieces counts once, on its first.
      if (n !== to - from) return false
      if (from === 0) {
        m.requests++
        m.chunks++
      }
      m.bytes += n
      at += n
    }
    return true
  }

  /**
   * A store that checks chunks on their first read (the disk store) is asked to check the next chunks of a file
   * read in place now, in the background: a sequential reader then finds them checked, and the hashing overlaps
   * the reads before them.
   */
  private verifyAhead(entry: Entry, from: number): void {
    if (this.store.verify === undefined) return
    for (const c of entry.chunks.slice(from, from + VERIFY_AHEAD)) this.store.verify(c.digest).catch(() => {})
  }
}

export function createFileReader(init: FileReaderInit): FileReader {
  return new Reader(init)
}
