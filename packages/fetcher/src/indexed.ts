/**
 * Layers that are not eStargz (tar, tar+gzip, tar+zstd): read whole once, cut into chunks by digest, and
 * described by a synthesized TOC of the same JSON shape, so they are served exactly like eStargz layers.
 * In that TOC, `offset`/`endOffset` are positions in the decompressed tar stream.
 */
import { createReadStream } from 'node:fs'
import { open } from 'node:fs/promises'
import { Transform } from 'node:stream'
import { createGunzip, createZstdDecompress } from 'node:zlib'
import { type AbortOptions, type DigestHasher, digestHasher, sha256Digest } from '@strata/base'
import { type EntryType, type TarHeader, TarParser, type TOCEntryJSON } from '@strata/stargz'
import type { ChunkStore } from '@strata/store'

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

/** TOC entry types by tar typeflag ('7' is a contiguous file); entries of other types are left out. */
const TYPES: Record<string, EntryType> = {
  '0': 'reg',
  '7': 'reg',
  '1': 'hardlink',
  '2': 'symlink',
  '3': 'char',
  '4': 'block',
  '5': 'dir',
  '6': 'fifo'
}

const XATTR = 'SCHILY.xattr.'

/** The TOC entry of a tar header (without chunks and digest). */
function tocEntry(h: TarHeader, type: EntryType): TOCEntryJSON {
  const entry: TOCEntryJSON = { name: h.name, type }
  if (type === 'reg') entry.size = h.size
  entry.modtime = new Date(h.mtimeSec * 1000 + Math.floor(h.mtimeNsec / 1e6)).toISOString().replace('.000Z', 'Z')
  if (h.linkname !== '' && (type === 'symlink' || type === 'hardlink')) entry.linkName = h.linkname
  entry.mode = h.mode & 0o7777
  if (h.uid !== 0) entry.uid = h.uid
  if (h.gid !== 0) entry.gid = h.gid
  if (h.uname !== '') entry.userName = h.uname
  if (h.gname !== '') entry.groupName = h.gname
  if (type === 'char' || type === 'block') {
    entry.devMajor = h.devmajor
    entry.devMinor = h.devminor
  }
  const xattrs = [...h.pax].filter(([k]) => k.startsWith(XATTR))
  if (xattrs.length > 0) {
    entry.xattrs = Object.fromEntries(
      xattrs.map(([k, v]) => [k.slice(XATTR.length), Buffer.from(v).toString('base64')])
    )
  }
  return entry
}

/**
 * Walks a decompressed tar stream (with the stargz package's tar parser): every regular file is cut into
 * chunks that are hashed and put in the store (they are verified by construction: their digest is computed
 * here), and a TOC is synthesized.
 */
export async function indexTar(
  stream: AsyncIterable<Uint8Array>,
  init: { store: ChunkStore; layer: string; chunkSize?: number },
  options: AbortOptions = {}
): Promise<IndexedLayer> {
  const chunkSize = init.chunkSize ?? INDEX_CHUNK_SIZE
  const parser = new TarParser()
  const entries: TOCEntryJSON[] = []
  const digests: string[] = []
  let files = 0
  /** Stream offset of the next byte. */
  let position = 0
  /** The regular file whose content is being cut into chunks: its entry, the chunk filling up, the hash of it all. */
  let file:
    | { h: TarHeader; entry: TOCEntryJSON; chunk: Uint8Array; at: number; filled: number; whole: DigestHasher }
    | undefined

  const nextChunk = (f: NonNullable<typeof file>) => new Uint8Array(Math.min(chunkSize, f.h.size - f.at))
  /** Takes the file's bytes out of `buf` (at stream offset `start`); a full chunk goes to the store. */
  const feed = async (buf: Uint8Array, start: number) => {
    const f = file!
    let from = Math.max(f.h.dataOffset + f.at + f.filled, start) - start
    while (file === f && from < buf.byteLength) {
      const n = Math.min(f.chunk.byteLength - f.filled, buf.byteLength - from)
      f.chunk.set(buf.subarray(from, from + n), f.filled)
      f.filled += n
      from += n
      if (f.filled < f.chunk.byteLength) break
      await keepChunk(f)
    }
  }
  const keepChunk = async (f: NonNullable<typeof file>) => {
    const { chunk, at } = f
    f.whole.update(chunk)
    const digest = sha256Digest(chunk)
    await init.store.put(digest, chunk, { layer: init.layer, ...options })
    digests.push(digest)
    const c: TOCEntryJSON = at === 0 ? f.entry : { name: f.h.name, type: 'chunk', chunkOffset: at }
    if (at !== 0) entries.push(c)
    c.offset = f.h.dataOffset + at
    c.endOffset = f.h.dataOffset + at + chunk.byteLength
    if (f.h.size > chunkSize && at + chunk.byteLength < f.h.size) c.chunkSize = chunk.byteLength
    c.chunkDigest = digest
    f.at += chunk.byteLength
    f.filled = 0
    if (f.at < f.h.size) f.chunk = nextChunk(f)
    else {
      f.entry.digest = f.whole.digest()
      file = undefined
    }
  }

  for await (const buf of stream) {
    options.signal?.throwIfAborted()
    const start = position
    position += buf.byteLength
    // Headers come before their content: what the previous file still owns of `buf` comes first.
    if (file !== undefined) await feed(buf, start)
    for (const h of parser.push(buf)) {
      const type = TYPES[h.typeflag]
      if (type === undefined) continue
      const entry = tocEntry(h, type)
      entries.push(entry)
      if (type !== 'reg') continue
      files++
      if (h.size === 0) {
        entry.digest = sha256Digest('')
        continue
      }
      file = { h, entry, chunk: new Uint8Array(0), at: 0, filled: 0, whole: digestHasher() }
      file.chunk = nextChunk(file)
      await feed(buf, start)
    }
  }
  parser.end()
  if (file !== undefined) throw new Error(`the layer ends inside ${file.h.name}`)
  const tocBytes = new TextEncoder().encode(JSON.stringify({ version: 1, entries }))
  return { tocBytes, digests, files, tarSize: position }
}

/**
 * The bytes at each range of the decompressed stream (ranges sorted by offset, not overlapping),
 * yielded in order as the stream passes them; ranges the stream ends before are not yielded.
 */
export async function* sliceStream(
  stream: AsyncIterable<Uint8Array>,
  ranges: Array<{ offset: number; length: number }>
): AsyncGenerator<{ index: number; bytes: Uint8Array }> {
  let index = 0
  /** The range being filled (it spans buffers). */
  let bytes: Uint8Array | undefined
  /** Stream offset of the first byte of `buf`. */
  let position = 0
  if (ranges.length === 0) return
  for await (const buf of stream) {
    const end = position + buf.byteLength
    while (index < ranges.length) {
      const r = ranges[index]!
      const rangeEnd = r.offset + r.length
      if (r.offset >= end && r.length > 0) break
      bytes ??= new Uint8Array(r.length)
      const from = Math.max(r.offset, position)
      const to = Math.min(rangeEnd, end)
      if (to > from) bytes.set(buf.subarray(from - position, to - position), from - r.offset)
      if (rangeEnd > end) break
      yield { index, bytes }
      bytes = undefined
      index++
    }
    position = end
    if (index >= ranges.length) return
  }
}
