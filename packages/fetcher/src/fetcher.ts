import { type Entry, verifyChunk } from '@strata/stargz'
import type { ChunkStore } from '@strata/store'
import { ChunkUnavailableError, SourceTimeoutError } from './errors.js'
import { Metrics } from './metrics.js'
import type {
  AbortOptions,
  ChunkRef,
  ChunkSource,
  FetchEvent,
  Fetcher,
  FetcherMetrics,
  Image,
  ImageLayer,
  PrefetchOptions
} from './types.js'

export interface FetcherInit {
  store: ChunkStore
  /** Asked in order (e.g. peers, then the registry). */
  sources: ChunkSource[]
  /** When a source has not answered after this long, the next one is asked too (one more at a time). Default 300 ms. */
  hedgeDelayMs?: number
  /** A source that has not answered after this long is given up for that chunk. Default 30 s. */
  sourceTimeoutMs?: number
  /** Per-chunk requests in flight for one batch, to sources without `getMany`. Default 8. */
  concurrency?: number
  /** After the first read of a file, at most this many bytes of the rest of it are fetched in the background. Default 64 MiB; 0 disables. */
  readAheadBytes?: number
  /** Read-aheads running at once; more are dropped, not queued. Default 4. */
  readAheadConcurrency?: number
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

/** Resolves/rejects with `p`, or rejects as soon as `signal` aborts (the work behind `p` goes on for others). */
function raceSignal<T>(p: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (signal === undefined) return p
  signal.throwIfAborted()
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason)
    signal.addEventListener('abort', onAbort, { once: true })
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
  return { ...chunk, layer: layer.digest, compression: layer.compression }
}

class DefaultFetcher extends EventTarget implements Fetcher {
  private readonly store: ChunkStore
  private readonly sources: ChunkSource[]
  private readonly hedgeDelayMs: number
  private readonly sourceTimeoutMs: number
  private readonly concurrency: number
  private readonly readAheadBytes: number
  private readonly readAheadConcurrency: number
  private readonly inflight = new Map<string, Promise<Uint8Array>>()
  private readonly readAheadDone = new Set<string>()
  private readAheadsRunning = 0
  private readonly counters = new Metrics()

  constructor(init: FetcherInit) {
    super()
    this.store = init.store
    this.sources = init.sources
    this.hedgeDelayMs = init.hedgeDelayMs ?? 300
    this.sourceTimeoutMs = init.sourceTimeoutMs ?? 30_000
    this.concurrency = init.concurrency ?? 8
    this.readAheadBytes = init.readAheadBytes ?? 64 * 1024 * 1024
    this.readAheadConcurrency = init.readAheadConcurrency ?? 4
  }

  metrics(): FetcherMetrics {
    return this.counters.snapshot()
  }

  private emit(event: FetchEvent): void {
    this.dispatchEvent(new CustomEvent(event.type, { detail: event }))
  }

  async get(chunk: ChunkRef, options: AbortOptions = {}): Promise<Uint8Array> {
    const cached = await this.fromStore(chunk, options)
    if (cached !== undefined) return cached
    return raceSignal(
      this.join(chunk, () => this.fromSources(chunk)),
      options.signal
    )
  }

