/** Hand-made blobs: TOCs and footers of the test's choosing, and a zstd:chunked blob in the containers/storage layout. */
import { createHash } from 'node:crypto'
import { gzipSync, zstdCompressSync } from 'node:zlib'

/** A tar holding one regular file `name` with `content`, then the tar trailer. */
export function tarEntry(name: string, content: Uint8Array): Buffer {
  const h = Buffer.alloc(512)
  h.write(name, 0)
  h.write('0000644\0', 100)
  h.write('0000000\0', 108)
  h.write('0000000\0', 116)
  h.write(`${content.length.toString(8).padStart(11, '0')}\0`, 124)
  h.write('00000000000\0', 136)
  h[156] = 0x30
  h.write('ustar\0', 257)
  h.write('00', 263)
  h.fill(0x20, 148, 156)
  let sum = 0
  for (const b of h) sum += b
  h.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148)
  return Buffer.concat([h, content, Buffer.alloc((512 - (content.length % 512)) % 512), Buffer.alloc(1024)])
}

/** The 51-byte eStargz footer for a TOC at `tocOffset`. */
export function estargzFooter(tocOffset: number): Buffer {
  const f = Buffer.alloc(51)
  Buffer.from([0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 26, 0, 0x53, 0x47, 22, 0]).copy(f, 0)
  f.write(`${tocOffset.toString(16).padStart(16, '0')}STARGZ`, 16, 'latin1')
  Buffer.from([0x01, 0x00, 0x00, 0xff, 0xff]).copy(f, 38)
  return f
}

/** The 47-byte legacy stargz footer: the offset in the raw extra field, without a subfield header. */
export function legacyFooter(tocOffset: number): Buffer {
  const f = Buffer.alloc(47)
  Buffer.from([0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 22, 0]).copy(f, 0)
  f.write(`${tocOffset.toString(16).padStart(16, '0')}STARGZ`, 12, 'latin1')
  Buffer.from([0x01, 0x00, 0x00, 0xff, 0xff]).copy(f, 34)
  return f
}

/** The zstd:chunked footer: a skippable frame with offset, compressed and uncompressed TOC size, type 1, magic. */
export function zstdChunkedFooter(tocOffset: number, compressed: number, uncompressed: number, type = 1n): Buffer {
  const f = Buffer.alloc(48)
  f.writeUInt32LE(0x184d2a50, 0)
  f.writeUInt32LE(40, 4)
  f.writeBigUInt64LE(BigInt(tocOffset), 8)
  f.writeBigUInt64LE(BigInt(compressed), 16)
  f.writeBigUInt64LE(BigInt(uncompressed), 24)
  f.writeBigUInt64LE(type, 32)
  f.write('GnUlInUx', 40, 'latin1')
  return f
}

/** `payload` (the blob up to its TOC) followed by a gzip TOC member holding `json` and an eStargz footer. */
export function gzipBlob(payload: Uint8Array, json: string | Uint8Array): Buffer {
  const toc = gzipSync(tarEntry('stargz.index.json', typeof json === 'string' ? Buffer.from(json) : json))
  return Buffer.concat([payload, toc, estargzFooter(payload.length)])
}

/** `payload` followed by a zstd:chunked TOC (in a skippable frame) holding `json` and the zstd:chunked footer. */
export function zstdBlob(payload: Uint8Array, json: string): Buffer {
  const toc = zstdCompressSync(Buffer.from(json))
  const frame = Buffer.alloc(8)
  frame.writeUInt32LE(0x184d2a50, 0)
  frame.writeUInt32LE(toc.length, 4)
  return Buffer.concat([
    payload,
    frame,
    toc,
    zstdChunkedFooter(payload.length + 8, toc.length, Buffer.byteLength(json))
  ])
}

export interface ContainersFile {
  name: string
  content: Uint8Array
  /** Sizes of the file's chunks (content-defined in the real writer); one chunk when absent. */
  chunkSizes?: number[]
}

/**
 * A zstd:chunked blob laid out the way containers/storage (skopeo, podman) writes it: the tar header of each file
 * in its own frame, each chunk of the payload in a frame, `endOffset` on the reg entry (the end of the whole
 * file's payload), chunk digests only on files of more than one chunk, `chunkType: "zeros"` on runs of zeros,
 * the TOC and a tar-split in skippable frames, and the 64-byte footer.
 */
export function containersZstdBlob(files: ContainersFile[]): { blob: Buffer; manifestChecksum: string } {
  const parts: Buffer[] = []
  let pos = 0
  const push = (b: Buffer) => {
    parts.push(b)
    pos += b.length
  }
  const digest = (b: Uint8Array) => `sha256:${createHash('sha256').update(b).digest('hex')}`
  const entries: Record<string, unknown>[] = [{ type: 'dir', name: 'dir/', mode: 0o755 }]
  let padding: Buffer = Buffer.alloc(0)
  for (const f of files) {
    push(zstdCompressSync(Buffer.concat([padding, tarEntry(f.name, f.content).subarray(0, 512)])))
    const main: Record<string, unknown> = {
      type: 'reg',
      name: f.name,
      mode: 0o644,
      size: f.content.length,
      modtime: '2023-01-02T03:04:05.123456789+01:00'
    }
    entries.push(main)
    padding = Buffer.alloc((512 - (f.content.length % 512)) % 512)
    if (f.content.length === 0) continue
    const chunks: Record<string, unknown>[] = []
    let at = 0
    for (const size of f.chunkSizes ?? [f.content.length]) {
      const bytes = f.content.subarray(at, at + size)
      chunks.push({
        offset: pos,
        chunkOffset: at,
        chunkSize: size,
        chunkDigest: digest(bytes),
        ...(bytes.every((b) => b === 0) ? { chunkType: 'zeros' } : {})
      })
      push(zstdCompressSync(bytes))
      at += size
    }
    Object.assign(main, { digest: digest(f.content), offset: chunks[0]!.offset, endOffset: pos })
    if (chunks.length > 1) {
      Object.assign(main, chunks[0])
      for (const c of chunks.slice(1)) entries.push({ type: 'chunk', name: f.name, ...c })
    }
  }
  entries.push({ type: 'symlink', name: 'dir/link', linkName: '../a' })
  push(zstdCompressSync(Buffer.concat([padding, Buffer.alloc(1024)])))
  const toc = Buffer.from(JSON.stringify({ version: 1, entries, tarSplitDigest: `sha256:${'0'.repeat(64)}` }))
  const compressed = zstdCompressSync(toc)
  const tocOffset = pos + 8
  push(skippable(compressed))
  const tarSplit = zstdCompressSync(Buffer.from('{"type":1}\n'))
  const tarSplitOffset = pos + 8
  push(skippable(tarSplit))
  const footer = Buffer.alloc(64)
  const fields = [tocOffset, compressed.length, toc.length, 1, tarSplitOffset, tarSplit.length, 11]
  fields.forEach((v, i) => {
    footer.writeBigUInt64LE(BigInt(v), i * 8)
  })
  footer.write('GnUlInUx', 56, 'latin1')
  push(skippable(footer))
  return { blob: Buffer.concat(parts), manifestChecksum: digest(compressed) }
}

function skippable(data: Buffer): Buffer {
  const h = Buffer.alloc(8)
  h.writeUInt32LE(0x184d2a50, 0)
  h.writeUInt32LE(data.length, 4)
  return Buffer.concat([h, data])
}
