// The fetcher's types, by level: chunk-types.ts (chunks, sources, the engine), file-types.ts (the file reader),
// image-types.ts (images, prefetch, the Fetcher composing them).
export type * from './chunk-types.js'
export type * from './file-types.js'
export type * from './image-types.js'
