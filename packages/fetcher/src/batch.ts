import { describe, mapLimit, raceSignal, untilAborted } from './async.js'
import { type BadChunkBytesError, ChunkUnavailableError, SourceTimeoutError } from './errors.js'
import { type Liveness, type LivenessLimits, LivenessWatch } from './liveness.js'
import type { Metrics } from './metrics.js'
import type { ChunkRef, ChunkSource, Route } from './types.js'

/**
 * Store writes of one batch in flight at once, and their bytes. 16 held a whole-image read to the disk store's
 * put latency (a 180 MB image read whole: 10.4-12.4 s against 8.1 s with 64, as fast as a memory store).
 */
const PUTS_IN_FLIGHT = 64
const PUT_BYTES_IN_FLIGHT = 64 * 1024 * 1024

/** What a batch needs of its engine: the sources in order, their settings, and the engine's one check and store. */
export interface BatchEngine {
  readonly sources: readonly ChunkSource[]
  readonly counters: Metrics
  readonly limits: LivenessLimits & { badBytesRetries: number; concurrency: number }
  liveness(source: ChunkSource): Liveness
  /** THE check of bytes from a source: undefined when they are the chunk, else the attempt's reason (reported). */
  check(source: ChunkSource, chunk: ChunkRef, bytes: Uint8Array): string | undefined
  /** Bytes from a source that are not the chunk (a source said so): counted, reported, the attempt's reason. */
  badBytes(source: ChunkSource, chunk: ChunkRef, reason: string): string
  /** Keeps verified bytes in the store; never fails (a store failure is counted and announced). */
  keep(chunk: ChunkRef, bytes: Uint8Array): Promise<void>
}

/** One chunk of a batch: where it is on its way through the sources. */
interface ChunkState {
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

/**
 * The sources in order, for a batch of chunks (one chunk for `get`). Each source gets what is still missing, by its
 * `getMany` where it has one (the registry coalesces adjacent ranges), else chunk by chunk. Hedged: what a source
 * has not delivered after `hedgeDelayMs` is also asked of the next source, one more source at a time, never all at
 * once; the first verified copy wins. `results` holds one promise per digest, settled as soon as that chunk is
 * known; `cancel` gives a chunk up (its asks stop once they have nothing left to get).
 */
export class HedgedBatch {
  readonly results = new Map<string, Promise<Uint8Array>>()
  readonly states = new Map<string, ChunkState>()
  readonly engine: BatchEngine
  readonly hedgeDelayMs: number
  /** Passed to every source asked, untouched. */
  readonly route: Route | undefined

