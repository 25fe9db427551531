export * from './build-errors.js'
export { type BuildOptions, type BuildResult, buildEstargz } from './builder.js'
export {
  type ChunkOptions,
  inflateChunk,
  readChunk,
  readFileRange,
  type VerifyLayerOptions,
  type VerifyLayerResult,
  verifyChunk,
  verifyLayer
} from './chunk.js'
export * from './errors.js'
export { type Footer, MAX_FOOTER_SIZE, parseFooter } from './footer.js'
export { DEFAULT_MAX_TOC_BYTES, type OpenLayerOptions, openLayer } from './layer.js'
export { bufferReader, type FileReadAt, fileReader } from './readat.js'
export { type TarHeader, TarParser } from './tar.js'
export { implicitDir, NO_PREFETCH_LANDMARK, type ParseTOCOptions, PREFETCH_LANDMARK, parseTOC } from './toc.js'
export type * from './types.js'
