/**
 * Layers that are not eStargz (tar, tar+gzip, tar+zstd): read whole once, cut into chunks by digest, and
 * described by a synthesized TOC of the same JSON shape, so they are served exactly like eStargz layers.
 * In that TOC, `offset`/`endOffset` are positions in the decompressed tar stream.
 */
import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { open } from 'node:fs/promises'
import { Transform } from 'node:stream'
import { createGunzip, createZstdDecompress } from 'node:zlib'
import type { TOCEntryJSON } from '@strata/stargz'
import type { ChunkStore } from '@strata/store'
import { ByteReader, readTar } from './tar.js'
import type { AbortOptions } from './types.js'

export type BlobCompression = 'gzip' | 'zstd' | 'none'

/** Chunk size of indexed layers, as eStargz's default. */
export const INDEX_CHUNK_SIZE = 4 * 1024 * 1024

/** The compression of a blob file, from its magic bytes. */
export async function detectCompression(path: string): Promise<BlobCompression> {
  const fh = await open(path)
  try {
    const { buffer, bytesRead } = await fh.read(Buffer.alloc(4), 0, 4, 0)
    const head = buffer.subarray(0, bytesRead)
    if (head[0] === 0x1f && head[1] === 0x8b) return 'gzip'
    if (head.equals(Buffer.from([0x28, 0xb5, 0x2f, 0xfd]))) return 'zstd'
    return 'none'
  } finally {
    await fh.close()
  }
}

/** The decompressed bytes of a blob file; `onRaw` sees every compressed byte (to hash the blob on the way). */
export function decompressedStream(
  path: string,
  compression: BlobCompression,
  onRaw: (bytes: Uint8Array) => void,
  options: AbortOptions = {}
): AsyncIterable<Uint8Array> {
  const tap = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      onRaw(chunk)
      cb(null, chunk)
    }
  })
  const file = createReadStream(path, { highWaterMark: 1 << 20, signal: options.signal })
  file.on('error', (err) => tap.destroy(err))
  const raw = file.pipe(tap)
  if (compression === 'none') return raw
  const inflate = compression === 'gzip' ? createGunzip() : createZstdDecompress()
  tap.on('error', (err) => inflate.destroy(err))
  return raw.pipe(inflate)
}

export interface IndexedLayer {
  tocBytes: Uint8Array
  /** Every chunk digest, for pinning. */
  digests: string[]
  files: number
  /** Size of the decompressed tar stream. */
  tarSize: number
}

/**
 * Walks a decompressed tar stream: every regular file is cut into chunks that are hashed and put in the
 * store (they are verified by construction: their digest is computed here), and a TOC is synthesized.
 */
export async function indexTar(
  stream: AsyncIterable<Uint8Array>,
  init: { store: ChunkStore; layer: string; chunkSize?: number },
  options: AbortOptions = {}
): Promise<IndexedLayer> {
  const chunkSize = init.chunkSize ?? INDEX_CHUNK_SIZE
  const reader = new ByteReader(stream)
  const entries: TOCEntryJSON[] = []
  const digests: string[] = []
  let files = 0
  try {
    for await (const h of readTar(reader)) {
      options.signal?.throwIfAborted()
      const entry: TOCEntryJSON = { name: h.name, type: h.type }
      if (h.type === 'reg') entry.size = h.size
      entry.modtime = new Date(h.mtime * 1000).toISOString().replace('.000Z', 'Z')
      if (h.linkName !== '' && (h.type === 'symlink' || h.type === 'hardlink')) entry.linkName = h.linkName
      entry.mode = h.mode
      if (h.uid !== 0) entry.uid = h.uid
      if (h.gid !== 0) entry.gid = h.gid
      if (h.userName !== '') entry.userName = h.userName
      if (h.groupName !== '') entry.groupName = h.groupName
      if (h.type === 'char' || h.type === 'block') {
        entry.devMajor = h.devMajor
        entry.devMinor = h.devMinor
      }
      const xattrNames = Object.keys(h.xattrs)
      if (xattrNames.length > 0) {
        entry.xattrs = Object.fromEntries(xattrNames.map((k) => [k, Buffer.from(h.xattrs[k]!).toString('base64')]))
      }
      entries.push(entry)
      if (h.type !== 'reg') continue
      files++
      const whole = createHash('sha256')
      for (let at = 0; at < h.size; at += chunkSize) {
        const size = Math.min(chunkSize, h.size - at)
        const bytes = await reader.read(size)
        if (bytes.byteLength < size) throw new Error(`the layer ends inside ${h.name}`)
        // The reader may hand out views of a shared buffer; the store keeps its own copy.
        const chunk = Uint8Array.from(bytes)
        whole.update(chunk)
        const digest = `sha256:${createHash('sha256').update(chunk).digest('hex')}`
        await init.store.put(digest, chunk, { layer: init.layer, ...options })
        digests.push(digest)
        const c: TOCEntryJSON = at === 0 ? entry : { name: h.name, type: 'chunk', chunkOffset: at }
        if (at !== 0) entries.push(c)
        c.offset = h.offset + at
        c.endOffset = h.offset + at + size
        if (h.size > chunkSize && at + size < h.size) c.chunkSize = size
        c.chunkDigest = digest
      }
      entry.digest = `sha256:${whole.digest('hex')}`
    }
    // The end-of-archive blocks and any padding after them belong to the stream too.
    while ((await reader.read(1 << 20)).byteLength > 0) {}
  } finally {
    await reader.close()
  }
  const tocBytes = new TextEncoder().encode(JSON.stringify({ version: 1, entries }))
  return { tocBytes, digests, files, tarSize: reader.position }
}

/**
 * The bytes at each range of the decompressed stream (ranges sorted by offset, not overlapping),
 * yielded in order as the stream passes them.
 */
export async function* sliceStream(
  stream: AsyncIterable<Uint8Array>,
  ranges: Array<{ offset: number; length: number }>
): AsyncGenerator<{ index: number; bytes: Uint8Array }> {
  const reader = new ByteReader(stream)
  try {
    for (const [index, r] of ranges.entries()) {
      if (!(await reader.skip(r.offset - reader.position))) return
      const bytes = await reader.read(r.length)
      yield { index, bytes: Uint8Array.from(bytes) }
    }
  } finally {
    await reader.close()
  }
}
