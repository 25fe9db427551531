import { type Entry, verifyChunk } from '@strata/stargz'
import type { ChunkStore } from '@strata/store'
import { type BadChunkBytesError, ChunkUnavailableError, SourceTimeoutError } from './errors.js'
import { Metrics } from './metrics.js'
import type {
  AbortOptions,
  ChunkRef,
  ChunkSource,
  FetchEvent,
  Fetcher,
  FetcherMetrics,
  GetManyOptions,
  GetOptions,
  Image,
  ImageLayer,
  PrefetchOptions,
  Route
} from './types.js'

export interface FetcherInit {
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
  /** After the first read of a file, at most this many bytes of the rest of it are fetched in the background. Default 64 MiB; 0 disables. */
  readAheadBytes?: number
  /** Read-aheads running at once; more are dropped, not queued. Default 4. */
  readAheadConcurrency?: number
  /**
   * Chunk bytes all read-aheads together have in flight (being fetched, checked and stored), in windows of up to
   * 8 MiB: what read-ahead can hold in memory at once. Default 16 MiB (see READ_AHEAD_IN_FLIGHT_BYTES).
   */
  readAheadInFlightBytes?: number
}

/** THE check of bytes against the chunk a source was asked for (size and sha256); the reason when it fails. */
function verify(chunk: ChunkRef, bytes: Uint8Array): string | undefined {
  try {
    verifyChunk(bytes, chunk)
    return undefined
  } catch (err) {
    return describe(err)
  }
}

function describe(err: unknown): string {
  return err instanceof Error ? err.message : String(err)
}

/**
 * Resolves/rejects with `p`, or rejects as soon as `signal` aborts (the work behind `p` goes on for others).
 * `p`'s own failure is always handled, even when `signal` had aborted before.
 */
function raceSignal<T>(p: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (signal === undefined) return p
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason)
    if (signal.aborted) onAbort()
    else signal.addEventListener('abort', onAbort, { once: true })
    p.then(
      (v) => {
        signal.removeEventListener('abort', onAbort)
        resolve(v)
      },
      (e) => {
        signal.removeEventListener('abort', onAbort)
        reject(e)
      }
    )
  })
}

/**
 * The items of `items` until `signal` aborts, then rejects at once, even while the source is stuck in an await
 * (one that ignores its signal is left behind, told to return so it can clean up when it wakes).
 */
async function* untilAborted<T>(items: AsyncIterable<T>, signal: AbortSignal): AsyncGenerator<T> {
  const it = items[Symbol.asyncIterator]()
  let ended = false
  try {
    for (;;) {
      const r = await raceSignal(it.next(), signal)
      if (r.done) {
        ended = true
        return
      }
      yield r.value
    }
  } finally {
    if (!ended) it.return?.().catch(() => {})
  }
}

/** Runs `fn` over `items` with at most `limit` at once; rejects with the first error. */
async function mapLimit<T, R>(items: T[], limit: number, fn: (item: T, i: number) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length)
  let next = 0
  const worker = async () => {
    while (next < items.length) {
      const i = next++
      out[i] = await fn(items[i]!, i)
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker))
  return out
}

export function chunkRef(layer: ImageLayer, chunk: Entry['chunks'][number]): ChunkRef {
  return {
    ...chunk,
    layer: layer.ref,
    compression: layer.compression,
    ...(layer.format === 'indexed' && { indexed: true as const })
  }
}

class DefaultFetcher extends EventTarget implements Fetcher {
  private readonly store: ChunkStore
  private readonly sources: ChunkSource[]
  private readonly hedgeDelayMs: number
  private readonly sourceTimeoutMs: number
  private readonly stalledTimeoutMs: number
  private readonly badBytesRetries: number
  private readonly concurrency: number
  private readonly readAheadBytes: number
  private readonly readAheadConcurrency: number
  private readonly inflight = new Map<string, Promise<Uint8Array>>()
  /** Digests in flight that a later caller joined (a getMany with cancelOnAbort does not give those up). */
  private readonly joined = new Set<string>()
  /** Per file read: the chunk index its last read-ahead started at, and the one it ended before. */
  private readonly readAheadDone = new Map<string, { from: number; end: number }>()
  /** How each source is doing: see Liveness. */
  private readonly liveness = new Map<ChunkSource, Liveness>()
  private readAheadsRunning = 0
  /** The bytes read-aheads may have in flight, shared by all of them. */
  private readonly readAheadBudget: ByteBudget
  private readonly counters = new Metrics()

