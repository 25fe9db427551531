import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Reference, RegistryClient } from '@strata/registry'
import { inflateChunk } from '@strata/stargz'
import { decompressedStream, sliceStream } from './indexed.js'
import type { AbortOptions, ChunkRef, ChunkSource, ImageLayer } from './types.js'

export interface RegistrySourceInit {
  client: RegistryClient
  ref: Reference | string
  /** The layers this source serves; chunks of other layers get `undefined`. */
  layers: ImageLayer[]
  /** Adjacent missing chunks are read with one Range request of at most this many bytes. Default 8 MiB. */
  maxRangeBytes?: number
  /** Range requests in flight at once. Default 4. */
  concurrency?: number
  /** Source name in metrics and errors. Default `registry`. */
  name?: string
}

interface Run {
  offset: number
  end: number
  chunks: ChunkRef[]
}

/** Sorted chunks of one layer, cut into runs of touching ranges no longer than `max` bytes. */
export function coalesce(chunks: ChunkRef[], max: number): Run[] {
  const sorted = [...chunks].sort((a, b) => a.offset - b.offset || a.innerOffset - b.innerOffset)
  const runs: Run[] = []
  for (const c of sorted) {
    const last = runs.at(-1)
    if (last !== undefined && c.offset <= last.end && Math.max(last.end, c.end) - last.offset <= max) {
      last.end = Math.max(last.end, c.end)
      last.chunks.push(c)
    } else {
      runs.push({ offset: c.offset, end: c.end, chunks: [c] })
    }
  }
  return runs
}

class RegistrySource implements ChunkSource {
  readonly name: string
  private readonly client: RegistryClient
  private readonly ref: Reference | string
  private readonly layers: Map<string, ImageLayer>
  private readonly maxRangeBytes: number
  private readonly concurrency: number

  constructor(init: RegistrySourceInit) {
    this.name = init.name ?? 'registry'
    this.client = init.client
    this.ref = init.ref
    this.layers = new Map(init.layers.map((l) => [l.digest, l]))
    this.maxRangeBytes = init.maxRangeBytes ?? 8 * 1024 * 1024
    this.concurrency = init.concurrency ?? 4
  }

  async get(chunk: ChunkRef, options: AbortOptions = {}): Promise<Uint8Array | undefined> {
    for await (const got of this.getMany([chunk], options)) return got.bytes
    return undefined
  }

  async *getMany(
    chunks: ChunkRef[],
    options: AbortOptions = {}
  ): AsyncIterable<{ chunk: ChunkRef; bytes: Uint8Array }> {
    const byLayer = new Map<string, ChunkRef[]>()
    for (const c of chunks) {
      if (!this.layers.has(c.layer)) continue
      const list = byLayer.get(c.layer) ?? []
      list.push(c)
      byLayer.set(c.layer, list)
    }
    for (const [digest, list] of byLayer) {
      const layer = this.layers.get(digest)!
      if (layer.format === 'indexed') yield* this.fromWholeBlob(layer, list, options)
      else yield* this.fromRanges(layer, list, options)
    }
  }

  /** eStargz family: Range reads of whole compressed members, adjacent ones coalesced, a few in flight. */
  private async *fromRanges(
    layer: ImageLayer,
    chunks: ChunkRef[],
    options: AbortOptions
  ): AsyncIterable<{ chunk: ChunkRef; bytes: Uint8Array }> {
    const blob = this.client.blob(this.ref, layer.digest, layer.descriptor.size)
    const compression = layer.compression === 'zstd' ? 'zstd' : 'gzip'
    const runs = coalesce(chunks, this.maxRangeBytes)
    const reading = new Map<number, Promise<{ index: number; bytes: Uint8Array }>>()
    let next = 0
    const start = () => {
      while (next < runs.length && reading.size < this.concurrency) {
        const index = next++
        const run = runs[index]!
        const p = blob.readAt(run.offset, run.end - run.offset, options).then((bytes) => ({ index, bytes }))
        p.catch(() => {})
        reading.set(index, p)
      }
    }
    start()
    // A chunk that does not inflate fails after the others are handed over, so one bad member costs one chunk.
    let failure: unknown
    while (reading.size > 0) {
      const { index, bytes } = await Promise.race(reading.values())
      reading.delete(index)
      start()
      const run = runs[index]!
      for (const chunk of run.chunks) {
        const compressed = bytes.subarray(chunk.offset - run.offset, chunk.end - run.offset)
        try {
          yield { chunk, bytes: await inflateChunk(compression, compressed, chunk, options) }
        } catch (err) {
          failure ??= err
        }
      }
    }
    if (failure !== undefined) throw failure
  }

  /**
   * Indexed layers cannot be read by range (a plain gzip stream has no restart points): the blob is
   * downloaded again and the chunks are cut from the decompressed stream.
   */
  private async *fromWholeBlob(
    layer: ImageLayer,
    chunks: ChunkRef[],
    options: AbortOptions
  ): AsyncIterable<{ chunk: ChunkRef; bytes: Uint8Array }> {
    const dir = await mkdtemp(join(tmpdir(), 'strata-layer-'))
    try {
      const path = join(dir, 'blob')
      await this.client.downloadBlob(this.ref, layer.digest, path, options)
      const sorted = [...chunks].sort((a, b) => a.offset - b.offset)
      const ranges = sorted.map((c) => ({ offset: c.offset + c.innerOffset, length: c.size }))
      for await (const { index, bytes } of sliceStream(
        decompressedStream(path, layer.compression, () => {}, options),
        ranges
      )) {
        yield { chunk: sorted[index]!, bytes }
      }
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  }
}

/** The registry as a chunk source: Range reads of eStargz layers (coalesced), whole-blob reads of indexed layers. */
export function createRegistrySource(init: RegistrySourceInit): ChunkSource {
  return new RegistrySource(init)
}
