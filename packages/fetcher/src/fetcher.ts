// The Fetcher: the chunk engine (engine.ts), the file reader over it (reader.ts) and image prefetch (prefetch.ts),
// with one set of counters and one stream of events.
import type { AbortOptions } from '@strata/base'
import type { Entry } from '@strata/stargz'
import type { ChunkStore } from '@strata/store'
import type { ByteBudget } from './budget.js'
import { type ChunkEngineInit, createChunkEngine } from './engine.js'
import { Metrics } from './metrics.js'
import { prefetchImage } from './prefetch.js'
import { createFileReader, type FileReaderInit } from './reader.js'
import type {
  ChunkEngine,
  ChunkRef,
  FetchEvent,
  Fetcher,
  FetcherMetrics,
  FileReader,
  GetManyOptions,
  GetOptions,
  Image,
  ImageLayer,
  PrefetchOptions
} from './types.js'

export { chunkRef } from './chunk-ref.js'
export { stallBound } from './liveness.js'

export interface FetcherInit
  extends Omit<ChunkEngineInit, 'onEvent' | 'counters'>,
    Omit<FileReaderInit, 'engine' | 'store' | 'onEvent' | 'counters'> {
  store: ChunkStore
}

class DefaultFetcher extends EventTarget implements Fetcher {
  private readonly counters = new Metrics()
  private readonly engine: ChunkEngine
  private readonly reader: FileReader

  constructor(init: FetcherInit) {
    super()
    const onEvent = (event: FetchEvent) => this.emit(event)
    this.engine = createChunkEngine({ ...init, counters: this.counters, onEvent })
    this.reader = createFileReader({ ...init, engine: this.engine, counters: this.counters, onEvent })
  }

  private emit(event: FetchEvent): void {
    this.dispatchEvent(new CustomEvent(event.type, { detail: event }))
  }

  metrics(): FetcherMetrics {
    return this.counters.snapshot()
  }

  get(chunk: ChunkRef, options?: GetOptions): Promise<Uint8Array> {
    return this.engine.get(chunk, options)
  }

  getMany(chunks: ChunkRef[], options?: GetManyOptions): Promise<Uint8Array[]> {
    return this.engine.getMany(chunks, options)
  }

  getEach(chunks: ChunkRef[], options?: GetManyOptions): Array<Promise<Uint8Array>> {
    return this.engine.getEach(chunks, options)
  }

  missing(chunks: ChunkRef[], options?: AbortOptions): Promise<ChunkRef[]> {
    return this.engine.missing(chunks, options)
  }

  ensure(chunks: ChunkRef[], options?: AbortOptions, budget?: ByteBudget): Promise<number> {
    return this.engine.ensure(chunks, options, budget)
  }

  readRange(
    layer: ImageLayer,
    entry: Entry,
    offset: number,
    into: Uint8Array,
    options?: AbortOptions
  ): Promise<number> {
    return this.reader.readRange(layer, entry, offset, into, options)
  }

  storedFile(layer: ImageLayer, entry: Entry, options?: AbortOptions): Promise<string | undefined> {
    return this.reader.storedFile(layer, entry, options)
  }

  prefetch(image: Image, options: PrefetchOptions = {}): Promise<void> {
    return prefetchImage(this.engine, image, options, (event) => this.emit(event))
  }
}

export function createFetcher(init: FetcherInit): Fetcher {
  return new DefaultFetcher(init)
}
