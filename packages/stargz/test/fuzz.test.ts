/**
 * Property-based fuzzing of the parsers that take untrusted bytes: the footer parser, the TOC parser and
 * openLayer. Whatever the input, they either return something consistent or throw a StargzError: never a
 * TypeError/RangeError, never a hang. About 13,000 runs in all.
 */
import { readFile } from 'node:fs/promises'
import fc from 'fast-check'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { bufferReader, type Layer, MAX_FOOTER_SIZE, openLayer, parseFooter, parseTOC, type TOC } from '../src/index.js'
import { containersZstdBlob, estargzFooter, legacyFooter, zstdChunkedFooter } from './blobs.js'
import { CHUNK, makeSourceTree, oracleBuild, type SourceTree } from './fixture.js'

let tree: SourceTree
let blob: Buffer
let layer: Layer
let entries: Record<string, unknown>[]

beforeAll(async () => {
  tree = await makeSourceTree()
  const built = await oracleBuild(tree, 'fuzz.blob', ['--chunk-size', String(CHUNK)])
  blob = await readFile(built.path)
  layer = await openLayer(bufferReader(blob))
  entries = JSON.parse(new TextDecoder().decode(layer.tocBytes)).entries
})
afterAll(async () => {
  await tree?.cleanup()
})

/** Runs `f`; a thrown error must be a StargzError subclass (it has a code starting ERR_STARGZ). */
function onlyStargzErrors<T>(f: () => T): T | undefined {
  try {
    return f()
  } catch (err) {
    expectStargzError(err)
    return undefined
  }
}

function expectStargzError(err: unknown): void {
  const e = err as { name?: string; code?: string; message?: string }
  if (typeof e?.code !== 'string' || !e.code.startsWith('ERR_STARGZ') || e.name === 'StargzError') {
    throw new Error(`not a StargzError subclass: ${e?.name}: ${e?.message}`, { cause: err })
  }
  expect(e.message?.length).toBeGreaterThan(10)
}

/** A parsed TOC must be self-consistent: parents are directories, chunks tile each file inside the payload. */
function expectConsistent(toc: TOC, tocOffset: number): void {
  for (const [path, e] of toc.entries) {
    expect(e.path).toBe(path)
    if (path !== '') {
      const parent = toc.entries.get(path.includes('/') ? path.slice(0, path.lastIndexOf('/')) : '')
      expect(parent?.type).toBe('dir')
      expect(path.split('/')).not.toContain('..')
    }
    let pos = 0
    for (const c of e.chunks) {
      expect(c.fileOffset).toBe(pos)
      expect(c.size).toBeGreaterThan(0)
      expect(c.offset).toBeLessThan(c.end)
      expect(c.end).toBeLessThanOrEqual(tocOffset)
      expect(toc.chunkIndexAt(e, c.fileOffset)).toBe(e.chunks.indexOf(c))
      pos += c.size
    }
    if (e.chunks.length > 0) expect(pos).toBe(e.size)
  }
}

const opts = () => ({ format: 'estargz' as const, tocOffset: layer.tocOffset, blobSize: blob.length })
const encode = (v: unknown) => new TextEncoder().encode(JSON.stringify(v))

const FIELDS = [
  'name',
  'type',
  'size',
  'modtime',
  'linkName',
  'mode',
  'uid',
  'gid',
  'offset',
  'endOffset',
  'innerOffset',
  'xattrs',
  'digest',
  'chunkOffset',
  'chunkSize',
  'chunkDigest',
  'chunkType'
]
const anyValue = fc.oneof(
  fc.jsonValue({ maxDepth: 2 }),
  fc.integer({ min: -2, max: 300_000 }),
  fc.constantFrom(0, -0, 1.5, 2 ** 53, 2 ** 64, Number.MAX_SAFE_INTEGER, Number.NaN, Number.POSITIVE_INFINITY),
  fc.constantFrom('./', '..', '../x', '/abs', 'a\u0000b', 'etc/hostname', 'reg', 'chunk', 'hardlink', 'dir'),
  fc.constantFrom(`sha256:${'a'.repeat(64)}`, '2020-01-01T00:00:00Z', 'aGk=', { 'user.x': 'aGk=' })
)

