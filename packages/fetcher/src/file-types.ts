// The file level: bytes of a file of a layer, whatever its chunks.
import type { AbortOptions } from '@strata/base'
import type { Entry } from '@strata/stargz'
import type { ImageLayer } from './image-types.js'

/**
 * Reads files: owns the chunk arithmetic (the TOC's chunkIndexAt), the store's in-place fast path, the chunk
 * buffer and read-ahead. What a mount reads through.
 */
export interface FileReader {
  /**
   * Copies the bytes of a file from `offset` into `into` (`into.length` of them, fewer at the end of the file);
   * the count copied. Straight from the store when it holds the chunks (no chunk in memory), else through the
   * engine and the chunk buffer. Starts a bounded read-ahead of the rest of the file into the store.
   */
  readRange(layer: ImageLayer, entry: Entry, offset: number, into: Uint8Array, options?: AbortOptions): Promise<number>
  /**
   * The verified local file of a file held whole in one chunk in the store (the chunk file), or undefined (not
   * one chunk, not stored, damaged, or a store without files): what a mount hands the kernel for passthrough.
   */
  storedFile(layer: ImageLayer, entry: Entry, options?: AbortOptions): Promise<string | undefined>
}
