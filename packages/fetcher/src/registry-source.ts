import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { StrataError } from '@strata/base'
import { parseRepository, type Reference, type RegistryClient, type RemoteBlob } from '@strata/registry'
import { type Compression, inflateChunk } from '@strata/stargz'
import { BadChunkBytesError } from './errors.js'
import { decompressedStream, sliceStream } from './indexed.js'
import type { ChunkRef, ChunkSource, LayerRef, SourceOptions } from './types.js'

export interface RegistrySourceInit {
  /** The client for every registry (one client keeps the credentials, tokens and quirks of all hosts). */
  client?: RegistryClient
  /** Or the client for one registry host (`host[:port]`); undefined: this source does not have its chunks. */
  clientFor?(registry: string): RegistryClient | undefined
  /**
   * Whether to read this layer for this request (default: always). p2pd refuses, for a forwarded request, the
   * registries a peer may not make it read from: a repository in a peer's chunk ref must not widen that set.
   */
  mayRead?(layer: LayerRef, options: SourceOptions): boolean
  /** Adjacent missing chunks are read with one Range request of at most this many bytes. Default 8 MiB. */
  maxRangeBytes?: number
  /** Missing chunks this close (bytes) are read in one request with the gap between them. Default 64 KiB. */
  maxGapBytes?: number
  /** Range requests in flight at once per layer. Default 8. */
  concurrency?: number
  /** Source name in metrics and errors. Default `registry`. */
  name?: string
}

interface Waiter {
  chunk: ChunkRef
  /** The asker's `onProgress`: told as the bytes of the read carrying this chunk arrive. */
  progress: (() => void) | undefined
  /** The asker's signal: once every waiter of a read has gone, the read is cancelled. */
  signal: AbortSignal | undefined
  deliver(bytes: Uint8Array): void
  fail(err: unknown): void
}

/** A chunk's compressed bytes arrived but did not inflate: bad bytes from the registry (retried by the fetcher). */
class UndecodableError extends StrataError {
  override name = 'UndecodableError'
  override readonly code = 'ERR_CHUNK_UNDECODABLE'
  constructor(readonly reason: string) {
    super(reason)
  }
}

interface Run {
  offset: number
  end: number
  waiters: Waiter[]
}

/** Waiters sorted by offset, cut into runs no longer than `max` bytes whose pieces are at most `gap` apart. */
function coalesce(waiters: Waiter[], max: number, gap: number): Run[] {
  const sorted = [...waiters].sort((a, b) => a.chunk.offset - b.chunk.offset)
  const runs: Run[] = []
  for (const w of sorted) {
    const last = runs.at(-1)
    const { offset, end } = w.chunk
    if (last !== undefined && offset <= last.end + gap && Math.max(last.end, end) - last.offset <= max) {
      last.end = Math.max(last.end, end)
      last.waiters.push(w)
    } else {
      runs.push({ offset, end, waiters: [w] })
    }
  }
  return runs
}

/**
 * The Range reads of one eStargz layer. Requests from every caller wait in one queue; whenever a read slot is
 * free, everything waiting is coalesced and the run holding the oldest request is read. Under load requests
 * pile up while slots are busy and leave together, so concurrent readers of neighbouring files share requests.
 * This is strata's one range coalescer (the registry client reads the runs it is given): it sits here, beside
 * the queue, because what it coalesces is the waiters of many callers, each with its own signal and progress.
 */
class LayerReader {
  private pending: Waiter[] = []
  private reading = 0
  private scheduled = false

  constructor(
    private readonly blob: RemoteBlob,
    private readonly compression: Compression,
    private readonly limits: { maxRangeBytes: number; maxGapBytes: number; concurrency: number },
    /** Told when nothing waits and nothing is read: one source serves every image, so idle readers go. */
    private readonly onIdle: () => void
  ) {}

  read(chunk: ChunkRef, options: SourceOptions): Promise<Uint8Array> {
    const signal = options.signal
    signal?.throwIfAborted()
    return new Promise((resolve, reject) => {
      const onAbort = () => {
        const i = this.pending.indexOf(waiter)
        if (i >= 0) this.pending.splice(i, 1)
        reject(signal?.reason)
        this.idleCheck()
      }
      const waiter: Waiter = {
        chunk,
        progress: options.onProgress,
        signal,
        deliver: (bytes) => {
          signal?.removeEventListener('abort', onAbort)
          resolve(bytes)
        },
        fail: (err) => {
          signal?.removeEventListener('abort', onAbort)
          reject(err)
        }
      }
      signal?.addEventListener('abort', onAbort, { once: true })
      this.pending.push(waiter)
      // Pumped once after the caller queued all it asked for, so one caller's chunks leave together.
      if (!this.scheduled) {
        this.scheduled = true
        queueMicrotask(() => {
          this.scheduled = false
          this.pump()
        })
      }
    })
  }

