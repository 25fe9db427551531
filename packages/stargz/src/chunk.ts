import { createGunzip, createZstdDecompress } from 'node:zlib'
import { type AbortOptions, digestHasher, sha256Digest } from '@strata/base'
import {
  BlobTruncatedError,
  ChunkDecompressError,
  ChunkDigestMismatchError,
  ChunkTooLargeError,
  ChunkTruncatedError,
  FileDigestMismatchError,
  NotAFileError
} from './errors.js'
import type { Chunk, Compression, Entry, Layer, ReadAt } from './types.js'

export interface ChunkOptions extends AbortOptions {
  /** The file the chunk belongs to, named in error messages. */
  path?: string
}

/** Size of the pieces the decompressor hands over; bigger means fewer events per chunk. */
const INFLATE_PIECE = 256 * 1024

/**
 * Inflates a chunk from `compressed`, the bytes [chunk.offset, chunk.end) of the blob (whole gzip members or zstd
 * frames): skips chunk.innerOffset bytes and returns the next chunk.size. Stops decompressing as soon as it has
 * them, so a range that inflates to more (the next tar header, or garbage) costs nothing extra.
 * Does not verify: see verifyChunk.
 */
export function inflateChunk(
  compression: Compression,
  compressed: Uint8Array,
  chunk: Chunk,
  options?: ChunkOptions
): Promise<Uint8Array> {
  const what = `chunk ${chunk.digest}${options?.path !== undefined ? ` of ${options.path}` : ''}`
  const signal = options?.signal
  return new Promise((resolve, reject) => {
    signal?.throwIfAborted()
    let out: Buffer
    try {
      out = Buffer.allocUnsafeSlow(chunk.size)
    } catch (err) {
      throw new ChunkTooLargeError(`${what} is ${chunk.size} bytes: cannot hold it in memory`, {
        cause: err,
        hint: 'layers without chunk digests verify each file as one chunk: convert the layer to eStargz'
      })
    }
    let skip = chunk.innerOffset
    let got = 0
    const z =
      compression === 'gzip'
        ? createGunzip({ chunkSize: INFLATE_PIECE })
        : createZstdDecompress({ chunkSize: INFLATE_PIECE })
    const settle = (err?: Error) => {
      signal?.removeEventListener('abort', onAbort)
      z.removeAllListeners('data')
      z.removeAllListeners('end')
      z.on('error', () => {})
      z.destroy()
      if (err !== undefined) reject(err)
      else resolve(out)
    }
    const onAbort = () => settle(signal?.reason as Error)
    signal?.addEventListener('abort', onAbort, { once: true })
    z.on('data', (piece: Buffer) => {
      let p = piece
      if (skip > 0) {
        const n = Math.min(skip, p.length)
        skip -= n
        p = p.subarray(n)
      }
      const n = Math.min(p.length, chunk.size - got)
      p.copy(out, got, 0, n)
      got += n
      if (got === chunk.size) settle()
    })
    z.on('end', () =>
      settle(
        new ChunkTruncatedError(
          `${what} inflates to ${got} of its ${chunk.size} bytes (after skipping ${chunk.innerOffset})`,
          { hint: 'the blob or the compressed range read from it is truncated or corrupted' }
        )
      )
    )
    z.on('error', (err) =>
      settle(
        new ChunkDecompressError(
          `${what}: ${compression} data at blob offset ${chunk.offset} is corrupt: ${err.message}`,
          {
            cause: err,
            hint: 'the blob is corrupted or the range read from it is wrong: pull the layer again'
          }
        )
      )
    )
    if (chunk.size === 0) settle()
    else z.end(compressed)
  })
}

/** Checks that `bytes` are the chunk: its size and its sha256. Throws ChunkDigestMismatchError. */
export function verifyChunk(bytes: Uint8Array, chunk: Chunk, options?: { path?: string }): void {
  const actual = sha256Digest(bytes)
  if (bytes.length !== chunk.size || actual !== chunk.digest) {
    throw new ChunkDigestMismatchError(
      chunk.digest,
      bytes.length !== chunk.size ? `${bytes.length} bytes` : actual,
      options
    )
  }
}

