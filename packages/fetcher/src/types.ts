// The fetcher's types, by level: chunk-types.ts (chunks, sources, the engine), file-types.ts (the file reader),
// image-types.ts (images, prefetch); and here the Fetcher composing them (here, so the levels import only downwards).
import type { ChunkEngine } from './chunk-types.js'
import type { FileReader } from './file-types.js'
import type { Image, PrefetchOptions } from './image-types.js'

export type * from './chunk-types.js'
export type * from './file-types.js'
export type * from './image-types.js'

/** The one read path: the chunk engine and the file reader over it, plus image prefetch; their events. */
export interface Fetcher extends ChunkEngine, FileReader, EventTarget {
  /** Fetches the prioritized files of every layer (those before `.prefetch.landmark`) into the store. */
  prefetch(image: Image, options?: PrefetchOptions): Promise<void>
}
