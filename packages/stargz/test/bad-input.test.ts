/**
 * Bad input: truncated and corrupted blobs, hostile TOCs. Each must fail with a typed StargzError whose message
 * says what is wrong; nothing may crash with a TypeError or hang.
 */
import { readFile } from 'node:fs/promises'
import { gzipSync } from 'node:zlib'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import {
  bufferReader,
  DEFAULT_MAX_TOC_BYTES,
  fileReader,
  inflateChunk,
  type Layer,
  openLayer,
  parseFooter,
  parseTOC,
  readChunk,
  readFileRange,
  verifyChunk,
  verifyLayer
} from '../src/index.js'
import { estargzFooter, gzipBlob, tarEntry, zstdBlob, zstdChunkedFooter } from './blobs.js'
import { CHUNK, makeSourceTree, oracleBuild, type SourceTree } from './fixture.js'

let tree: SourceTree
let blob: Buffer
let layer: Layer
let tocJSON: { version: number; entries: Record<string, unknown>[] }

beforeAll(async () => {
  tree = await makeSourceTree()
  const built = await oracleBuild(tree, 'bad.blob', ['--chunk-size', String(CHUNK)])
  blob = await readFile(built.path)
  layer = await openLayer(bufferReader(blob))
  tocJSON = JSON.parse(new TextDecoder().decode(layer.tocBytes))
})
afterAll(async () => {
  await tree?.cleanup()
})

/** Resolves to the error the promise rejects with (fails the test if it resolves). */
async function failure(p: Promise<unknown>): Promise<Error & { code?: string; hint?: string }> {
  try {
    await p
  } catch (err) {
    return err as Error
  }
  throw new Error('expected a failure, but it succeeded')
}

function failureSync(f: () => unknown): Error & { code?: string } {
  try {
    f()
  } catch (err) {
    return err as Error
  }
  throw new Error('expected a failure, but it succeeded')
}

/** A footer as the last 72 bytes of a blob (MAX_FOOTER_SIZE). */
const tail72 = (footer: Buffer) => Buffer.concat([Buffer.alloc(72 - footer.length), footer])
const payload = () => blob.subarray(0, layer.tocOffset)
const opts = () => ({ format: 'estargz' as const, tocOffset: layer.tocOffset, blobSize: blob.length })

/** The TOC's entries with one changed by `edit` (by index), as a parseTOC input. */
function tocWith(edit: (entries: Record<string, unknown>[]) => unknown[]): Uint8Array {
  const entries = structuredClone(tocJSON.entries)
  return new TextEncoder().encode(JSON.stringify({ version: 1, entries: edit(entries) }))
}

const entryIndex = (name: string, type = 'reg') => tocJSON.entries.findIndex((e) => e.name === name && e.type === type)

