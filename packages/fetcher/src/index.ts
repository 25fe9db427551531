// @strata/fetcher: the one read path: store -> peers -> registry; verify; single-flight; prefetch.
export {
  BadChunkBytesError,
  ChunkUnavailableError,
  LayerDigestMismatchError,
  SourceTimeoutError,
  TocDigestMismatchError,
  UnsupportedLayerError,
  UnverifiedLayerError
} from './errors.js'
export { chunkRef, createFetcher, type FetcherInit, stallBound } from './fetcher.js'
export {
  isRegistryOutage,
  type OpenImageInit,
  openImage,
  type ResolveImageInit,
  resolveImage,
  TOC_DIGEST_ANNOTATION
} from './image.js'
export { createRegistrySource, type RegistrySourceInit } from './registry-source.js'
export type * from './types.js'