  constructor(init: FetcherInit) {
    super()
    this.store = init.store
    this.sources = init.sources
    this.hedgeDelayMs = init.hedgeDelayMs ?? DEFAULT_HEDGE_DELAY_MS
    this.sourceTimeoutMs = init.sourceTimeoutMs ?? DEFAULT_SOURCE_TIMEOUT_MS
    this.stalledTimeoutMs = init.stalledTimeoutMs ?? DEFAULT_STALLED_TIMEOUT_MS
    this.badBytesRetries = init.badBytesRetries ?? 2
    this.concurrency = init.concurrency ?? 8
    this.readAheadBytes = init.readAheadBytes ?? 64 * 1024 * 1024
    this.readAheadConcurrency = init.readAheadConcurrency ?? 4
    this.readAheadBudget = new ByteBudget(init.readAheadInFlightBytes ?? READ_AHEAD_IN_FLIGHT_BYTES)
  }

  metrics(): FetcherMetrics {
    return this.counters.snapshot()
  }

  private emit(event: FetchEvent): void {
    this.dispatchEvent(new CustomEvent(event.type, { detail: event }))
  }

  async get(chunk: ChunkRef, options: GetOptions = {}): Promise<Uint8Array> {
    const cached = await this.fromStore(chunk, options)
    if (cached !== undefined) return cached
    return raceSignal(
      this.join(chunk, () => this.fromSources([chunk], undefined, options.route).results.get(chunk.digest)!),
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
            this.join(chunk, () => this.fromSources([chunk], undefined, route).results.get(chunk.digest)!)
          )
        else missing.push(chunk)
      })
      if (missing.length === 0) return
      const batch = this.fromSources(missing, options.hedgeDelayMs, route)
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

  async readFile(
    layer: ImageLayer,
    entry: Entry,
    offset: number,
    length: number,
    options: AbortOptions = {}
  ): Promise<Uint8Array> {
    const end = Math.min(entry.size, offset + length)
    if (offset >= end) return new Uint8Array(0)
    const first = layer.toc.chunkIndexAt(entry, offset)
    const last = layer.toc.chunkIndexAt(entry, end - 1)
    if (first < 0 || last < 0) throw new RangeError(`${entry.path}: [${offset}, ${end}) is outside its chunks`)
    const chunks = entry.chunks.slice(first, last + 1)
    const parts = await this.getMany(
      chunks.map((c) => chunkRef(layer, c)),
      options
    )
    this.readAhead(layer, entry, last + 1)
    // Within one chunk (a mount reads whole chunks): a view, not a copy.
    if (parts.length === 1) return parts[0]!.subarray(offset - chunks[0]!.fileOffset, end - chunks[0]!.fileOffset)
    const out = new Uint8Array(end - offset)
    let at = 0
    parts.forEach((bytes, i) => {
      const c = chunks[i]!
      const from = Math.max(offset, c.fileOffset) - c.fileOffset
      const to = Math.min(end, c.fileOffset + c.size) - c.fileOffset
      out.set(bytes.subarray(from, to), at)
      at += to - from
    })
    return out
  }

  async readStored(
    layer: ImageLayer,
    entry: Entry,
    offset: number,
    into: Uint8Array,
    options: AbortOptions = {}
  ): Promise<number | undefined> {
    const end = Math.min(entry.size, offset + into.length)
    if (offset >= end) return 0
    const first = layer.toc.chunkIndexAt(entry, offset)
    const last = layer.toc.chunkIndexAt(entry, end - 1)
    if (first < 0 || last < 0) throw new RangeError(`${entry.path}: [${offset}, ${end}) is outside its chunks`)
    const m = this.counters.source('store')
    let at = 0
    for (let i = first; i <= last; i++) {
      const c = entry.chunks[i]!
      const from = Math.max(offset, c.fileOffset) - c.fileOffset
      const to = Math.min(end, c.fileOffset + c.size) - c.fileOffset
      const n = await this.store.read(c.digest, from, into.subarray(at, at + to - from), options).catch((err) => {
        options.signal?.throwIfAborted()
        m.errors++
        this.emit({ type: 'store:error', digest: c.digest, message: describe(err) })
        return undefined
      })
      // A miss is counted by the readFile that follows; a chunk read in pieces counts once, on its first.
      if (n !== to - from) return undefined
      if (from === 0) {
        m.requests++
        m.chunks++
      }
      m.bytes += n
      at += n
    }
    this.verifyAhead(entry, last + 1)
    this.readAhead(layer, entry, last + 1)
    return at
  }

  async storedFile(_layer: ImageLayer, entry: Entry, options: AbortOptions = {}): Promise<string | undefined> {
    const chunk = entry.chunks.length === 1 ? entry.chunks[0]! : undefined
    if (chunk === undefined || chunk.fileOffset !== 0 || chunk.size !== entry.size) return undefined
    if (this.store.verifiedPath === undefined) return undefined
    const m = this.counters.source('store')
    const path = await this.store.verifiedPath(chunk.digest, options).catch((err) => {
      options.signal?.throwIfAborted()
      m.errors++
      this.emit({ type: 'store:error', digest: chunk.digest, message: describe(err) })
      return undefined
    })
    if (path !== undefined) {
      m.requests++
      m.chunks++
      m.bytes += chunk.size
    }
    return path
  }

  async prefetch(image: Image, options: PrefetchOptions = {}): Promise<void> {
    // Every layer's prioritized range at once: they are what the workload reads first.
    await Promise.all(
      image.layers.map(async (layer) => {
        const refs = layer.toc.prioritized.flatMap((e) => e.chunks.map((c) => chunkRef(layer, c)))
        await this.ensure(refs, options)
        this.emit({ type: 'prefetch', layer: layer.digest, bytes: sum(refs), total: sum(refs) })
      })
    )
    const rate = options.wholeLayerBytesPerSecond ?? 0
    if (rate <= 0) return
    for (const layer of image.layers) {
      const refs = [...layer.toc.entries.values()].flatMap((e) => e.chunks.map((c) => chunkRef(layer, c)))
      const total = sum(refs)
      let done = 0
      // Batches of about one second's worth, each followed by the wait that keeps the average of the bytes
      // actually fetched under the rate (chunks already in the store cost nothing).
      for (let i = 0; i < refs.length; ) {
        const started = Date.now()
        const batch: ChunkRef[] = []
        let bytes = 0
        while (i < refs.length && (batch.length === 0 || bytes + refs[i]!.size <= rate)) {
          bytes += refs[i]!.size
          batch.push(refs[i++]!)
        }
        const fetched = await this.ensure(batch, options)
        done += bytes
        this.emit({ type: 'prefetch', layer: layer.digest, bytes: done, total })
        const wait = (fetched / rate) * 1000 - (Date.now() - started)
        if (wait > 0) await sleep(wait, options.signal)
      }
    }
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

  /**
   * After the first read of a file, its next chunks (up to readAheadBytes) in the background, and the next ones
   * again once a reader has passed the middle of those: bounded in bytes, in bytes in flight and in count. (The
   * mount reads ahead through this alone when it has the store's fast path: chunks in memory only as they arrive.)
   */
  private readAhead(layer: ImageLayer, entry: Entry, from: number): void {
    const key = `${layer.digest}\0${entry.path}`
    if (this.readAheadBytes <= 0 || from >= entry.chunks.length) return
    const done = this.readAheadDone.get(key)
    if (done !== undefined && (from < (done.from + done.end) / 2 || done.end >= entry.chunks.length)) return
    if (this.readAheadsRunning >= this.readAheadConcurrency) return
    const start = done === undefined ? from : Math.max(from, done.end)
    // A bounded memory of files read: forgetting one only costs a repeated read-ahead of chunks now in the store.
    if (this.readAheadDone.size >= 10_000) this.readAheadDone.clear()
    const refs: ChunkRef[] = []
    let bytes = 0
    for (const c of entry.chunks.slice(start)) {
      if (bytes + c.size > this.readAheadBytes) break
      bytes += c.size
      refs.push(chunkRef(layer, c))
    }
    this.readAheadDone.set(key, { from: start, end: start + refs.length })
    if (refs.length === 0) return
    this.readAheadsRunning++
    this.ensure(refs, {}, this.readAheadBudget)
      .catch(() => {
        // A failed read-ahead is only a missed optimisation: the chunks are fetched again when read.
      })
      .finally(() => {
        this.readAheadsRunning--
      })
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
  private async ensure(
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

  /** The chunk from the store; a store that fails to read counts as a miss (the sources still have it). */
  private async fromStore(chunk: ChunkRef, options: AbortOptions): Promise<Uint8Array | undefined> {
    const m = this.counters.source('store')
    m.requests++
    const bytes = await this.store.get(chunk.digest, options).catch((err: unknown) => {
      options.signal?.throwIfAborted()
      m.errors++
      this.emit({ type: 'store:error', digest: chunk.digest, message: describe(err) })
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

  /** Single flight: one fetch per digest at a time; later callers share its result. */
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

  /** THE choke point: bytes from `source` are checked here; a failure is counted, reported and returned as a reason. */
  private check(source: ChunkSource, chunk: ChunkRef, bytes: Uint8Array): string | undefined {
    const bad = verify(chunk, bytes)
    if (bad !== undefined) return this.badBytes(source, chunk, bad)
    const m = this.counters.source(source.name)
    m.chunks++
    m.bytes += bytes.byteLength
    return undefined
  }

  /** Bytes from `source` that are not `chunk`: counted, reported and returned as the attempt's reason. */
  private badBytes(source: ChunkSource, chunk: ChunkRef, reason: string): string {
    this.counters.verificationFailure(source.name)
    source.reportBad?.(chunk, reason)
    this.emit({ type: 'chunk:bad', digest: chunk.digest, layer: chunk.layer, source: source.name, reason })
    return `${source.name}: bad bytes (${reason})`
  }

  /**
   * Keeps verified bytes in the store. A store that fails (a full disk) does not fail the read: the bytes are
   * good; the failure is counted and announced.
   */
  private async keep(chunk: ChunkRef, bytes: Uint8Array): Promise<void> {
    try {
      await this.store.put(chunk.digest, bytes, { layer: chunk.layer })
    } catch (err) {
      this.counters.source('store').errors++
      this.emit({ type: 'store:error', digest: chunk.digest, message: describe(err) })
    }
  }

  /**
   * The sources in order, for a batch of chunks (one chunk for `get`). Each source gets what is still missing,
   * by its `getMany` where it has one (the registry coalesces adjacent ranges), else chunk by chunk. Hedged:
   * what a source has not delivered after `hedgeDelayMs` is also asked of the next source, one more source at a
   * time, never all at once; the first verified copy wins. Returns one promise per digest, settled as soon as
   * that chunk is known, and `cancel`, which gives a chunk up (its asks stop once they have nothing left to get).
   */
  private fromSources(
    chunks: ChunkRef[],
    hedgeDelayMs = this.hedgeDelayMs,
    route?: Route
  ): { results: Map<string, Promise<Uint8Array>>; cancel(digest: string, reason: unknown): void } {
    interface State {
      chunk: ChunkRef
      done: boolean
      /** Sources working on it right now. */
      working: number
      /** Index of the next source to ask. */
      next: number
      attempts: string[]
      /** Times the last source was asked again after its bytes failed their check. */
      retries: number
      /** The asks working on it: each stops once all its chunks are done, whoever delivered them. */
      asks: Array<{ remaining: number; controller: AbortController }>
      resolve(bytes: Uint8Array): void
      reject(err: unknown): void
    }
    const states = new Map<string, State>()
    const results = new Map<string, Promise<Uint8Array>>()
    for (const chunk of chunks) {
      const p = new Promise<Uint8Array>((resolve, reject) => {
        states.set(chunk.digest, {
          chunk,
          done: false,
          working: 0,
          next: 0,
          attempts: [],
          retries: 0,
          asks: [],
          resolve,
          reject
        })
      })
      p.catch(() => {})
      results.set(chunk.digest, p)
    }
    const failIfExhausted = (st: State) => {
      if (!st.done && st.working === 0 && st.next >= this.sources.length) {
        st.done = true
        st.reject(new ChunkUnavailableError(st.chunk.digest, st.chunk.layer, st.attempts))
      }
    }
    /** Chunks of `list` that source `i` was the last to be asked for, and are still missing: to source i + 1. */
    const handOn = (i: number, list: State[]) => {
      const todo = list.filter((st) => !st.done && st.next === i + 1)
      if (todo.length === 0) return
      if (i + 1 < this.sources.length) ask(i + 1, todo)
      else for (const st of todo) failIfExhausted(st)
    }
    const ask = (i: number, list: State[]) => {
      const source = this.sources[i]!
      const m = this.counters.source(source.name)
      for (const st of list) {
        st.working++
        st.next = i + 1
      }
      const controller = new AbortController()
      const self = { remaining: list.length, controller }
      for (const st of list) st.asks.push(self)
      // Liveness, not total time: the ask is given up once the source has made no progress (for anyone) for
      // sourceTimeoutMs since the ask started. A source working through a long queue is alive. One given up is
      // stalled: its asks get stalledTimeoutMs, and those waiting on it are given up with this one.
      const idle = new AbortController()
      const signal = AbortSignal.any([controller.signal, idle.signal])
      const started = performance.now()
      let live = this.liveness.get(source)
      if (live === undefined) {
        live = { progressAt: Number.NEGATIVE_INFINITY, watchers: new Set() }
        this.liveness.set(source, live)
      }
      const state = live
      // Bytes arriving keep an ask alive; only a chunk delivered shows a stalled source has recovered (one that
      // sends a few bytes of each request and then nothing stays stalled).
      const onProgress = () => {
        state.progressAt = performance.now()
      }
      const delivered = () => {
        state.progressAt = performance.now()
        state.stalled = undefined
      }
      let watchdog: NodeJS.Timeout | undefined
      /** Why this ask was given up, once it was. */
      let gaveUp: SourceTimeoutError | undefined
      const check = () => {
        clearTimeout(watchdog)
        const now = performance.now()
        const quiet = now - Math.max(started, state.progressAt)
        const stalled = state.stalled !== undefined && now - state.stalled.at < this.sourceTimeoutMs
        const limit = stalled ? this.stalledTimeoutMs : this.sourceTimeoutMs
        if (quiet < limit) {
          watchdog = setTimeout(check, limit - quiet)
          return
        }
        state.watchers.delete(check)
        if (stalled) {
          const silent = Math.round(now - state.stalled!.since)
          gaveUp = new SourceTimeoutError(source.name, '', Math.round(quiet), { stalledMs: silent })
        } else {
          gaveUp = new SourceTimeoutError(source.name, '', this.sourceTimeoutMs)
          state.stalled = { at: now, since: Math.max(started, state.progressAt) }
          // The others waiting on it have waited long enough too (more than stalledTimeoutMs, as a rule).
          for (const other of [...state.watchers]) other()
        }
        idle.abort(gaveUp)
      }
      state.watchers.add(check)
      check()
      // The hedge fires when this source has delivered nothing for hedgeDelayMs: a source that is steadily
      // delivering a big batch is not doubled by the next one.
      let hedge: NodeJS.Timeout | undefined
      const armHedge = () => {
        clearTimeout(hedge)
        if (i + 1 >= this.sources.length) return
        hedge = setTimeout(() => {
          hedge = undefined
          if (list.some((st) => !st.done && st.next === i + 1)) this.counters.hedges++
          handOn(i, list)
        }, hedgeDelayMs)
      }
      armHedge()
      // Puts overlap (each is a few file operations on a disk store) but stay bounded in count and bytes; a
      // chunk settles once it is kept.
      const puts = new Set<Promise<void>>()
      let putBytes = 0
      /** Chunks this source gave bad bytes for (failed check, or did not inflate): the last source is asked again. */
      const badNow = new Set<State>()
      const take = async (chunk: ChunkRef, bytes: Uint8Array) => {
        const st = states.get(chunk.digest)
        if (st === undefined || st.done) return
        const bad = this.check(source, chunk, bytes)
        if (bad !== undefined) {
          st.attempts.push(bad)
          badNow.add(st)
          return
        }
        delivered()
        st.done = true
        for (const a of st.asks) if (--a.remaining === 0) a.controller.abort()
        if (hedge !== undefined) armHedge()
        this.counters.observe(source.name, performance.now() - started)
        putBytes += bytes.byteLength
        const put = this.keep(chunk, bytes).then(() => {
          puts.delete(put)
          putBytes -= bytes.byteLength
          st.resolve(bytes)
        })
        puts.add(put)
        while (puts.size >= PUTS_IN_FLIGHT || putBytes >= PUT_BYTES_IN_FLIGHT) await Promise.race(puts)
      }
      const timeoutMessage = (chunk: ChunkRef) =>
        new SourceTimeoutError(source.name, chunk.digest, gaveUp?.timeoutMs ?? this.sourceTimeoutMs, {
          ...(gaveUp?.stalledMs === undefined ? {} : { stalledMs: gaveUp.stalledMs })
        }).message
      const said = (st: State, what: string) => {
        if (!st.attempts.some((a) => a.startsWith(`${source.name}:`))) st.attempts.push(`${source.name}: ${what}`)
      }
      const run = async () => {
        const wanted = list.filter((st) => !st.done).map((st) => st.chunk)
        // Raced with the signal: a source stuck in a wait that ignores its signal still times out.
        if (source.getMany !== undefined) {
          m.requests++
          for await (const { chunk, bytes } of untilAborted(
            source.getMany(wanted, { signal, onProgress, ...(route !== undefined && { route }) }),
            signal
          ))
            await take(chunk, bytes)
        } else {
          await mapLimit(wanted, this.concurrency, async (chunk) => {
            if (states.get(chunk.digest)!.done) return
            m.requests++
            const bytes = await raceSignal(
              source.get(chunk, { signal, onProgress, ...(route !== undefined && { route }) }),
              signal
            ).catch((err: unknown) => {
              if (controller.signal.aborted) return undefined
              m.errors++
              said(states.get(chunk.digest)!, idle.signal.aborted ? timeoutMessage(chunk) : describe(err))
              return undefined
            })
            if (bytes !== undefined) await take(chunk, bytes)
          })
        }
      }
      run()
        .catch((err: unknown) => {
          if (controller.signal.aborted) return
          let rest = err
          if ((err as Error)?.name === 'BadChunkBytesError') {
            // Bytes that arrived but are not the chunk: bad bytes, as a failed digest check.
            const e = err as BadChunkBytesError
            for (const { digest, reason } of e.chunks) {
              const st = states.get(digest)
              if (st === undefined || st.done || !list.includes(st)) continue
              st.attempts.push(this.badBytes(source, st.chunk, reason))
              badNow.add(st)
            }
            if (e.cause === undefined) return
            rest = e.cause
          }
          m.errors++
          for (const st of list)
            if (!st.done && !badNow.has(st)) said(st, idle.signal.aborted ? timeoutMessage(st.chunk) : describe(rest))
        })
        .then(() => Promise.all(puts))
        .then(() => {
          clearTimeout(hedge)
          clearTimeout(watchdog)
          state.watchers.delete(check)
          for (const st of list) {
            st.working--
            if (!st.done) {
              if (!st.attempts.some((a) => a.startsWith(`${source.name}:`))) m.misses++
              said(st, 'does not have it')
            }
          }
          // The last source gave bad bytes (a byte flipped on the way): asked again, a bounded number of times.
          const again =
            i === this.sources.length - 1
              ? list.filter((st) => !st.done && badNow.has(st) && st.retries < this.badBytesRetries)
              : []
          for (const st of again) st.retries++
          if (again.length > 0) ask(i, again)
          handOn(i, list)
          for (const st of list) failIfExhausted(st)
        })
    }
    const cancel = (digest: string, reason: unknown) => {
      const st = states.get(digest)
      if (st === undefined || st.done) return
      st.done = true
      for (const a of st.asks) if (--a.remaining === 0) a.controller.abort()
      st.reject(reason)
    }
    if (this.sources.length === 0) for (const st of states.values()) failIfExhausted(st)
    else ask(0, [...states.values()])
    return { results, cancel }
  }
}

/**
 * Store writes of one batch in flight at once, and their bytes. 16 held a whole-image read to the disk store's
 * put latency (a 180 MB image read whole: 10.4-12.4 s against 8.1 s with 64, as fast as a memory store).
 */
const PUTS_IN_FLIGHT = 64
const PUT_BYTES_IN_FLIGHT = 64 * 1024 * 1024

/**
 * Chunks after a read in place that the store is asked to check ahead of the reader. A first read through FUSE of
 * a file whose chunk files were not in the page cache measured 0.34x the unchecked read with none, 0.45x with
 * one, 0.50x with two (cached: 0.34x, 0.33x, 0.35x: there the hash, 1.7 GB/s, is slower than the read).
 */
const VERIFY_AHEAD = 2

/**
 * What ensure (read-ahead, prefetch) asks for at once, and holds in memory until it is stored: windows of up to
 * 8 MiB (the registry source's longest Range read), 32 MiB in flight per prefetch, 16 MiB for all read-aheads
 * together (four 4 MiB chunks ahead of a sequential reader: 128 ms of a 1 Gbit/s link; the mount's reads join what
 * is in flight). 64 MiB per read-ahead, four at once, made read-ahead alone able to hold 256 MiB.
 */
const ENSURE_WINDOW_BYTES = 8 * 1024 * 1024
const ENSURE_IN_FLIGHT_BYTES = 32 * 1024 * 1024
const READ_AHEAD_IN_FLIGHT_BYTES = 16 * 1024 * 1024

/**
 * Bytes that may be in flight at once, taken before and given back after; first come, first served. A taker larger
 * than the whole budget gets it when nothing else is in flight.
 */
class ByteBudget {
  private used = 0
  private readonly waiting: Array<{ bytes: number; go: () => void }> = []

  constructor(readonly max: number) {}

  async take(bytes: number, signal?: AbortSignal): Promise<void> {
    signal?.throwIfAborted()
    if (this.waiting.length === 0 && this.fits(bytes)) {
      this.used += bytes
      return
    }
    await new Promise<void>((resolve, reject) => {
      const waiter = {
        bytes,
        go: () => {
          signal?.removeEventListener('abort', onAbort)
          resolve()
        }
      }
      const onAbort = () => {
        const i = this.waiting.indexOf(waiter)
        if (i >= 0) this.waiting.splice(i, 1)
        reject(signal?.reason)
        this.wake()
      }
      signal?.addEventListener('abort', onAbort, { once: true })
      this.waiting.push(waiter)
    })
  }

  give(bytes: number): void {
    this.used -= bytes
    this.wake()
  }

  private fits(bytes: number): boolean {
    return this.used === 0 || this.used + bytes <= this.max
  }

  private wake(): void {
    while (this.waiting.length > 0 && this.fits(this.waiting[0]!.bytes)) {
      const next = this.waiting.shift()!
      this.used += next.bytes
      next.go()
    }
  }
}

/** Store lookups of one batch in flight at once. */
const LOOKUPS_IN_FLIGHT = 16

/**
 * A source silent this long is given up. With p2pd's 8 s before the registry is asked beside a silent peer, a read
 * whose sources all stall fails after 32 s; the kernel's retry of it after 2 more (stalledTimeoutMs for each
 * source): within 35 s of the stall, as the read path promises (docs/ARCHITECTURE.md). The registry client's idle
 * timeout (30 s) is longer: a stalled Range read is given up (and cancelled) before it is retried, whose first
 * bytes would look like progress again.
 */
const DEFAULT_SOURCE_TIMEOUT_MS = 24_000
const DEFAULT_STALLED_TIMEOUT_MS = 1_000
const DEFAULT_HEDGE_DELAY_MS = 300

/** How a source is doing, for its liveness timeout: one per source, shared by every ask to it. */
interface Liveness {
  /** When it last made progress (a verified chunk, or its `onProgress`), in performance.now() time. */
  progressAt: number
  /** Since it was given up for making no progress (`at`), having made none since `since`; until it delivers a chunk. */
  stalled?: { at: number; since: number }
  /** The watchdogs of the asks waiting on it: run at once when it is found stalled. */
  watchers: Set<() => void>
}

/**
 * The longest a read waits when every one of `sources` sources stalls (accepts the request, then sends nothing),
 * with these settings: `freshMs` for a read that starts as they stall (the next source is asked after
 * min(hedgeDelayMs, sourceTimeoutMs), each given sourceTimeoutMs), `knownMs` for one that starts once they were
 * found stalled, such as the kernel's retry of a read that just failed (each given stalledTimeoutMs).
 */
export function stallBound(
  init: Pick<FetcherInit, 'hedgeDelayMs' | 'sourceTimeoutMs' | 'stalledTimeoutMs'> = {},
  sources = 1
): { freshMs: number; knownMs: number } {
  const hedge = init.hedgeDelayMs ?? DEFAULT_HEDGE_DELAY_MS
  const timeout = init.sourceTimeoutMs ?? DEFAULT_SOURCE_TIMEOUT_MS
  const stalled = init.stalledTimeoutMs ?? DEFAULT_STALLED_TIMEOUT_MS
  const n = Math.max(1, sources)
  return {
    freshMs: (n - 1) * Math.min(hedge, timeout) + timeout,
    knownMs: (n - 1) * Math.min(hedge, stalled) + stalled
  }
}

function sum(refs: ChunkRef[]): number {
  return refs.reduce((a, r) => a + r.size, 0)
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(resolve, ms)
    signal?.addEventListener(
      'abort',
      () => {
        clearTimeout(t)
        reject(signal.reason)
      },
      { once: true }
    )
  })
}

export function createFetcher(init: FetcherInit): Fetcher {
  return new DefaultFetcher(init)
}
