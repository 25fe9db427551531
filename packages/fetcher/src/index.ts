// @strata/fetcher: the one read path: store -> peers -> registry; verify; single-flight; prefetch.
// In two layers: the chunk engine (engine.ts: single flight, hedged batches in batch.ts, liveness in liveness.ts)
// and the file reader over it (reader.ts: chunk arithmetic, in-place reads, chunk buffer, read-ahead). The
// Fetcher (fetcher.ts) composes them with image prefetch (prefetch.ts).

export { ByteBudget } from './budget.js'
export { type ChunkEngineInit, createChunkEngine } from './engine.js'
export {
  BadChunkBytesError,
  ChunkUnavailableError,
  LayerDigestMismatchError,
  SourceTimeoutError,
  UnsupportedLayerError,
  UnverifiedLayerError
} from './errors.js'
export { chunkRef, createFetcher, type FetcherInit, stallBound } from './fetcher.js'
export {
  isRegistryOutage,
  type OpenImageInit,
  openImage,
  type ResolveImageInit,
  resolveImage
} from './image.js'
export { createFileReader, type FileReaderInit } from './reader.js'
export { createRegistrySource, type RegistrySourceInit } from './registry-source.js'
export type * from './types.js'