describe('truncated and corrupted blobs', () => {
  it('refuses every truncation of the blob with a typed error', async () => {
    const cuts = [0, 10, 46, 47, 100, layer.tocOffset, layer.tocOffset + 20, blob.length - 52, blob.length - 1]
    for (const n of cuts) {
      const err = await failure(openLayer(bufferReader(blob.subarray(0, n))))
      expect(['InvalidFooterError', 'TOCDecompressError'], `cut at ${n}: ${err.message}`).toContain(err.name)
      expect(err.message).toMatch(/footer|TOC|blob/)
    }
  })

  it('refuses a garbage footer and says the layer is not eStargz', async () => {
    const bad = Buffer.concat([blob.subarray(0, blob.length - 51), Buffer.alloc(51, 0x41)])
    const err = await failure(openLayer(bufferReader(bad)))
    expect(err.name).toBe('InvalidFooterError')
    expect(err.code).toBe('ERR_STARGZ_INVALID_FOOTER')
    expect(err.message).toMatch(/no eStargz, stargz or zstd:chunked footer/)
    expect(err.hint).toMatch(/not eStargz/)
  })

  it('refuses a footer whose TOC offset is past the end of the blob', async () => {
    const bad = Buffer.concat([blob.subarray(0, blob.length - 51), estargzFooter(blob.length + 100)])
    const err = await failure(openLayer(bufferReader(bad)))
    expect(err.name).toBe('InvalidFooterError')
    expect(err.message).toMatch(new RegExp(`TOC at offset ${blob.length + 100}, outside the blob`))
    const zstd = zstdChunkedFooter(10, 2 ** 40, 100)
    expect(failureSync(() => parseFooter(tail72(zstd), 4096)).message).toMatch(/outside the blob/)
    const huge = zstdChunkedFooter(2 ** 60, 1, 1)
    expect(failureSync(() => parseFooter(tail72(huge), 4096)).message).toMatch(/impossible TOC offset/)
    expect(failureSync(() => parseFooter(tail72(zstdChunkedFooter(0, 1, 1, 7n)), 4096)).message).toMatch(
      /manifest type 7/
    )
  })

  it('refuses a footer that points at payload instead of the TOC', async () => {
    const bad = Buffer.concat([blob.subarray(0, blob.length - 51), estargzFooter(0)])
    const err = await failure(openLayer(bufferReader(bad)))
    expect(err.name).toBe('TOCDecompressError')
    expect(err.message).toMatch(/not a stargz.index.json tar entry: its name is ".no.prefetch.landmark"/)
  })

  it('refuses a TOC member that does not inflate', async () => {
    const bad = Buffer.from(blob)
    bad.fill(0x55, layer.tocOffset + 12, layer.tocOffset + 40)
    const err = await failure(openLayer(bufferReader(bad)))
    expect(err.name).toBe('TOCDecompressError')
    expect(err.message).toMatch(new RegExp(`gzip TOC at offset ${layer.tocOffset} .* does not inflate`))
  })

  it('refuses a TOC digest that is not the expected one, naming both', async () => {
    const want = `sha256:${'0'.repeat(64)}`
    const err = await failure(openLayer(bufferReader(blob), { tocDigest: want }))
    expect(err.name).toBe('TOCDigestMismatchError')
    expect(err.message).toContain(want)
    expect(err.message).toContain(layer.tocDigest)
  })

  it('refuses a TOC above the size limit, compressed or not, without inflating all of it', async () => {
    expect(DEFAULT_MAX_TOC_BYTES).toBe(64 * 1024 * 1024)
    // 4 MiB of JSON that gzips to a few KiB: refused while inflating.
    const json = `{"version":1,"entries":[]${' '.repeat(4 * 1024 * 1024)}}`
    const big = Buffer.concat([
      payload(),
      gzipSync(tarEntry('stargz.index.json', Buffer.from(json)), { level: 1 }),
      estargzFooter(layer.tocOffset)
    ])
    const err = await failure(openLayer(bufferReader(big), { maxTocBytes: 1024 * 1024 }))
    expect(err.name).toBe('TOCTooLargeError')
    expect(err.message).toMatch(/larger than the limit of 1048576 bytes/)
    expect(err.hint).toMatch(/maxTocBytes/)
    const small = await failure(openLayer(bufferReader(blob), { maxTocBytes: 100 }))
    expect(small.name).toBe('TOCTooLargeError')
    const z = zstdBlob(payload(), JSON.stringify(tocJSON))
    expect((await failure(openLayer(bufferReader(z), { maxTocBytes: 100 }))).name).toBe('TOCTooLargeError')
  })

  it('refuses a zstd:chunked TOC whose size is not the footer size', async () => {
    const z = zstdBlob(payload(), JSON.stringify(tocJSON))
    z.writeBigUInt64LE(BigInt(5), z.length - 48 + 24)
    const err = await failure(openLayer(bufferReader(z)))
    expect(err.name).toBe('TOCDecompressError')
    expect(err.message).toMatch(/the footer says 5/)
  })

  it('reports a missing file as a typed read error', async () => {
    const err = await failure(fileReader('/nonexistent/blob'))
    expect(err.name).toBe('BlobReadError')
    expect(err.message).toContain('/nonexistent/blob')
  })

  it('refuses a chunk whose bytes fail verification, naming the digest and the file', async () => {
    const i = entryIndex('./sizes/random-200000')
    const wrong = `sha256:${'1'.repeat(64)}`
    const doctored = gzipBlob(
      payload(),
      JSON.stringify({
        version: 1,
        entries: tocJSON.entries.map((e, j) => (j === i ? { ...e, chunkDigest: wrong } : e))
      })
    )
    const l = await openLayer(bufferReader(doctored))
    const entry = l.toc.lookup('sizes/random-200000')!
    const err = await failure(readChunk(bufferReader(doctored), l, entry.chunks[0]!, { path: entry.path }))
    expect(err.name).toBe('ChunkDigestMismatchError')
    expect(err.code).toBe('ERR_STARGZ_CHUNK_DIGEST_MISMATCH')
    expect(err.message).toMatch(new RegExp(`chunk ${wrong} of sizes/random-200000 failed verification`))
    const v = await failure(verifyLayer(bufferReader(doctored), l))
    expect(v.name).toBe('ChunkDigestMismatchError')
    expect(v.message).toContain('sizes/random-200000')
    expect(failureSync(() => verifyChunk(new Uint8Array(3), entry.chunks[0]!)).name).toBe('ChunkDigestMismatchError')
  })

  it('refuses a file whose chunks verify but whose whole-file digest does not', async () => {
    const i = entryIndex('./sizes/random-200000')
    const wrong = `sha256:${'2'.repeat(64)}`
    const doctored = gzipBlob(
      payload(),
      JSON.stringify({ version: 1, entries: tocJSON.entries.map((e, j) => (j === i ? { ...e, digest: wrong } : e)) })
    )
    const err = await failure(verifyLayer(bufferReader(doctored), await openLayer(bufferReader(doctored))))
    expect(err.name).toBe('FileDigestMismatchError')
    expect(err.message).toMatch(new RegExp(`file sizes/random-200000 failed verification: expected ${wrong}`))
  })

  it('refuses corrupted chunk bytes with a decompress or verification error', async () => {
    const entry = layer.toc.lookup('sizes/text-300000')!
    const chunk = entry.chunks[1]!
    const bad = Buffer.from(blob)
    bad.fill(0, chunk.offset + 30, chunk.offset + 60)
    const err = await failure(readChunk(bufferReader(bad), layer, chunk, { path: entry.path }))
    expect(['ChunkDecompressError', 'ChunkDigestMismatchError']).toContain(err.name)
    expect(err.message).toContain(chunk.digest)
    const v = await failure(verifyLayer(bufferReader(bad), layer))
    expect(['ChunkDecompressError', 'ChunkDigestMismatchError']).toContain(v.name)
  })

  it('refuses compressed ranges that are cut short or inflate to too few bytes', async () => {
    const chunk = layer.toc.lookup('sizes/three-chunks')!.chunks[0]!
    const compressed = blob.subarray(chunk.offset, chunk.end)
    const cut = await failure(inflateChunk('gzip', compressed.subarray(0, compressed.length >> 1), chunk))
    expect(cut.name).toBe('ChunkDecompressError')
    expect(cut.message).toMatch(/unexpected end of file/)
    const short = await failure(inflateChunk('gzip', compressed, { ...chunk, size: chunk.size * 4 }))
    expect(short.name).toBe('ChunkTruncatedError')
    expect(short.message).toMatch(/inflates to \d+ of its 262144 bytes/)
    const garbage = await failure(inflateChunk('zstd', Buffer.from('not zstd at all'), chunk))
    expect(garbage.name).toBe('ChunkDecompressError')
    const huge = await failure(inflateChunk('gzip', compressed, { ...chunk, size: 2 ** 50 }))
    expect(huge.name).toBe('ChunkTooLargeError')
    expect(huge.message).toMatch(/is 1125899906842624 bytes: cannot hold it in memory/)
    const truncatedBlob = bufferReader(blob.subarray(0, chunk.offset + 10))
    expect((await failure(readChunk(truncatedBlob, layer, chunk))).name).toBe('BlobTruncatedError')
  })

  it('refuses to read a directory or symlink as a file', async () => {
    const err = await failure(readFileRange(bufferReader(blob), layer, layer.toc.lookup('etc')!, 0, 10))
    expect(err.name).toBe('NotAFileError')
    expect(err.message).toBe('etc is a dir, not a regular file')
  })

  it('aborts a read when the signal fires', async () => {
    const chunk = layer.toc.lookup('sizes/three-chunks')!.chunks[0]!
    const err = await failure(readChunk(bufferReader(blob), layer, chunk, { signal: AbortSignal.abort() }))
    expect(err.name).toBe('AbortError')
  })
})