describe('fuzzing', () => {
  it('parseFooter: arbitrary tails and sizes', () => {
    fc.assert(
      fc.property(
        fc.uint8Array({ maxLength: 80 }),
        fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
        (tail, size) => {
          const f = onlyStargzErrors(() => parseFooter(tail, Math.max(size, tail.length)))
          if (f !== undefined) expect(f.tocOffset + f.tocSize).toBeLessThanOrEqual(Math.max(size, tail.length) - f.size)
        }
      ),
      { numRuns: 2000 }
    )
  })

  it('parseFooter: mutated real footers', () => {
    // Real footers as the last MAX_FOOTER_SIZE bytes of a blob.
    const footers = [
      estargzFooter(layer.tocOffset),
      legacyFooter(layer.tocOffset),
      zstdChunkedFooter(layer.tocOffset, 1000, 5000),
      containersZstdBlob([{ name: 'f', content: new Uint8Array(10) }]).blob.subarray(-MAX_FOOTER_SIZE)
    ].map((f) => Buffer.concat([Buffer.alloc(MAX_FOOTER_SIZE - f.length), f]))
    const formats = new Set<string>()
    fc.assert(
      fc.property(
        fc.constantFrom(...footers),
        fc.array(fc.tuple(fc.nat(MAX_FOOTER_SIZE - 1), fc.integer({ min: 0, max: 255 })), { maxLength: 4 }),
        fc.integer({ min: 0, max: 2 * blob.length }),
        (footer, mutations, size) => {
          const f = Buffer.from(footer)
          for (const [at, v] of mutations) f[at % f.length] = v
          const r = onlyStargzErrors(() => parseFooter(f, Math.max(size, f.length)))
          if (r !== undefined) {
            expect(r.tocOffset).toBeLessThan(Math.max(size, f.length))
            formats.add(r.format)
          }
        }
      ),
      { numRuns: 3000 }
    )
    expect([...formats].sort()).toEqual(['estargz', 'stargz', 'zstd:chunked'])
  })

  it('parseTOC: arbitrary JSON and arbitrary entries', () => {
    const entry = fc.dictionary(fc.constantFrom(...FIELDS), anyValue, { maxKeys: 8 })
    fc.assert(
      fc.property(
        fc.oneof(
          fc.jsonValue(),
          fc.record({ version: fc.oneof(fc.constant(1), anyValue), entries: fc.array(entry, { maxLength: 12 }) })
        ),
        (doc) => {
          const toc = onlyStargzErrors(() => parseTOC(encode(doc), opts()))
          if (toc !== undefined) expectConsistent(toc, layer.tocOffset)
        }
      ),
      { numRuns: 3000 }
    )
  })

  it('parseTOC: the real TOC with fields changed, entries dropped, duplicated and swapped', () => {
    const op = fc.oneof(
      fc.tuple(fc.constant('set' as const), fc.nat(), fc.constantFrom(...FIELDS), anyValue),
      fc.tuple(fc.constant('drop' as const), fc.nat()),
      fc.tuple(fc.constant('dup' as const), fc.nat()),
      fc.tuple(fc.constant('swap' as const), fc.nat(), fc.nat())
    )
    const outcomes = { parsed: 0, refused: 0 }
    fc.assert(
      fc.property(fc.array(op, { minLength: 1, maxLength: 3 }), (ops) => {
        const e = structuredClone(entries)
        for (const o of ops) {
          const i = o[1] % e.length
          if (o[0] === 'set') e[i]![o[2]] = o[3]
          else if (o[0] === 'drop') e.splice(i, 1)
          else if (o[0] === 'dup') e.splice(i, 0, structuredClone(e[i]!))
          else [e[i], e[o[2] % e.length]] = [e[o[2] % e.length]!, e[i]!]
        }
        const toc = onlyStargzErrors(() => parseTOC(encode({ version: 1, entries: e }), opts()))
        if (toc !== undefined) expectConsistent(toc, layer.tocOffset)
        outcomes[toc === undefined ? 'refused' : 'parsed']++
      }),
      { numRuns: 3000 }
    )
    // Both outcomes happen: the mutations reach past the first check.
    expect(outcomes.parsed).toBeGreaterThan(100)
    expect(outcomes.refused).toBeGreaterThan(100)
  })

  it('parseTOC: byte flips in the real TOC JSON', () => {
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 3 }),
        (flips) => {
          const json = Uint8Array.from(layer.tocBytes)
          for (const [at, v] of flips) json[at % json.length] = v
          const toc = onlyStargzErrors(() => parseTOC(json, opts()))
          if (toc !== undefined) expectConsistent(toc, layer.tocOffset)
        }
      ),
      { numRuns: 1500 }
    )
  })

  it('openLayer: mutated footers and TOC members', async () => {
    const tail = blob.length - layer.tocOffset
    const refused = new Set<string>()
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.tuple(fc.nat(tail - 1), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 3 }),
        fc.nat(60),
        async (mutations, cut) => {
          const b = Buffer.from(blob.subarray(0, blob.length - (cut > 50 ? cut - 50 : 0)))
          for (const [at, v] of mutations) b[layer.tocOffset + (at % (b.length - layer.tocOffset))] = v
          try {
            const l = await openLayer(bufferReader(b))
            expectConsistent(l.toc, l.tocOffset)
          } catch (err) {
            expectStargzError(err)
            refused.add((err as Error).name)
          }
        }
      ),
      { numRuns: 600 }
    )
    expect([...refused].sort()).toEqual(['InvalidFooterError', 'TOCDecompressError'])
  })
})