  async getMany(chunks: ChunkRef[], options: AbortOptions = {}): Promise<Uint8Array[]> {
    const byDigest = new Map<string, Promise<Uint8Array>>()
    const unique = [...new Map(chunks.map((c) => [c.digest, c])).values()]
    const cached = await mapLimit(unique, LOOKUPS_IN_FLIGHT, (chunk) => this.fromStore(chunk, options))
    const missing: ChunkRef[] = []
    unique.forEach((chunk, i) => {
      const bytes = cached[i]
      if (bytes !== undefined) byDigest.set(chunk.digest, Promise.resolve(bytes))
      else if (this.inflight.has(chunk.digest))
        byDigest.set(
          chunk.digest,
          this.join(chunk, () => this.fromSources(chunk))
        )
      else missing.push(chunk)
    })
    if (missing.length > 0) {
      const batch = this.fromSourcesMany(missing)
      for (const chunk of missing)
        byDigest.set(
          chunk.digest,
          this.join(chunk, () => batch.get(chunk.digest)!)
        )
    }
    const all = Promise.all(chunks.map((c) => byDigest.get(c.digest)!))
    // Chunks a caller stops waiting for still land in the store for the next reader.
    all.catch(() => {})
    return raceSignal(all, options.signal)
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

  async prefetch(image: Image, options: PrefetchOptions = {}): Promise<void> {
    // Every layer's prioritized range at once: they are what the workload reads first.
    await Promise.all(
      image.layers.map(async (layer) => {
        const refs = layer.toc.prioritized.flatMap((e) => e.chunks.map((c) => chunkRef(layer, c)))
        if (refs.length > 0) await this.getMany(refs, options)
        this.emit({ type: 'prefetch', layer: layer.digest, bytes: sum(refs), total: sum(refs) })
      })
    )
    const rate = options.wholeLayerBytesPerSecond ?? 0
    if (rate <= 0) return
    for (const layer of image.layers) {
      const refs = [...layer.toc.entries.values()].flatMap((e) => e.chunks.map((c) => chunkRef(layer, c)))
      const total = sum(refs)
      let done = 0
      // Batches of about one second's worth, each followed by the wait that keeps the average under the rate.
      for (let i = 0; i < refs.length; ) {
        const started = Date.now()
        const batch: ChunkRef[] = []
        let bytes = 0
        while (i < refs.length && (batch.length === 0 || bytes + refs[i]!.size <= rate)) {
          bytes += refs[i]!.size
          batch.push(refs[i++]!)
        }
        await this.getMany(batch, options)
        done += bytes
        this.emit({ type: 'prefetch', layer: layer.digest, bytes: done, total })
        const wait = (bytes / rate) * 1000 - (Date.now() - started)
        if (wait > 0) await sleep(wait, options.signal)
      }
    }
  }

  /** After the first read of a file, its remaining chunks in the background: bounded in bytes and in count. */
  private readAhead(layer: ImageLayer, entry: Entry, from: number): void {
    const key = `${layer.digest}\0${entry.path}`
    if (this.readAheadBytes <= 0 || from >= entry.chunks.length || this.readAheadDone.has(key)) return
    if (this.readAheadsRunning >= this.readAheadConcurrency) return
    // A bounded memory of files read: forgetting one only costs a repeated read-ahead of chunks now in the store.
    if (this.readAheadDone.size >= 10_000) this.readAheadDone.clear()
    this.readAheadDone.add(key)
    const refs: ChunkRef[] = []
    let bytes = 0
    for (const c of entry.chunks.slice(from)) {
      if (bytes + c.size > this.readAheadBytes) break
      bytes += c.size
      refs.push(chunkRef(layer, c))
    }
    this.readAheadsRunning++
    this.getMany(refs)
      .catch(() => {
        // A failed read-ahead is only a missed optimisation: the chunks are fetched again when read.
      })
      .finally(() => {
        this.readAheadsRunning--
      })
  }

  private async fromStore(chunk: ChunkRef, options: AbortOptions): Promise<Uint8Array | undefined> {
    const bytes = await this.store.get(chunk.digest, options)
    const m = this.counters.source('store')
    m.requests++
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
      return running
    }
    const p = start().finally(() => this.inflight.delete(chunk.digest))
    this.inflight.set(chunk.digest, p)
    return p
  }

