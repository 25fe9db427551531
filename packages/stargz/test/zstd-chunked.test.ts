/**
 * zstd:chunked as containers/storage writes it (skopeo, podman): 64-byte footer, endOffset, chunk digests only on
 * multi-chunk files, "zeros" chunks. skopeo 1.9 on Debian 12 hangs writing zstd:chunked, so the blob is made
 * here, in that layout (see blobs.ts).
 */
import { randomBytes } from 'node:crypto'
import { describe, expect, it } from 'vitest'
import { bufferReader, openLayer, readFileRange, verifyLayer } from '../src/index.js'
import { containersZstdBlob } from './blobs.js'

describe('zstd:chunked from containers/storage', () => {
  const big = Buffer.concat([randomBytes(70_000), Buffer.alloc(50_000), randomBytes(30_001)])
  const small = Buffer.from('a file of one chunk\n')
  const { blob, manifestChecksum } = containersZstdBlob([
    { name: 'dir/big', content: big, chunkSizes: [70_000, 50_000, 30_001] },
    { name: 'dir/small', content: small },
    { name: 'dir/empty', content: new Uint8Array(0) }
  ])

  it('opens the blob, checks the manifest checksum, and reads every file back', async () => {
    const layer = await openLayer(bufferReader(blob), { manifestChecksum })
    expect(layer.format).toBe('zstd:chunked')
    expect(layer.compression).toBe('zstd')
    const b = layer.toc.lookup('dir/big')!
    expect(b.chunks.map((c) => [c.fileOffset, c.size])).toEqual([
      [0, 70_000],
      [70_000, 50_000],
      [120_000, 30_001]
    ])
    expect(Buffer.from(await readFileRange(bufferReader(blob), layer, b, 0, b.size))).toEqual(big)
    expect(Buffer.from(await readFileRange(bufferReader(blob), layer, b, 69_990, 50_020))).toEqual(
      big.subarray(69_990, 120_010)
    )
    const s = layer.toc.lookup('dir/small')!
    // One chunk, verified by the whole-file digest; its range ends at endOffset, before the next header's frame.
    expect(s.chunks).toHaveLength(1)
    expect(s.chunks[0]!.digest).toBe(s.digest)
    const json = JSON.parse(new TextDecoder().decode(layer.tocBytes)) as {
      entries: { name: string; endOffset?: number }[]
    }
    expect(s.chunks[0]!.end).toBe(json.entries.find((e) => e.name === 'dir/small')!.endOffset)
    expect(new TextDecoder().decode(await readFileRange(bufferReader(blob), layer, s, 0, 100))).toBe(small.toString())
    expect(b.chunks[2]!.end).toBe(json.entries.find((e) => e.name === 'dir/big')!.endOffset)
    expect(layer.toc.lookup('dir/empty')).toMatchObject({ size: 0, chunks: [] })
    expect(b.mtimeMs).toBe(Date.UTC(2023, 0, 2, 2, 4, 5, 123))
    expect(await verifyLayer(bufferReader(blob), layer)).toEqual({
      files: 3,
      chunks: 4,
      bytes: big.length + small.length
    })
  })

  it('refuses a manifest checksum that does not match the compressed TOC', async () => {
    const wrong = `sha256:${'3'.repeat(64)}`
    await expect(openLayer(bufferReader(blob), { manifestChecksum: wrong })).rejects.toMatchObject({
      name: 'TOCDigestMismatchError',
      message: expect.stringMatching(/compressed TOC \(manifest checksum\) mismatch: expected sha256:3{64}/)
    })
  })
})
