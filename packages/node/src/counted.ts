import type { ChunkRef, ChunkSource, Route, SourceOptions } from '@strata/fetcher'

/**
 * `source` as it is, telling `onFetched` of the bytes of each chunk it sent (before verification) and the route
 * of the fetch that asked for it: the node counts what it fetched to serve peers' forwarded requests apart from
 * its own reads (NodeStatus.bytes.fetchedForPeers).
 */
export function countedSource(
  source: ChunkSource,
  onFetched: (bytes: number, route: Route | undefined) => void
): ChunkSource {
  const many = source.getMany?.bind(source)
  return {
    name: source.name,
    async get(chunk: ChunkRef, options?: SourceOptions): Promise<Uint8Array | undefined> {
      const bytes = await source.get(chunk, options)
      if (bytes !== undefined) onFetched(bytes.byteLength, options?.route)
      return bytes
    },
    ...(many !== undefined && {
      async *getMany(chunks: ChunkRef[], options?: SourceOptions) {
        for await (const got of many(chunks, options)) {
          onFetched(got.bytes.byteLength, options?.route)
          yield got
        }
      }
    }),
    ...(source.reportBad !== undefined && {
      reportBad: (chunk: ChunkRef, reason: string) => source.reportBad?.(chunk, reason)
    })
  }
}