  /** THE choke point: bytes from `source` are checked here; a failure is counted, reported and returned as a reason. */
  private check(source: ChunkSource, chunk: ChunkRef, bytes: Uint8Array): string | undefined {
    const bad = verify(chunk, bytes)
    if (bad !== undefined) {
      this.counters.verificationFailure(source.name)
      source.reportBad?.(chunk, bad)
      this.emit({ type: 'chunk:bad', digest: chunk.digest, layer: chunk.layer, source: source.name, reason: bad })
      return `${source.name}: bad bytes (${bad})`
    }
    const m = this.counters.source(source.name)
    m.chunks++
    m.bytes += bytes.byteLength
    return undefined
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
   * The sources in order, hedged: the next source starts when the previous ones have all failed, or when
   * `hedgeDelayMs` passed without an answer. Never all at once.
   */
  private fromSources(chunk: ChunkRef): Promise<Uint8Array> {
    return new Promise<Uint8Array>((resolve, reject) => {
      const attempts: string[] = new Array(this.sources.length).fill('')
      const controllers: AbortController[] = []
      let next = 0
      let pending = 0
      let done = false
      let hedgeTimer: NodeJS.Timeout | undefined
      const finish = () => {
        done = true
        clearTimeout(hedgeTimer)
        for (const c of controllers) c.abort()
      }
      const startNext = (hedge: boolean) => {
        clearTimeout(hedgeTimer)
        if (done) return
        if (next >= this.sources.length) {
          if (pending === 0) {
            finish()
            reject(new ChunkUnavailableError(chunk.digest, chunk.layer, attempts))
          }
          return
        }
        if (hedge) this.counters.hedges++
        const i = next++
        const source = this.sources[i]!
        const controller = new AbortController()
        controllers.push(controller)
        pending++
        const started = performance.now()
        const m = this.counters.source(source.name)
        m.requests++
        const signal = AbortSignal.any([controller.signal, AbortSignal.timeout(this.sourceTimeoutMs)])
        source
          .get(chunk, { signal })
          .then(
            async (bytes) => {
              if (bytes === undefined) {
                m.misses++
                return `${source.name}: does not have it`
              }
              if (done) return 'superseded'
              const bad = this.check(source, chunk, bytes)
              if (bad === undefined && !done) {
                this.counters.observe(source.name, performance.now() - started)
                finish()
                await this.keep(chunk, bytes)
                resolve(bytes)
              }
              return bad ?? 'superseded'
            },
            (err: unknown) => {
              m.errors++
              if (signal.aborted && !controller.signal.aborted) {
                return `${source.name}: ${new SourceTimeoutError(source.name, chunk.digest, this.sourceTimeoutMs).message}`
              }
              return `${source.name}: ${describe(err)}`
            }
          )
          .then((outcome) => {
            attempts[i] = outcome
            pending--
            if (!done) startNext(false)
          })
        if (next < this.sources.length) hedgeTimer = setTimeout(() => startNext(true), this.hedgeDelayMs)
      }
      startNext(false)
    })
  }

  /**
   * A batch: each source in order gets what is still missing, by its `getMany` where it has one
   * (the registry coalesces adjacent ranges), else chunk by chunk. Batches are not hedged.
   * Returns one promise per digest, settled as soon as that chunk is known.
   */
  private fromSourcesMany(chunks: ChunkRef[]): Map<string, Promise<Uint8Array>> {
    const settle = new Map<string, { resolve: (b: Uint8Array) => void; reject: (e: unknown) => void }>()
    const results = new Map<string, Promise<Uint8Array>>()
    for (const chunk of chunks) {
      const p = new Promise<Uint8Array>((resolve, reject) => settle.set(chunk.digest, { resolve, reject }))
      p.catch(() => {})
      results.set(chunk.digest, p)
    }
    const attempts = new Map<string, string[]>(chunks.map((c) => [c.digest, []]))
    const run = async () => {
      let missing = chunks
      for (const source of this.sources) {
        if (missing.length === 0) break
        const got = new Set<string>()
        const m = this.counters.source(source.name)
        const started = performance.now()
        // Puts overlap (a disk store syncs each chunk) but stay bounded; a chunk settles once it is kept.
        const puts = new Set<Promise<void>>()
        const take = async (chunk: ChunkRef, bytes: Uint8Array) => {
          if (got.has(chunk.digest) || !attempts.has(chunk.digest)) return
          const bad = this.check(source, chunk, bytes)
          if (bad !== undefined) {
            attempts.get(chunk.digest)!.push(bad)
            return
          }
          got.add(chunk.digest)
          this.counters.observe(source.name, performance.now() - started)
          const put = this.keep(chunk, bytes).then(() => {
            puts.delete(put)
            settle.get(chunk.digest)!.resolve(bytes)
          })
          puts.add(put)
          if (puts.size >= PUTS_IN_FLIGHT) await Promise.race(puts)
        }
        const signal = AbortSignal.timeout(this.sourceTimeoutMs * Math.max(1, Math.ceil(missing.length / 64)))
        try {
          if (source.getMany !== undefined) {
            m.requests++
            for await (const { chunk, bytes } of source.getMany(missing, { signal })) await take(chunk, bytes)
          } else {
            await mapLimit(missing, this.concurrency, async (chunk) => {
              m.requests++
              const bytes = await source.get(chunk, { signal }).catch((err: unknown) => {
                m.errors++
                attempts.get(chunk.digest)!.push(`${source.name}: ${describe(err)}`)
                return undefined
              })
              if (bytes !== undefined) await take(chunk, bytes)
            })
          }
        } catch (err) {
          m.errors++
          for (const c of missing)
            if (!got.has(c.digest)) attempts.get(c.digest)!.push(`${source.name}: ${describe(err)}`)
        }
        await Promise.all(puts)
        const left = missing.filter((c) => !got.has(c.digest))
        for (const c of left) {
          const a = attempts.get(c.digest)!
          if (!a.some((s) => s.startsWith(`${source.name}:`))) {
            m.misses++
            a.push(`${source.name}: does not have it`)
          }
        }
        missing = left
      }
      for (const c of missing)
        settle.get(c.digest)!.reject(new ChunkUnavailableError(c.digest, c.layer, attempts.get(c.digest)!))
    }
    run().catch((err: unknown) => {
      for (const c of chunks) settle.get(c.digest)!.reject(err)
    })
    return results
  }
}

/** Store writes of one batch in flight at once. */
const PUTS_IN_FLIGHT = 16

/** Store lookups of one batch in flight at once. */
const LOOKUPS_IN_FLIGHT = 16

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
