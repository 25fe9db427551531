/** Hand-made blobs for bad-input tests: an existing blob's payload with a TOC and footer of the test's choosing. */
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
