/**
 * Conformance with the reference: blobs built by the oracle (the Go eStargz package) from a tar of real files
 * open here with the same TOC digest, and every file's bytes and metadata equal the source tree's.
 */

import { execFile } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { lstat, readdir, readFile, readlink, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { gzipSync } from 'node:zlib'
import { oraclePath } from '@test/tools.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import {
  bufferReader,
  type Entry,
  type FileReadAt,
  fileReader,
  type Layer,
  openLayer,
  readFileRange,
  verifyLayer
} from '../src/index.js'
import { gzipBlob, legacyFooter, tarEntry } from './blobs.js'
import {
  CHUNK,
  LONG_NAME,
  makeSourceTree,
  oracleBuild,
  type SourceTree,
  sha256,
  UNICODE_NAME,
  XATTR_CONTENT,
  XATTR_PATH,
  XATTRS
} from './fixture.js'

let tree: SourceTree
beforeAll(async () => {
  tree = await makeSourceTree()
})
afterAll(async () => {
  await tree?.cleanup()
})

/** Every path in the source tree (relative, '/'-separated), parents before children. */
async function sourcePaths(): Promise<string[]> {
  const names = await readdir(tree.src, { recursive: true })
  return names.map((n) => n.split('\\').join('/')).sort()
}

/** Checks every source file against the layer: type, mode, owner, mtime, size, link target, bytes. */
async function expectLayerEqualsSource(blob: FileReadAt, layer: Layer): Promise<void> {
  const paths = await sourcePaths()
  const inToc = [...layer.toc.entries.keys()].filter((p) => p !== '').sort()
  expect(inToc).toEqual([...paths, 'xattr', XATTR_PATH].sort())
  for (const p of paths) {
    const st = await lstat(join(tree.src, p))
    const e = layer.toc.lookup(p)
    expect(e, p).toBeDefined()
    const entry = e as Entry
    expect({ path: p, mode: entry.mode, uid: entry.uid, gid: entry.gid, mtimeMs: entry.mtimeMs }).toEqual({
      path: p,
      mode: st.mode & 0o7777,
      uid: st.uid,
      gid: st.gid,
      mtimeMs: st.mtimeMs
    })
    if (st.isDirectory()) expect(entry.type, p).toBe('dir')
    else if (st.isFIFO()) expect(entry.type, p).toBe('fifo')
    else if (st.isSymbolicLink()) {
      expect(entry.type, p).toBe('symlink')
      expect(entry.linkName, p).toBe(await readlink(join(tree.src, p)))
    } else {
      expect(st.isFile(), p).toBe(true)
      if (entry.type === 'hardlink') {
        expect((await lstat(join(tree.src, entry.linkName!))).ino, p).toBe(st.ino)
      } else {
        expect(entry.type, p).toBe('reg')
      }
      const want = await readFile(join(tree.src, p))
      expect(entry.size, p).toBe(want.length)
      expect(entry.digest, p).toBe(sha256(want))
      const got = await readFileRange(blob, layer, entry, 0, entry.size)
      expect(sha256(got), p).toBe(sha256(want))
    }
  }
  const x = layer.toc.lookup(XATTR_PATH)!
  expect(x.xattrs).toEqual(XATTRS)
  expect(new TextDecoder().decode(await readFileRange(blob, layer, x, 0, 1000))).toBe(XATTR_CONTENT)
  expect(layer.toc.lookup('xattr')).toMatchObject({ type: 'dir', mode: 0o755 })
}

const variants: { name: string; args: string[]; format: Layer['format'] }[] = [
  { name: 'estargz, 64 KiB chunks', args: ['--chunk-size', String(CHUNK)], format: 'estargz' },
  { name: 'estargz, 100000-byte chunks', args: ['--chunk-size', '100000'], format: 'estargz' },
  { name: 'estargz, default 4 MiB chunks', args: [], format: 'estargz' },
  { name: 'legacy stargz footer', args: ['--chunk-size', String(CHUNK), '--legacy-footer'], format: 'stargz' },
  { name: 'zstd:chunked', args: ['--chunk-size', String(CHUNK), '--zstdchunked'], format: 'zstd:chunked' }
]