  private pump(): void {
    while (this.reading < this.limits.concurrency && this.pending.length > 0) {
      // A registry that ignores Range sends the whole blob for any request: then everything waiting goes in one
      // call (its runs sliced from one stream), not a whole blob per run. While that stream is read, what it has
      // not passed yet joins it (RemoteBlob.joins); the rest waits for it to end, then goes in the next call.
      const whole = this.blob.ignoresRange
      const joining = whole && this.reading > 0 ? this.pending.filter((w) => this.blob.joins(w.chunk.offset)) : []
      if (whole && this.reading > 0 && joining.length === 0) return
      const runs = whole
        ? coalesce(joining.length > 0 ? joining : this.pending, Number.POSITIVE_INFINITY, this.limits.maxGapBytes)
        : [
            coalesce(this.pending, this.limits.maxRangeBytes, this.limits.maxGapBytes).find((r) =>
              r.waiters.includes(this.pending[0]!)
            )!
          ]
      const waiters = runs.flatMap((r) => r.waiters)
      const taken = new Set(waiters)
      this.pending = this.pending.filter((w) => !taken.has(w))
      this.reading++
      this.readRuns(runs, waiters).finally(() => {
        this.reading--
        this.pump()
        this.idleCheck()
      })
    }
  }

  /** One read of `runs` (one Range request, or one whole-blob stream: see RemoteBlob.readRuns). */
  private async readRuns(runs: Run[], waiters: Waiter[]): Promise<void> {
    // Each asker hears every piece of the body: an 8 MiB range on a crowded link is slow but moving. No total
    // time limit: the registry client gives up when it waits too long for headers or for the next piece.
    const askers = new Set(waiters.flatMap((w) => (w.progress === undefined ? [] : [w.progress])))
    // Cancelled once every asker has gone (another source delivered, the asker gave the registry up, or its
    // caller stopped): a stalled read no longer holds a slot, nor does a read nobody waits for cost egress.
    const cancel = new AbortController()
    const gone = () => {
      if (waiters.every((w) => w.signal?.aborted === true)) cancel.abort(new Error('nobody waits for this read'))
    }
    for (const w of waiters) w.signal?.addEventListener('abort', gone, { once: true })
    gone()
    const served = new Set<Run>()
    try {
      await this.blob.readRuns(
        runs.map((r) => ({ offset: r.offset, length: r.end - r.offset })),
        (i, bytes) => {
          const run = runs[i]!
          served.add(run)
          for (const w of run.waiters) {
            const compressed = bytes.subarray(w.chunk.offset - run.offset, w.chunk.end - run.offset)
            inflateChunk(this.compression, compressed, w.chunk).then(w.deliver, (err: unknown) => {
              const name = (err as Error)?.name
              w.fail(name === 'AbortError' || name === 'ChunkTooLargeError' ? err : new UndecodableError(describe(err)))
            })
          }
        },
        {
          signal: cancel.signal,
          onProgress: () => {
            for (const progress of askers) progress()
          }
        }
      )
    } catch (err) {
      for (const run of runs) if (!served.has(run)) for (const w of run.waiters) w.fail(err)
    } finally {
      for (const w of waiters) w.signal?.removeEventListener('abort', gone)
    }
  }

  private idleCheck(): void {
    if (this.reading === 0 && this.pending.length === 0 && !this.scheduled) this.onIdle()
  }
}

/** The chunks of one layer blob asked in one call, and where to read them. */
interface LayerAsk {
  layer: LayerRef
  ref: Reference
  client: RegistryClient
  chunks: ChunkRef[]
}

class RegistrySource implements ChunkSource {
  readonly name: string
  private readonly init: RegistrySourceInit
  private readonly limits: { maxRangeBytes: number; maxGapBytes: number; concurrency: number }
  /** One queue per layer blob and repository, while it has reads waiting or in flight. */
  private readonly readers = new Map<string, LayerReader>()

  constructor(init: RegistrySourceInit) {
    this.name = init.name ?? 'registry'
    this.init = init
    this.limits = {
      maxRangeBytes: init.maxRangeBytes ?? 8 * 1024 * 1024,
      maxGapBytes: init.maxGapBytes ?? 64 * 1024,
      concurrency: init.concurrency ?? 8
    }
  }

  async get(chunk: ChunkRef, options: SourceOptions = {}): Promise<Uint8Array | undefined> {
    for await (const got of this.getMany([chunk], options)) return got.bytes
    return undefined
  }

