import type { Entry } from '@strata/stargz'
import type { ChunkStore } from '@strata/store'
import { afterEach, describe, expect, it, vi } from 'vitest'
import {
  type ChunkEngine,
  type ChunkRef,
  createFileReader,
  type FileReaderInit,
  type ImageLayer
} from '../src/index.js'

/** A file of 100 bytes in chunks of 40 (0, 40, 80), its content a pattern, in a layer whose TOC finds its chunks. */
const CHUNK = 40
const whole = Uint8Array.from({ length: 100 }, (_, i) => (i * 7) % 251)
const entry = {
  path: 'bin/tool',
  type: 'reg',
  size: whole.length,
  chunks: [0, 40, 80].map((at) => ({
    digest: `sha256:tool#${at}`,
    fileOffset: at,
    size: Math.min(CHUNK, whole.length - at),
    offset: 0,
    end: 0,
    innerOffset: 0
  }))
} as unknown as Entry
const layer = {
  digest: 'sha256:layer',
  ref: { digest: 'sha256:layer', repository: 'localhost/test' },
  format: 'estargz',
  compression: 'gzip',
  toc: {
    chunkIndexAt: (e: Entry, offset: number) =>
      e.chunks.findIndex((c) => offset >= c.fileOffset && offset < c.fileOffset + c.size)
  }
} as unknown as ImageLayer
const bytesOf = (c: { fileOffset: number; size: number }) => whole.slice(c.fileOffset, c.fileOffset + c.size)

/**
 * A reader over a fake engine that records the chunks it is asked for (by file offset) and a store that holds, in
 * place, the chunks whose offsets are in `stored`.
 */
function setUp(init: Partial<FileReaderInit> = {}, stored = new Set<number>()) {
  const loads: number[] = []
  const direct: number[] = []
  const fetch = async (ref: ChunkRef) => {
    loads.push(ref.fileOffset)
    return bytesOf(ref)
  }
  const engine = {
    get: fetch,
    getEach: (refs: ChunkRef[]) => refs.map(fetch),
    getMany: (refs: ChunkRef[]) => Promise.all(refs.map(fetch)),
    ensure: async () => 0
  } as unknown as ChunkEngine
  const store = {
    async read(digest: string, from: number, into: Uint8Array) {
      const c = entry.chunks.find((x) => x.digest === digest)!
      if (!stored.has(c.fileOffset)) return undefined
      direct.push(c.fileOffset + from)
      const bytes = bytesOf(c).subarray(from, from + into.length)
      into.set(bytes)
      return bytes.length
    }
  } as unknown as ChunkStore
  const reader = createFileReader({ engine, store, readAheadBytes: 0, ...init })
  const read = async (offset: number, length: number) => {
    const into = new Uint8Array(length)
    return into.subarray(0, await reader.readRange(layer, entry, offset, into))
  }
  return { read, loads, direct, stored }
}

afterEach(() => {
  vi.useRealTimers()
})

describe('the file reader: chunk arithmetic, reads in place, the chunk buffer', () => {
  it('copies ranges inside and across chunks, clamped to the file size', async () => {
    const { read } = setUp()
    expect(await read(5, 10)).toEqual(whole.subarray(5, 15))
    expect(await read(30, 60)).toEqual(whole.subarray(30, 90))
    expect(await read(90, 4096)).toEqual(whole.subarray(90))
    expect((await read(100, 10)).length).toBe(0)
  })

  it('fetches a chunk once for many small reads of it', async () => {
    const { read, loads } = setUp({ chunkBufferBytes: 3 * CHUNK })
    const got = new Uint8Array(100)
    for (let at = 0; at < 100; at += 8) got.set(await read(at, 8), at)
    expect(got).toEqual(whole)
    expect(loads).toEqual([0, 40, 80])
  })

  it('shares a chunk read in flight and evicts the least recently used chunk', async () => {
    const { read, loads } = setUp({ chunkBufferBytes: CHUNK })
    await Promise.all([read(0, 1), read(1, 1)])
    expect(loads).toEqual([0])
    await read(45, 1)
    await read(2, 1)
    expect(loads).toEqual([0, 40, 0])
  })

  it('reads chunks in the store straight into the caller buffer, and loads the others', async () => {
    // Chunks 0 and 2 are stored; chunk 1 is not.
    const { read, loads, direct, stored } = setUp({}, new Set([0, 80]))
    expect(await read(5, 10)).toEqual(whole.subarray(5, 15))
    expect(await read(85, 100)).toEqual(whole.subarray(85))
    expect(loads).toEqual([])
    // A read across chunk 1 loads its chunks whole and keeps them; the next read of chunk 1 comes from memory,
    // not the store.
    expect(await read(35, 10)).toEqual(whole.subarray(35, 45))
    expect(loads).toEqual([0, 40])
    stored.add(40)
    const before = direct.length
    expect(await read(50, 5)).toEqual(whole.subarray(50, 55))
    expect(direct.length).toBe(before)
    // In place: the two reads of stored chunks, and the piece of chunk 0 before the miss of chunk 1.
    expect(direct).toEqual([5, 85, 35])
  })

  it('holds in memory only chunks being read: none read to their end, none once idle', async () => {
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'performance'] })
    // Nothing is stored at first; once loaded, a chunk is stored (as the engine does).
    const stored = new Set<number>()
    const { read, loads } = setUp({ chunkBufferIdleMs: 50 }, stored)
    const loaded = async (offset: number, length: number) => {
      const bytes = await read(offset, length)
      for (const at of loads) stored.add(at)
      return bytes
    }
    expect(await loaded(0, 30)).toEqual(whole.subarray(0, 30))
    expect(loads).toEqual([0])
    // Chunk 0 is still held while it is read; read to its end it is let go, and comes from the store after.
    stored.clear()
    expect(await loaded(30, 10)).toEqual(whole.subarray(30, 40))
    expect(loads).toEqual([0])
    stored.clear()
    expect(await loaded(0, 10)).toEqual(whole.subarray(0, 10))
    expect(loads).toEqual([0, 0])
    // Idle for less than chunkBufferIdleMs, the chunk is still held; past it, the chunk buffer holds nothing.
    stored.clear()
    await vi.advanceTimersByTimeAsync(40)
    expect(await loaded(10, 5)).toEqual(whole.subarray(10, 15))
    expect(loads).toEqual([0, 0])
    stored.clear()
    await vi.advanceTimersByTimeAsync(150)
    expect(await loaded(15, 5)).toEqual(whole.subarray(15, 20))
    expect(loads).toEqual([0, 0, 0])
  })
})