describe('blobs built by the reference', () => {
  for (const [i, v] of variants.entries()) {
    it(`reads ${v.name}: TOC digest, metadata and every file's bytes equal the source`, async () => {
      const built = await oracleBuild(tree, `v${i}.blob`, v.args)
      const blob = await fileReader(built.path)
      try {
        const layer = await openLayer(blob, { tocDigest: built.tocDigest })
        expect(layer.format).toBe(v.format)
        expect(layer.compression).toBe(v.format === 'zstd:chunked' ? 'zstd' : 'gzip')
        expect(layer.tocDigest).toBe(built.tocDigest)
        expect(layer.tocOffset).toBe(built.tocOffset)
        expect(layer.size).toBe(blob.size)
        expect(Buffer.from(layer.tocBytes)).toEqual(await oracleBytes(['toc', built.path]))
        expect(layer.toc.prioritized).toEqual([])
        expect(layer.toc.prefetchEnd).toBe(0)
        await expectLayerEqualsSource(blob, layer)
        const chunked = layer.toc.lookup('sizes/three-chunks')!
        if (v.args.includes(String(CHUNK))) expect(chunked.chunks.map((c) => c.size)).toEqual([CHUNK, CHUNK, CHUNK])
        const summary = await verifyLayer(blob, layer)
        expect(summary.files).toBeGreaterThan(10)
        const regs = [...layer.toc.entries.values()].filter((e) => e.type === 'reg')
        expect(summary).toEqual({
          files: regs.length,
          chunks: regs.reduce((n, e) => n + e.chunks.length, 0),
          bytes: regs.reduce((n, e) => n + e.size, 0)
        })
      } finally {
        await blob.close()
      }
    })
  }

  it('reads a legacy stargz TOC without chunk digests: each file is one chunk spanning its gzip members', async () => {
    const built = await oracleBuild(tree, 'legacy-nodigest.blob', ['--chunk-size', String(CHUNK), '--legacy-footer'])
    const original = await readFile(built.path)
    const json = JSON.parse((await oracleBytes(['toc', built.path])).toString()) as {
      entries: Record<string, unknown>[]
    }
    for (const e of json.entries) delete e.chunkDigest
    const toc = gzipSync(tarEntry('stargz.index.json', Buffer.from(JSON.stringify(json))))
    const legacy = Buffer.concat([original.subarray(0, built.tocOffset), toc, legacyFooter(built.tocOffset)])
    const path = join(tree.dir, 'legacy-rewritten.blob')
    await writeFile(path, legacy)
    const blob = await fileReader(path)
    try {
      const layer = await openLayer(blob)
      expect(layer.format).toBe('stargz')
      const big = layer.toc.lookup('sizes/random-200000')!
      expect(big.chunks).toHaveLength(1)
      expect(big.chunks[0]).toMatchObject({ digest: big.digest, fileOffset: 0, size: 200_000 })
      await expectLayerEqualsSource(blob, layer)
      expect(Buffer.from(await readFileRange(blob, layer, big, CHUNK - 5, 10))).toEqual(
        (await readFile(join(tree.src, 'sizes/random-200000'))).subarray(CHUNK - 5, CHUNK + 5)
      )
      expect((await verifyLayer(blob, layer)).files).toBeGreaterThan(10)
    } finally {
      await blob.close()
    }
  })

  it('opens a layer with one read of the blob when the TOC fits in the tail read, two when it does not', async () => {
    const built = await oracleBuild(tree, 'reads.blob', ['--chunk-size', String(CHUNK)])
    const bytes = await readFile(built.path)
    const counting = (b: Uint8Array) => {
      const inner = bufferReader(b)
      const reads: [number, number][] = []
      return {
        reads,
        size: inner.size,
        readAt: (offset: number, length: number) => {
          reads.push([offset, length])
          return inner.readAt(offset, length)
        }
      }
    }
    const one = counting(bytes)
    expect((await openLayer(one, { tocDigest: built.tocDigest })).tocDigest).toBe(built.tocDigest)
    expect(one.reads).toHaveLength(1)
    // A TOC whose compressed size passes the 512 KiB tail guess (an unknown field of random base64).
    const json = JSON.parse((await oracleBytes(['toc', built.path])).toString()) as Record<string, unknown>
    json.padding = randomBytes(600 * 1024).toString('base64')
    const big = gzipBlob(bytes.subarray(0, built.tocOffset), JSON.stringify(json))
    const two = counting(big)
    const layer = await openLayer(two)
    expect(two.reads).toHaveLength(2)
    expect(two.reads[1]).toEqual([built.tocOffset, big.length - 51 - built.tocOffset])
    expect(layer.toc.lookup('sizes/chunk')?.size).toBe(CHUNK)
  })

  it('reads ranges across chunk boundaries the same as the reference `oracle cat`', async () => {
    const built = await oracleBuild(tree, 'ranges.blob', ['--chunk-size', String(CHUNK)])
    const blob = await fileReader(built.path)
    try {
      const layer = await openLayer(blob)
      const entry = layer.toc.lookup('sizes/random-200000')!
      const source = await readFile(join(tree.src, 'sizes/random-200000'))
      for (const [offset, length] of [
        [0, 1],
        [CHUNK - 10, 20],
        [CHUNK, CHUNK],
        [1000, 150_000],
        [199_990, 100],
        [200_000, 10]
      ] as const) {
        const got = await readFileRange(blob, layer, entry, offset, length)
        expect(Buffer.from(got)).toEqual(source.subarray(offset, offset + length))
      }
      const reference = await oracleBytes([
        'cat',
        built.path,
        'sizes/random-200000',
        '--offset',
        '65000',
        '--length',
        '70000'
      ])
      expect(Buffer.from(await readFileRange(blob, layer, entry, 65_000, 70_000))).toEqual(reference)
      const chunkAt = layer.toc.chunkIndexAt(entry, CHUNK)
      expect(chunkAt).toBe(1)
      expect(layer.toc.chunkIndexAt(entry, CHUNK - 1)).toBe(0)
      expect(layer.toc.chunkIndexAt(entry, 200_000)).toBe(-1)
      expect(layer.toc.chunkIndexAt(entry, -1)).toBe(-1)
    } finally {
      await blob.close()
    }
  })

  it('reads prioritized files first: entries before the landmark and the range that holds them', async () => {
    const prioritized = [`./${LONG_NAME}`, `./${UNICODE_NAME}`, './sizes/three-chunks']
    const built = await oracleBuild(tree, 'prio.blob', [
      '--chunk-size',
      String(CHUNK),
      '--prioritized',
      prioritized.join(',')
    ])
    const blob = await fileReader(built.path)
    try {
      const layer = await openLayer(blob, { tocDigest: built.tocDigest })
      // sizes/three-chunks is a hardlink to big-hardlink (first in the tar): its target comes first too.
      const files = layer.toc.prioritized.filter((e) => e.type !== 'dir').map((e) => [e.path, e.type])
      expect(files).toEqual([
        [LONG_NAME, 'reg'],
        [UNICODE_NAME, 'reg'],
        ['big-hardlink', 'reg'],
        ['sizes/three-chunks', 'hardlink']
      ])
      expect(layer.toc.prioritized.map((e) => e.path)).toContain('deep')
      const json = JSON.parse(new TextDecoder().decode(layer.tocBytes)) as {
        entries: { name: string; offset?: number }[]
      }
      const landmark = json.entries.find((e) => e.name === '.prefetch.landmark')!
      expect(layer.toc.prefetchEnd).toBe(landmark.offset)
      for (const e of layer.toc.prioritized)
        for (const c of e.chunks) expect(c.end).toBeLessThanOrEqual(layer.toc.prefetchEnd)
      expect(layer.toc.lookup('.prefetch.landmark')).toBeUndefined()
      await expectLayerEqualsSource(blob, layer)
    } finally {
      await blob.close()
    }
  })
})

/** Runs the oracle and returns its stdout as bytes. */
async function oracleBytes(args: string[]): Promise<Buffer> {
  const { stdout } = await promisify(execFile)(oraclePath(), args, { encoding: 'buffer', maxBuffer: 1 << 28 })
  return stdout
}