  async *getMany(
    chunks: ChunkRef[],
    options: SourceOptions = {}
  ): AsyncIterable<{ chunk: ChunkRef; bytes: Uint8Array }> {
    // A chunk this source cannot place (a repository it cannot parse, a registry it has no client for or may
    // not read from for this request) is one it does not have.
    const byLayer = new Map<string, LayerAsk>()
    for (const c of chunks) {
      const key = `${c.layer.repository}@${c.layer.digest}`
      const known = byLayer.get(key)
      if (known !== undefined) {
        known.chunks.push(c)
        continue
      }
      const ref = parseRepository(c.layer.repository)
      if (ref === undefined || this.init.mayRead?.(c.layer, options) === false) continue
      const client = this.init.client ?? this.init.clientFor?.(ref.registry)
      if (client === undefined) continue
      byLayer.set(key, { layer: c.layer, ref, client, chunks: [c] })
    }
    // A layer that fails fails after the other layers are read; chunks that arrived but did not inflate are
    // named as bad bytes (the fetcher asks again), beside what happened to the rest.
    const bad: Array<{ digest: string; reason: string }> = []
    let failure: unknown
    for (const [key, ask] of byLayer) {
      try {
        if (ask.chunks[0]!.indexed === true) yield* this.fromWholeBlob(ask, options)
        else yield* this.fromRanges(key, ask, options, bad)
      } catch (err) {
        if (options.signal?.aborted === true) throw err
        failure ??= err
      }
    }
    if (bad.length > 0) throw new BadChunkBytesError(bad, failure === undefined ? {} : { cause: failure })
    if (failure !== undefined) throw failure
  }

  /** eStargz family: Range reads of whole compressed members through the layer's shared queue. */
  private async *fromRanges(
    key: string,
    ask: LayerAsk,
    options: SourceOptions,
    bad: Array<{ digest: string; reason: string }>
  ): AsyncIterable<{ chunk: ChunkRef; bytes: Uint8Array }> {
    let reader = this.readers.get(key)
    if (reader === undefined) {
      const blob = ask.client.blob(ask.ref, ask.layer.digest)
      const compression = ask.chunks[0]!.compression === 'zstd' ? 'zstd' : 'gzip'
      const created: LayerReader = new LayerReader(blob, compression, this.limits, () => {
        if (this.readers.get(key) === created) this.readers.delete(key)
      })
      reader = created
      this.readers.set(key, reader)
    }
    const sorted = [...ask.chunks].sort((a, b) => a.offset - b.offset)
    const reads = sorted.map((chunk) => reader.read(chunk, options))
    for (const p of reads) p.catch(() => {})
    // A chunk that fails fails after the others are handed over, so one bad member costs one chunk.
    let failure: unknown
    for (const [i, p] of reads.entries()) {
      try {
        yield { chunk: sorted[i]!, bytes: await p }
      } catch (err) {
        if (err instanceof UndecodableError) bad.push({ digest: sorted[i]!.digest, reason: err.reason })
        else failure ??= err
      }
    }
    if (failure !== undefined) throw failure
  }

  /**
   * Indexed layers cannot be read by range (a plain gzip stream has no restart points): the blob is
   * downloaded again and the chunks are cut from the decompressed stream.
   */
  private async *fromWholeBlob(
    ask: LayerAsk,
    options: SourceOptions
  ): AsyncIterable<{ chunk: ChunkRef; bytes: Uint8Array }> {
    const dir = await mkdtemp(join(tmpdir(), 'strata-layer-'))
    try {
      const path = join(dir, 'blob')
      // Its `onProgress` too: a long download on a slow link is progress, and so is inflating it below.
      await ask.client.downloadBlob(ask.ref, ask.layer.digest, path, options)
      const sorted = [...ask.chunks].sort((a, b) => a.offset - b.offset)
      const ranges = sorted.map((c) => ({ offset: c.offset + c.innerOffset, length: c.size }))
      for await (const { index, bytes } of sliceStream(
        decompressedStream(path, sorted[0]!.compression, () => options.onProgress?.(), options),
        ranges
      )) {
        yield { chunk: sorted[index]!, bytes }
      }
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  }
}

/**
 * The registry as a chunk source for every image: each chunk's LayerRef says which blob of which repository
 * holds it. Range reads of eStargz layers (coalesced per layer blob), whole-blob reads of indexed layers.
 */
export function createRegistrySource(init: RegistrySourceInit): ChunkSource {
  if (init.client === undefined && init.clientFor === undefined) {
    throw new TypeError('createRegistrySource needs a client or clientFor')
  }
  return new RegistrySource(init)
}

function describe(err: unknown): string {
  return err instanceof Error ? err.message : String(err)
}