  constructor(engine: BatchEngine, chunks: ChunkRef[], hedgeDelayMs: number, route?: Route) {
    this.engine = engine
    this.hedgeDelayMs = hedgeDelayMs
    this.route = route
    for (const chunk of chunks) {
      const p = new Promise<Uint8Array>((resolve, reject) => {
        this.states.set(chunk.digest, {
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
      this.results.set(chunk.digest, p)
    }
    if (engine.sources.length === 0) for (const st of this.states.values()) this.failIfExhausted(st)
    else this.ask(0, [...this.states.values()])
  }

  cancel(digest: string, reason: unknown): void {
    const st = this.states.get(digest)
    if (st === undefined || st.done) return
    st.done = true
    for (const a of st.asks) if (--a.remaining === 0) a.controller.abort()
    st.reject(reason)
  }

  failIfExhausted(st: ChunkState): void {
    if (!st.done && st.working === 0 && st.next >= this.engine.sources.length) {
      st.done = true
      st.reject(new ChunkUnavailableError(st.chunk.digest, st.chunk.layer.digest, st.attempts))
    }
  }

  /** Chunks of `list` that source `i` was the last to be asked for, and are still missing: to source i + 1. */
  handOn(i: number, list: ChunkState[]): void {
    const todo = list.filter((st) => !st.done && st.next === i + 1)
    if (todo.length === 0) return
    if (i + 1 < this.engine.sources.length) this.ask(i + 1, todo)
    else for (const st of todo) this.failIfExhausted(st)
  }

  ask(i: number, list: ChunkState[]): void {
    new SourceAsk(this, i, list).run()
  }
}

/** Source `i` of a batch asked for some of its chunks: its watchdog, its hedge timer, its store writes. */
class SourceAsk {
  private readonly batch: HedgedBatch
  private readonly i: number
  private readonly list: ChunkState[]
  private readonly source: ChunkSource
  private readonly m: { requests: number; chunks: number; bytes: number; misses: number; errors: number }
  /** Aborted once every chunk of this ask is done (whoever delivered it). */
  private readonly controller = new AbortController()
  /** Aborted when the source is given up for making no progress. */
  private readonly idle = new AbortController()
  private readonly signal: AbortSignal
  private readonly watch: LivenessWatch
  private hedge: NodeJS.Timeout | undefined
  // Puts overlap (each is a few file operations on a disk store) but stay bounded in count and bytes; a chunk
  // settles once it is kept.
  private readonly puts = new Set<Promise<void>>()
  private putBytes = 0
  /** Chunks this source gave bad bytes for (failed check, or did not inflate): the last source is asked again. */
  private readonly badNow = new Set<ChunkState>()

  constructor(batch: HedgedBatch, i: number, list: ChunkState[]) {
    this.batch = batch
    this.i = i
    this.list = list
    const engine = batch.engine
    this.source = engine.sources[i]!
    this.m = engine.counters.source(this.source.name)
    for (const st of list) {
      st.working++
      st.next = i + 1
    }
    const self = { remaining: list.length, controller: this.controller }
    for (const st of list) st.asks.push(self)
    this.signal = AbortSignal.any([this.controller.signal, this.idle.signal])
    this.watch = new LivenessWatch(this.source.name, engine.liveness(this.source), engine.limits, (err) =>
      this.idle.abort(err)
    )
    this.armHedge()
  }

  /**
   * The hedge fires when this source has delivered nothing for hedgeDelayMs: a source that is steadily delivering
   * a big batch is not doubled by the next one.
   */
  private armHedge(): void {
    clearTimeout(this.hedge)
    const { batch, i, list } = this
    if (i + 1 >= batch.engine.sources.length) return
    this.hedge = setTimeout(() => {
      this.hedge = undefined
      if (list.some((st) => !st.done && st.next === i + 1)) batch.engine.counters.hedges++
      batch.handOn(i, list)
    }, batch.hedgeDelayMs)
  }

  private async take(chunk: ChunkRef, bytes: Uint8Array): Promise<void> {
    const engine = this.batch.engine
    const st = this.batch.states.get(chunk.digest)
    if (st === undefined || st.done) return
    const bad = engine.check(this.source, chunk, bytes)
    if (bad !== undefined) {
      st.attempts.push(bad)
      this.badNow.add(st)
      return
    }
    this.watch.delivered()
    st.done = true
    for (const a of st.asks) if (--a.remaining === 0) a.controller.abort()
    if (this.hedge !== undefined) this.armHedge()
    engine.counters.observe(this.source.name, performance.now() - this.watch.started)
    this.putBytes += bytes.byteLength
    const put = engine.keep(chunk, bytes).then(() => {
      this.puts.delete(put)
      this.putBytes -= bytes.byteLength
      st.resolve(bytes)
    })
    this.puts.add(put)
    while (this.puts.size >= PUTS_IN_FLIGHT || this.putBytes >= PUT_BYTES_IN_FLIGHT) await Promise.race(this.puts)
  }

  private timeoutMessage(chunk: ChunkRef): string {
    const gaveUp = this.watch.gaveUp
    return new SourceTimeoutError(
      this.source.name,
      chunk.digest,
      gaveUp?.timeoutMs ?? this.batch.engine.limits.sourceTimeoutMs,
      {
        ...(gaveUp?.stalledMs === undefined ? {} : { stalledMs: gaveUp.stalledMs })
      }
    ).message
  }

  /** What this source said of a chunk, once (its first word on it counts). */
  private said(st: ChunkState, what: string): void {
    if (!st.attempts.some((a) => a.startsWith(`${this.source.name}:`))) st.attempts.push(`${this.source.name}: ${what}`)
  }

  private async ask(): Promise<void> {
    const { source, signal, batch } = this
    const wanted = this.list.filter((st) => !st.done).map((st) => st.chunk)
    const options = {
      signal,
      onProgress: this.watch.progress,
      ...(batch.route !== undefined && { route: batch.route })
    }
    // Raced with the signal: a source stuck in a wait that ignores its signal still times out.
    if (source.getMany !== undefined) {
      this.m.requests++
      for await (const { chunk, bytes } of untilAborted(source.getMany(wanted, options), signal))
        await this.take(chunk, bytes)
    } else {
      await mapLimit(wanted, batch.engine.limits.concurrency, async (chunk) => {
        if (batch.states.get(chunk.digest)!.done) return
        this.m.requests++
        const bytes = await raceSignal(source.get(chunk, options), signal).catch((err: unknown) => {
          if (this.controller.signal.aborted) return undefined
          this.m.errors++
          this.said(
            batch.states.get(chunk.digest)!,
            this.idle.signal.aborted ? this.timeoutMessage(chunk) : describe(err)
          )
          return undefined
        })
        if (bytes !== undefined) await this.take(chunk, bytes)
      })
    }
  }

  /** The ask failed as a whole (a batched source threw, or was given up). */
  private failed(err: unknown): void {
    if (this.controller.signal.aborted) return
    const { batch, list } = this
    let rest = err
    if ((err as Error)?.name === 'BadChunkBytesError') {
      // Bytes that arrived but are not the chunk: bad bytes, as a failed digest check.
      const e = err as BadChunkBytesError
      for (const { digest, reason } of e.chunks) {
        const st = batch.states.get(digest)
        if (st === undefined || st.done || !list.includes(st)) continue
        st.attempts.push(batch.engine.badBytes(this.source, st.chunk, reason))
        this.badNow.add(st)
      }
      if (e.cause === undefined) return
      rest = e.cause
    }
    this.m.errors++
    for (const st of list)
      if (!st.done && !this.badNow.has(st))
        this.said(st, this.idle.signal.aborted ? this.timeoutMessage(st.chunk) : describe(rest))
  }

  /** Once its puts are in: what it did not deliver is a miss, asked again (bad bytes of the last source) or handed on. */
  private finish(): void {
    const { batch, i, list, source } = this
    clearTimeout(this.hedge)
    this.watch.stop()
    for (const st of list) {
      st.working--
      if (!st.done) {
        if (!st.attempts.some((a) => a.startsWith(`${source.name}:`))) this.m.misses++
        this.said(st, 'does not have it')
      }
    }
    // The last source gave bad bytes (a byte flipped on the way): asked again, a bounded number of times.
    const again =
      i === batch.engine.sources.length - 1
        ? list.filter((st) => !st.done && this.badNow.has(st) && st.retries < batch.engine.limits.badBytesRetries)
        : []
    for (const st of again) st.retries++
    if (again.length > 0) batch.ask(i, again)
    batch.handOn(i, list)
    for (const st of list) batch.failIfExhausted(st)
  }

  run(): void {
    this.ask()
      .catch((err: unknown) => this.failed(err))
      .then(() => Promise.all(this.puts))
      .then(() => this.finish())
  }
}