describe('hostile TOCs', () => {
  const cases: [string, () => Uint8Array, RegExp, string?][] = [
    ['not JSON', () => new TextEncoder().encode('{"version":1,"entries":['), /not valid UTF-8 JSON/],
    ['not UTF-8', () => new Uint8Array([0x7b, 0xff, 0x7d]), /not valid UTF-8 JSON/],
    ['not an object', () => new TextEncoder().encode('[1,2]'), /not an object/],
    ['no version', () => new TextEncoder().encode('{"entries":[]}'), /no numeric "version"/],
    [
      'a newer version',
      () => new TextEncoder().encode('{"version":2,"entries":[]}'),
      /version 2 is not supported/,
      'UnsupportedTOCError'
    ],
    ['entries not an array', () => new TextEncoder().encode('{"version":1,"entries":{}}'), /no "entries" array/],
    ['an entry that is not an object', () => tocWith((e) => [...e, 7]), /is not an object/],
    ['an unknown type', () => tocWith((e) => [...e, { name: 'x', type: 'socket' }]), /unknown type "socket"/],
    [
      'a name with ..',
      () => tocWith((e) => [...e, { name: '../etc/passwd', type: 'reg' }]),
      /contains '\.\.' and could escape/
    ],
    ['a name with .. inside', () => tocWith((e) => [...e, { name: 'a/../../b', type: 'dir' }]), /contains '\.\.'/],
    [
      'an absolute name',
      () => tocWith((e) => [...e, { name: '/etc/shadow', type: 'reg' }]),
      /absolute name "\/etc\/shadow" is refused/
    ],
    ['a NUL in a name', () => tocWith((e) => [...e, { name: 'a\u0000b', type: 'reg' }]), /NUL byte/],
    ['an empty name', () => tocWith((e) => [...e, { name: '', type: 'reg' }]), /empty name/],
    [
      'a duplicate name',
      () => tocWith((e) => [...e, { name: './etc/hostname', type: 'reg' }]),
      /duplicate entry for etc\/hostname/
    ],
    [
      'the same name spelled differently',
      () => tocWith((e) => [...e, { name: 'etc//hostname/', type: 'dir' }]),
      /duplicate entry for etc\/hostname/
    ],
    [
      'a file used as a directory',
      () => tocWith((e) => [...e, { name: 'etc/hostname/x', type: 'reg' }]),
      /etc\/hostname is a reg, not a directory/
    ],
    [
      'a hardlink to nothing',
      () => tocWith((e) => [...e, { name: 'hl', type: 'hardlink', linkName: 'nope' }]),
      /hardlink to nope, which is not in the layer/
    ],
    [
      'a hardlink to a directory',
      () => tocWith((e) => [...e, { name: 'hl', type: 'hardlink', linkName: './etc/' }]),
      /hardlink to the directory etc/
    ],
    [
      'a hardlink cycle',
      () =>
        tocWith((e) => [
          ...e,
          { name: 'h1', type: 'hardlink', linkName: 'h2' },
          { name: 'h2', type: 'hardlink', linkName: 'h1' }
        ]),
      /cycle/
    ],
    [
      'a hardlink out of the layer',
      () => tocWith((e) => [...e, { name: 'hl', type: 'hardlink', linkName: '../../etc/shadow' }]),
      /contains '\.\.'/
    ],
    [
      'a symlink without a target',
      () => tocWith((e) => [...e, { name: 'sl', type: 'symlink' }]),
      /symlink without a linkName/
    ],
    [
      'a negative size',
      () => tocWith((e) => [...e, { name: 'n', type: 'reg', size: -1 }]),
      /"size" must be a whole number/
    ],
    [
      'a fractional size',
      () => tocWith((e) => [...e, { name: 'n', type: 'reg', size: 1.5 }]),
      /"size" must be a whole number/
    ],
    [
      'a size beyond 2^53',
      () => tocWith((e) => [...e, { name: 'n', type: 'reg', size: 2 ** 60, offset: 1 }]),
      /"size" must be a whole number/
    ],
    [
      'a string size',
      () => tocWith((e) => [...e, { name: 'n', type: 'reg', size: '10' }]),
      /"size" must be a whole number/
    ],
    [
      'chunk sizes that overflow',
      () =>
        tocWith((e) => [
          ...e,
          {
            name: 'n',
            type: 'reg',
            size: 2 ** 53 - 1,
            offset: 100,
            chunkSize: 2 ** 53 - 2,
            digest: `sha256:${'a'.repeat(64)}`
          },
          { name: 'n', type: 'chunk', offset: 200, chunkOffset: 2 ** 53 - 2, chunkSize: 2 ** 53 - 2 }
        ]),
      /chunks cover/
    ],
    [
      'a file without an offset',
      () => tocWith((e) => [...e, { name: 'n', type: 'reg', size: 10 }]),
      /without an "offset"/
    ],
    [
      'an offset past the TOC',
      () => tocWith((e) => [...e, { name: 'n', type: 'reg', size: 10, offset: layer.tocOffset }]),
      /offset \d+ is past the payload/
    ],
    [
      'chunks out of order',
      () => {
        const i = entryIndex('./sizes/random-200000', 'reg')
        return tocWith((e) => {
          const [a, b] = [e[i + 1]!, e[i + 2]!]
          e[i + 1] = b
          e[i + 2] = a
          return e
        })
      },
      /chunks out of order: chunkOffset 131072, expected 65536/
    ],
    [
      'chunks out of order in the blob',
      () => {
        const i = entryIndex('./sizes/random-200000', 'reg')
        return tocWith((e) => {
          const [a, b] = [e[i + 1]!.offset, e[i + 2]!.offset]
          e[i + 1]!.offset = b
          e[i + 2]!.offset = a
          return e
        })
      },
      /chunks out of order in the blob/
    ],
    [
      'a chunk of another file',
      () => tocWith((e) => [...e, { name: 'other', type: 'chunk', offset: 100, chunkOffset: 10, chunkSize: 10 }]),
      /chunk entry does not follow the regular file or chunks of other/
    ],
    [
      'chunks that do not cover the file',
      () => tocWith((e) => e.filter((x) => !(x.name === './sizes/random-200000' && x.type === 'chunk'))),
      /chunks cover 65536 bytes of a 200000-byte file/
    ],
    [
      'a file with neither chunk digests nor a digest',
      () => tocWith((e) => [...e, { name: 'n', type: 'reg', size: 10, offset: 100 }]),
      /needs a whole-file digest/
    ],
    [
      'a malformed digest',
      () => tocWith((e) => [...e, { name: 'n', type: 'reg', digest: 'md5:abc' }]),
      /not a sha256 digest/
    ],
    [
      'a malformed modtime',
      () => tocWith((e) => [...e, { name: 'n', type: 'dir', modtime: 'yesterday' }]),
      /not an RFC 3339 time/
    ],
    [
      'xattrs that are not base64',
      () => tocWith((e) => [...e, { name: 'n', type: 'dir', xattrs: { 'user.a': '!!' } }]),
      /xattr user.a is not base64/
    ],
    [
      'an unsupported chunk type',
      () => tocWith((e) => [...e, { name: 'n', type: 'reg', size: 10, offset: 100, chunkType: 'holes' }]),
      /chunkType "holes" is not supported/,
      'UnsupportedTOCError'
    ]
  ]
  for (const [what, make, message, name = 'InvalidTOCError'] of cases) {
    it(`refuses ${what}`, () => {
      const err = failureSync(() => parseTOC(make(), opts()))
      expect(err.name, err.message).toBe(name)
      expect(err.message).toMatch(message)
    })
  }

  it('refuses a hostile TOC inside a blob as well (openLayer)', async () => {
    const bad = gzipBlob(
      payload(),
      tocWith((e) => [...e, { name: '../../etc/cron.d/x', type: 'reg' }])
    )
    const err = await failure(openLayer(bufferReader(bad)))
    expect(err.name).toBe('InvalidTOCError')
    expect(err.message).toMatch(/TOC entry #\d+ \("..\/..\/etc\/cron.d\/x"\)/)
  })

  it('accepts what the format allows: implicit parents, a late parent entry, an xattr named __proto__', () => {
    const toc = parseTOC(
      tocWith((e) => [
        ...e,
        { name: 'late/child', type: 'dir' },
        { name: 'late/', type: 'dir', mode: 0o700 },
        { name: 'x', type: 'fifo', xattrs: { ['__proto__']: 'aGk=' } }
      ]),
      opts()
    )
    expect(toc.lookup('/late/')).toMatchObject({ type: 'dir', mode: 0o700 })
    expect(toc.children('late')).toEqual(['child'])
    expect(Object.keys(toc.lookup('x')!.xattrs)).toEqual(['__proto__'])
    expect(toc.lookup('../x')).toBeUndefined()
    expect(toc.lookup('/etc/hostname')?.type).toBe('reg')
  })
})