/** Reads a chunk's compressed range from the blob, inflates and verifies it. */
export async function readChunk(blob: ReadAt, layer: Layer, chunk: Chunk, options?: ChunkOptions): Promise<Uint8Array> {
  const length = chunk.end - chunk.offset
  const compressed = await blob.readAt(chunk.offset, length, options)
  if (compressed.length !== length) {
    throw new BlobTruncatedError(
      `blob ends at ${chunk.offset + compressed.length}, before the end ${chunk.end} of chunk ${chunk.digest}${options?.path !== undefined ? ` of ${options.path}` : ''}`,
      { hint: 'the blob is truncated: pull the layer again' }
    )
  }
  const bytes = await inflateChunk(layer.compression, compressed, chunk, options)
  verifyChunk(bytes, chunk, options)
  return bytes
}

/**
 * Reads `length` bytes of a file from `offset` (fewer at the end of the file), verifying every chunk it touches.
 * For tools and tests: the hot path reads chunks through the fetcher.
 */
export async function readFileRange(
  blob: ReadAt,
  layer: Layer,
  entry: Entry,
  offset: number,
  length: number,
  options?: AbortOptions
): Promise<Uint8Array> {
  const file = entry.type === 'hardlink' ? layer.toc.lookup(entry.linkName ?? '') : entry
  if (file?.type !== 'reg') {
    throw new NotAFileError(`${entry.path} is a ${entry.type}, not a regular file`)
  }
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new RangeError(`invalid file range: offset ${offset}, length ${length}`)
  }
  const end = Math.min(file.size, offset + length)
  const out = new Uint8Array(Math.max(0, end - offset))
  let i = layer.toc.chunkIndexAt(file, offset)
  for (let pos = offset; pos < end && i >= 0 && i < file.chunks.length; i++) {
    const chunk = file.chunks[i]!
    const bytes = await readChunk(blob, layer, chunk, { ...options, path: file.path })
    const from = pos - chunk.fileOffset
    const n = Math.min(chunk.size - from, end - pos)
    out.set(bytes.subarray(from, from + n), pos - offset)
    pos += n
  }
  return out
}

export interface VerifyLayerResult {
  /** Regular files checked (hardlinks share their target's content and are not counted). */
  files: number
  chunks: number
  /** Uncompressed bytes checked. */
  bytes: number
}

export interface VerifyLayerOptions extends AbortOptions {
  /** Chunks read and inflated at a time, ahead of the one being checked (default 4). */
  concurrency?: number
  /** Called after each chunk with the uncompressed bytes checked so far. */
  onProgress?: (bytes: number) => void
}

/**
 * Reads every chunk of every regular file, checks each chunk digest and each whole-file digest.
 * Throws on the first failure in TOC order, naming the file and the digest.
 */
export async function verifyLayer(
  blob: ReadAt,
  layer: Layer,
  options?: VerifyLayerOptions
): Promise<VerifyLayerResult> {
  const concurrency = Math.max(1, options?.concurrency ?? 4)
  const files = [...layer.toc.entries.values()].filter((e) => e.type === 'reg')
  const work = files.flatMap((entry) => entry.chunks.map((chunk) => ({ entry, chunk })))
  // Reads run ahead of the checks, in order; a read that fails after an earlier failure is never awaited.
  const queue: Promise<Uint8Array>[] = []
  let next = 0
  const fill = () => {
    while (next < work.length && queue.length < concurrency) {
      const { entry, chunk } = work[next++]!
      const read = readChunk(blob, layer, chunk, { ...options, path: entry.path })
      read.catch(() => {})
      queue.push(read)
    }
  }
  const result: VerifyLayerResult = { files: 0, chunks: 0, bytes: 0 }
  for (const entry of files) {
    // A one-chunk file whose chunk digest is the file digest is verified with its chunk.
    const only = entry.chunks.length === 1 && entry.chunks[0]!.digest === entry.digest
    const hash = only ? undefined : digestHasher()
    for (let i = 0; i < entry.chunks.length; i++) {
      fill()
      const bytes = await queue.shift()!
      hash?.update(bytes)
      result.chunks++
      result.bytes += bytes.length
      options?.onProgress?.(result.bytes)
    }
    const actual = hash === undefined ? entry.digest : hash.digest()
    if (entry.digest !== undefined && actual !== entry.digest) {
      throw new FileDigestMismatchError(entry.path, entry.digest, actual!)
    }
    result.files++
  }
  return result
}
