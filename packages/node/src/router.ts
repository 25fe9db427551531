import type { ChunkRef, ChunkSource } from '@strata/fetcher'
import type { AbortOptions } from '@strata/store'

/**
 * The registry as one ChunkSource for every image the node has opened: a registry source reads one image's
 * layers, so chunks are routed to the source of the image their layer was opened with.
 */
export class LayerRouter implements ChunkSource {
  readonly name = 'registry'
  private readonly sources = new Map<string, ChunkSource>()

  /** `onFetched` is told about the bytes of each chunk the registry sent (before verification). */
  constructor(private readonly onFetched?: (bytes: number) => void) {}

  add(layers: string[], source: ChunkSource): void {
    for (const layer of layers) if (!this.sources.has(layer)) this.sources.set(layer, source)
  }

  has(layer: string): boolean {
    return this.sources.has(layer)
  }

  async get(chunk: ChunkRef, options?: AbortOptions): Promise<Uint8Array | undefined> {
    const bytes = await this.sources.get(chunk.layer)?.get(chunk, options)
    if (bytes !== undefined) this.onFetched?.(bytes.byteLength)
    return bytes
  }

  async *getMany(chunks: ChunkRef[], options?: AbortOptions): AsyncIterable<{ chunk: ChunkRef; bytes: Uint8Array }> {
    const bySource = new Map<ChunkSource, ChunkRef[]>()
    for (const c of chunks) {
      const source = this.sources.get(c.layer)
      if (source !== undefined) bySource.set(source, [...(bySource.get(source) ?? []), c])
    }
    for (const [source, refs] of bySource) {
      if (source.getMany !== undefined) {
        for await (const got of source.getMany(refs, options)) {
          this.onFetched?.(got.bytes.byteLength)
          yield got
        }
        continue
      }
      for (const chunk of refs) {
        const bytes = await source.get(chunk, options)
        if (bytes === undefined) continue
        this.onFetched?.(bytes.byteLength)
        yield { chunk, bytes }
      }
    }
  }

  reportBad(chunk: ChunkRef, reason: string): void {
    this.sources.get(chunk.layer)?.reportBad?.(chunk, reason)
  }
}
