import { createHash } from 'node:crypto'
import { link, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join, relative } from 'node:path'
import { createRegistryClient, makeReference, parseReference, type RegistryClient } from '@strata/registry'
import type { Entry } from '@strata/stargz'
import { type CorruptEventDetail, createMemoryStore, openDiskStore } from '@strata/store'
import { type FaultProxy, startFaultProxy } from '@test/fault-proxy.js'
import { buildTestImage, makeTestTree, type TestImage } from '@test/images.js'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { run } from '@test/tools.js'
import { startWanProxy } from '@test/wan-proxy.js'
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest'
import {
  type ChunkRef,
  type ChunkSource,
  chunkRef,
  createFetcher,
  createRegistrySource,
  type FetchEvent,
  type Fetcher,
  type FetcherInit,
  type Image,
  type ImageLayer,
  openImage,
  resolveImage,
  type SourceOptions,
  stallBound
} from '../src/index.js'

const hex = (b: Uint8Array) => createHash('sha256').update(b).digest('hex')

let registry: TestRegistry
let work: string
let estargz: TestImage
let plain: TestImage
const client = createRegistryClient({ retries: 1, backoffMs: 50 })

/** Counts what the fetcher asks of the registry (blob Range reads and whole downloads), delegating to the real client. */
function counting(real: RegistryClient): RegistryClient & { reads: number; downloads: number; images: number } {
  const c = Object.create(real) as RegistryClient & { reads: number; downloads: number; images: number }
  c.reads = 0
  c.downloads = 0
  c.images = 0
  c.getImage = (ref, options) => {
    c.images++
    return real.getImage(ref, options)
  }
  c.blob = (ref, digest, size) => {
    const blob = real.blob(ref, digest, size)
    return {
      get size() {
        return blob.size
      },
      readAt(offset, length, options) {
        c.reads++
        return blob.readAt(offset, length, options)
      },
      get ignoresRange() {
        return blob.ignoresRange
      },
      joins: (offset) => blob.joins(offset),
      readRuns(runs, onRun, options) {
        c.reads++
        return blob.readRuns(runs, onRun, options)
      }
    }
  }
  c.downloadBlob = (ref, digest, path, options) => {
    c.downloads++
    return real.downloadBlob(ref, digest, path, options)
  }
  return c
}

/** Ranges of usr/bin/tool (three chunks of 4 MiB) that start, cross and end chunks, and one past its end. */
const rangesOf = (entry: Entry): Array<readonly [number, number]> => [
  [0, 1],
  [4 * 1024 * 1024 - 10, 20],
  [100, 9 * 1024 * 1024],
  [entry.size - 5, 100],
  [entry.size, 10]
]

/** `length` bytes of a file from `offset` (fewer at its end) through readRange, as a mount reads. */
async function readFile(
  fetcher: Fetcher,
  layer: ImageLayer,
  entry: Entry,
  offset: number,
  length: number,
  options?: { signal?: AbortSignal }
): Promise<Uint8Array> {
  const into = new Uint8Array(Math.max(0, Math.min(length, entry.size - offset)))
  return into.subarray(0, await fetcher.readRange(layer, entry, offset, into, options))
}

/** The verified bytes of `refs`, got from the registry now: for sources that answer from memory on fake timers. */
async function heldBytes(refs: ChunkRef[]): Promise<Map<string, Uint8Array>> {
  const fetcher = createFetcher({ store: createMemoryStore(), sources: [createRegistrySource({ client })] })
  const bytes = await fetcher.getMany(refs)
  return new Map(refs.map((r, i) => [r.digest, bytes[i]!]))
}

/** A source that answers at once from `held`, counting in `asked` by its name. */
function heldSource(name: string, held: Map<string, Uint8Array>, asked: string[] = []): ChunkSource {
  return {
    name,
    get: async (chunk) => {
      asked.push(name)
      return held.get(chunk.digest)
    }
  }
}

/** The fake timers of the timing tests: timeouts, performance.now() (liveness) and Date.now() (prefetch rate). */
const fakeTimers = () => vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'performance', 'Date'] })

/** When (fake ms from now) `p` settles, advancing fake time `step` ms at a time. */
async function settlesAfter(p: Promise<unknown>, step = 100, max = 120_000): Promise<number> {
  let done = false
  p.then(
    () => {
      done = true
    },
    () => {
      done = true
    }
  )
  let t = 0
  while (!done && t < max) {
    await vi.advanceTimersByTimeAsync(step)
    t += step
  }
  return t
}

afterEach(() => {
  vi.useRealTimers()
})

/** Every regular file of the image: layer, entry. */
function files(image: Image): Array<{ layer: ImageLayer; entry: Entry }> {
  return image.layers.flatMap((layer) =>
    [...layer.toc.entries.values()].filter((e) => e.type === 'reg').map((entry) => ({ layer, entry }))
  )
}

/** Reads each file whole through the fetcher and checks it against the source tree's hashes. */
async function readAll(fetcher: Fetcher, image: Image, test: TestImage): Promise<number> {
  let n = 0
  for (const { layer, entry } of files(image)) {
    const i = image.layers.indexOf(layer)
    const bytes = await readFile(fetcher, layer, entry, 0, entry.size)
    expect(hex(bytes), entry.path).toBe(test.layers[i]!.files.get(entry.path))
    n++
  }
  return n
}

beforeAll(async () => {
  registry = await startRegistry()
  work = await mkdtemp(join(tmpdir(), 'strata-fetcher-'))
  const a = await makeTestTree(join(work, 'a'), { seed: 1 })
  const b = await makeTestTree(join(work, 'b'), { seed: 2, bigBytes: 5 * 1024 * 1024 })
  estargz = await buildTestImage({
    registry: registry.host,
    repository: 'test/estargz',
    layers: [{ files: a, prioritized: ['etc/conf1.txt', 'etc/conf2.txt'] }, { files: b }],
    estargz: true,
    gzipLevel: 1
  })
  plain = await buildTestImage({
    registry: registry.host,
    repository: 'test/plain',
    layers: [{ files: b }],
    estargz: false
  })
})

afterAll(async () => {
  await registry?.stop()
  if (work !== undefined) await rm(work, { recursive: true, force: true })
})

describe('reading an eStargz image', () => {
  it('gives every file its source bytes; a second open and read asks the registry for nothing but the manifest', async () => {
    const store = createMemoryStore()
    const c = counting(client)
    const events: FetchEvent[] = []
    const image = await openImage({ client: c, store, ref: estargz.ref, onProgress: (e) => events.push(e) })
    expect(image.digest).toBe(estargz.digest)
    expect(image.layers.map((l) => [l.format, l.verified, l.tocDigest])).toEqual(
      estargz.layers.map((l) => ['estargz', true, l.tocDigest])
    )
    expect(events.filter((e) => e.type === 'layer:toc' && !e.cached)).toHaveLength(2)
    const registrySource = createRegistrySource({ client: c })
    const fetcher = createFetcher({ store, sources: [registrySource], readAheadBytes: 0 })
    const n = await readAll(fetcher, image, estargz)
    expect(n).toBe(22 * 2)
    const m = fetcher.metrics()
    expect(m.sources.registry!.chunks).toBeGreaterThan(n)
    expect(m.verificationFailures).toEqual({})

    c.reads = 0
    c.downloads = 0
    const again = await openImage({ client: c, store, ref: estargz.ref })
    const fetcher2 = createFetcher({
      store,
      sources: [createRegistrySource({ client: c })]
    })
    await readAll(fetcher2, again, estargz)
    expect(c.reads).toBe(0)
    expect(c.downloads).toBe(0)
    expect(fetcher2.metrics().sources.registry).toBeUndefined()
    expect(fetcher2.metrics().sources.store!.bytes).toBeGreaterThan(14 * 1024 * 1024)
  })

  it('reads ranges inside and across chunks', async () => {
    const store = createMemoryStore()
    const image = await openImage({ client, store, ref: estargz.ref })
    const fetcher = createFetcher({
      store,
      sources: [createRegistrySource({ client })]
    })
    const layer = image.layers[0]!
    const entry = layer.toc.lookup('usr/bin/tool')!
    expect(entry.chunks.length).toBe(3)
    const whole = await readFile(fetcher, layer, entry, 0, entry.size)
    for (const [off, len] of rangesOf(entry)) {
      const got = await readFile(fetcher, layer, entry, off, len)
      expect(Buffer.from(got).equals(Buffer.from(whole.subarray(off, Math.min(entry.size, off + len))))).toBe(true)
    }
  })

  it('reads stored chunks straight into a caller buffer, and fetches a chunk that is not stored', async () => {
    const store = createMemoryStore()
    const image = await openImage({ client, store, ref: estargz.ref })
    const c = counting(client)
    const fetcher = createFetcher({
      store,
      sources: [createRegistrySource({ client: c })],
      readAheadBytes: 0
    })
    const layer = image.layers[0]!
    const entry = layer.toc.lookup('usr/bin/tool')!
    // Nothing stored: the first chunk is fetched.
    const into = new Uint8Array(256 * 1024)
    expect(await fetcher.readRange(layer, entry, 0, into)).toBe(into.length)
    expect(c.reads).toBe(1)
    const whole = await readFile(fetcher, layer, entry, 0, entry.size)
    expect(Buffer.from(into).equals(Buffer.from(whole.subarray(0, into.length)))).toBe(true)
    const reads = c.reads
    const before = fetcher.metrics().sources.store!
    for (const [off, len] of rangesOf(entry)) {
      const buf = new Uint8Array(len)
      const n = await fetcher.readRange(layer, entry, off, buf)
      expect(n).toBe(Math.max(0, Math.min(entry.size, off + len) - off))
      expect(Buffer.from(buf.subarray(0, n)).equals(Buffer.from(whole.subarray(off, off + n)))).toBe(true)
    }
    // In place: no source asked, no store miss; a piece counts as a chunk when it starts one (1 + 1 + 2 + 0).
    expect(c.reads).toBe(reads)
    const inPlace = fetcher.metrics().sources.store!
    expect(inPlace.chunks - before.chunks).toBe(4)
    expect(inPlace.misses).toBe(before.misses)
    // One chunk gone: a read touching it misses in place, and gets it from the source; the others still hit.
    await store.delete(entry.chunks[1]!.digest)
    const across = new Uint8Array(20)
    expect(await fetcher.readRange(layer, entry, 4 * 1024 * 1024 - 10, across)).toBe(20)
    expect(Buffer.from(across).equals(Buffer.from(whole.subarray(4 * 1024 * 1024 - 10, 4 * 1024 * 1024 + 10)))).toBe(
      true
    )
    expect(c.reads).toBe(reads + 1)
    expect(fetcher.metrics().sources.store!.misses).toBe(before.misses + 1)
    expect(await fetcher.readRange(layer, entry, 0, new Uint8Array(20))).toBe(20)
    expect(c.reads).toBe(reads + 1)
  })

  it('counts and reports a store that fails to read in place, and gets the chunk the other way', async () => {
    const store = createMemoryStore()
    const image = await openImage({ client, store, ref: estargz.ref })
    const layer = image.layers[0]!
    const entry = layer.toc.lookup('usr/bin/tool')!
    const fetcher = createFetcher({
      store,
      sources: [createRegistrySource({ client })]
    })
    await readFile(fetcher, layer, entry, 0, 10)
    const failing = Object.create(store) as typeof store
    failing.read = async () => {
      throw new Error('EIO: the disk failed')
    }
    const events: FetchEvent[] = []
    const broken = createFetcher({ store: failing, sources: [] })
    broken.addEventListener('store:error', (e) => events.push((e as CustomEvent<FetchEvent>).detail))
    // No sources: the chunk comes from the store's get, after its failed read in place.
    const got = new Uint8Array(10)
    expect(await broken.readRange(layer, entry, 0, got)).toBe(10)
    expect(got).toEqual(await readFile(fetcher, layer, entry, 0, 10))
    expect(events).toMatchObject([{ type: 'store:error', digest: entry.chunks[0]!.digest }])
    expect(broken.metrics().sources.store!.errors).toBe(1)
    const aborted = broken.readRange(layer, entry, 0, new Uint8Array(10), { signal: AbortSignal.abort() })
    await expect(aborted).rejects.toMatchObject({ name: 'AbortError' })
  })

  it("gets a chunk damaged in the disk store behind its back again from a source: never the store's wrong bytes", async () => {
    const dir = join(work, 'damaged-store')
    let store = await openDiskStore(dir, { fsync: false })
    const image = await openImage({ client, store, ref: estargz.ref })
    const layer = image.layers[0]!
    const entry = layer.toc.lookup('usr/bin/tool')!
    const [, mid, last] = entry.chunks
    const filling = createFetcher({
      store,
      sources: [createRegistrySource({ client })],
      readAheadBytes: 0
    })
    const whole = await readFile(filling, layer, entry, 0, entry.size)
    await store.close()
    // Damaged on disk while the store was closed: one flipped bit in one chunk file, garbage of the right size in
    // another (a disk error, another program); nothing the store could have seen.
    const fileOf = (digest: string) => join(dir, 'chunks', digest.slice(7, 9), digest.slice(7))
    const flipped = whole.slice(mid!.fileOffset, mid!.fileOffset + mid!.size)
    flipped[1000]! ^= 0x10
    await writeFile(fileOf(mid!.digest), flipped)
    await writeFile(fileOf(last!.digest), new Uint8Array(last!.size).fill(0x5a))

    store = await openDiskStore(dir, { fsync: false })
    const corrupt: CorruptEventDetail[] = []
    store.addEventListener('corrupt', (e) => corrupt.push((e as CustomEvent<CorruptEventDetail>).detail))
    const c = counting(client)
    const fetcher = createFetcher({
      store,
      sources: [createRegistrySource({ client: c })],
      readAheadBytes: 0
    })
    try {
      // As a mount reads stored chunks: in place, where the damaged chunk is a miss (none of its bytes reach the
      // buffer), then from the registry.
      const off = mid!.fileOffset - 10
      const into = new Uint8Array(2000).fill(7)
      expect(await fetcher.readRange(layer, entry, off, into)).toBe(2000)
      expect(Buffer.from(into).equals(Buffer.from(whole.subarray(off, off + 2000)))).toBe(true)
      expect(c.reads).toBe(1)
      // A whole chunk by get (the chunk buffer's path, and what a peer is served from).
      const lastBytes = await fetcher.get(chunkRef(layer, last!))
      expect(`sha256:${hex(lastBytes)}`).toBe(last!.digest)
      expect(c.reads).toBe(2)
      expect(corrupt.map((e) => e.digest)).toEqual([mid!.digest, last!.digest])
      expect(corrupt[1]).toMatchObject({ size: last!.size, path: fileOf(last!.digest) })
      expect(await store.stats()).toMatchObject({ corrupt: 2, chunks: entry.chunks.length })
      // Put back by the fetcher: the whole file now reads in place, right, with no source asked.
      const all = new Uint8Array(entry.size)
      expect(await fetcher.readRange(layer, entry, 0, all)).toBe(entry.size)
      expect(hex(all)).toBe(estargz.layers[0]!.files.get('usr/bin/tool'))
      expect(c.reads).toBe(2)
    } finally {
      await store.close()
    }
  })

  it('asks a store that checks chunks on first read to check the next two chunks of a file read in place', async () => {
    const store = createMemoryStore()
    const image = await openImage({ client, store, ref: estargz.ref })
    const layer = image.layers[0]!
    const entry = layer.toc.lookup('usr/bin/tool')!
    const filling = createFetcher({
      store,
      sources: [createRegistrySource({ client })],
      readAheadBytes: 0
    })
    await readFile(filling, layer, entry, 0, entry.size)
    const checked: string[] = []
    const checking = Object.create(store) as typeof store
    checking.verify = async (digest) => {
      checked.push(digest)
      return true
    }
    const fetcher = createFetcher({ store: checking, sources: [], readAheadBytes: 0 })
    expect(await fetcher.readRange(layer, entry, 0, new Uint8Array(10))).toBe(10)
    expect(checked).toEqual([entry.chunks[1]!.digest, entry.chunks[2]!.digest])
    expect(await fetcher.readRange(layer, entry, entry.chunks[2]!.fileOffset, new Uint8Array(10))).toBe(10)
    expect(checked).toHaveLength(2)
  })

  it('makes one request for concurrent reads of the same chunk', async () => {
    const store = createMemoryStore()
    const image = await openImage({ client, store, ref: estargz.ref })
    const inner = createRegistrySource({ client })
    let calls = 0
    const source: ChunkSource = {
      name: 'registry',
      get(chunk, options) {
        calls++
        return inner.get(chunk, options)
      }
    }
    const fetcher = createFetcher({ store, sources: [source] })
    const layer = image.layers[0]!
    const chunk = chunkRef(layer, layer.toc.lookup('usr/bin/tool')!.chunks[1]!)
    const got = await Promise.all(Array.from({ length: 6 }, () => fetcher.get(chunk)))
    expect(calls).toBe(1)
    expect(new Set(got.map(hex)).size).toBe(1)
    expect(`sha256:${hex(got[0]!)}`).toBe(chunk.digest)
    expect(fetcher.metrics().singleFlightJoins).toBe(5)
  })

  it('catches a source that corrupts bytes, reports it, and reads from the next source', async () => {
    const store = createMemoryStore()
    const image = await openImage({ client, store, ref: estargz.ref })
    const registrySource = createRegistrySource({ client })
    const bad: Array<{ digest: string; reason: string }> = []
    // A peer that flips a byte: a real component cannot be made to do this on purpose.
    const corrupt: ChunkSource = {
      name: 'liar',
      async get(chunk, options) {
        const bytes = await registrySource.get(chunk, options)
        if (bytes === undefined || bytes.length === 0) return bytes
        const copy = Uint8Array.from(bytes)
        copy[copy.length >> 1]! ^= 0xff
        return copy
      },
      reportBad(chunk, reason) {
        bad.push({ digest: chunk.digest, reason })
      }
    }
    const fetcher = createFetcher({ store, sources: [corrupt, registrySource], readAheadBytes: 0 })
    const events: FetchEvent[] = []
    fetcher.addEventListener('chunk:bad', (e) => events.push((e as CustomEvent<FetchEvent>).detail))
    const layer = image.layers[0]!
    const entry = layer.toc.lookup('etc/conf7.txt')!
    const chunk = chunkRef(layer, entry.chunks[0]!)
    expect(hex(await fetcher.get(chunk))).toBe(estargz.layers[0]!.files.get('etc/conf7.txt'))
    expect(bad).toEqual([{ digest: chunk.digest, reason: expect.stringContaining('failed verification') }])
    expect(events).toEqual([expect.objectContaining({ type: 'chunk:bad', source: 'liar', digest: chunk.digest })])
    // The batched path too: a whole multi-chunk file.
    const tool = layer.toc.lookup('usr/bin/tool')!
    const bytes = await readFile(fetcher, layer, tool, 0, tool.size)
    expect(hex(bytes)).toBe(estargz.layers[0]!.files.get('usr/bin/tool'))
    expect(fetcher.metrics().verificationFailures).toEqual({ liar: 4 })
    expect(await store.has(chunk.digest)).toBe(true)
  })

  it('names the chunk, the layer and what each source said when no source can give it', async () => {
    const store = createMemoryStore()
    const image = await openImage({ client, store, ref: estargz.ref })
    const layer = image.layers[1]!
    const entry = layer.toc.lookup('etc/conf3.txt')!
    const nothing: ChunkSource = { name: 'peers', get: async () => undefined }
    const broken: ChunkSource = {
      name: 'registry',
      get: async () => {
        throw new Error('HTTP 503')
      }
    }
    const fetcher = createFetcher({ store, sources: [nothing, broken] })
    const err = await readFile(fetcher, layer, entry, 0, 10).catch((e: unknown) => e)
    expect(err).toMatchObject({ name: 'ChunkUnavailableError', code: 'ERR_CHUNK_UNAVAILABLE', layer: layer.digest })
    expect((err as Error).message).toContain(entry.chunks[0]!.digest)
    expect((err as Error).message).toContain('peers: does not have it')
    expect((err as Error).message).toContain('registry: HTTP 503')
  })

  it('hedges a slow source with the next one, one at a time, never all at once', async () => {
    const store = createMemoryStore()
    const image = await openImage({ client, store, ref: estargz.ref })
    const layer = image.layers[0]!
    const entry = layer.toc.lookup('etc/conf9.txt')!
    const ref = chunkRef(layer, entry.chunks[0]!)
    const held = await heldBytes([ref])
    const asked: string[] = []
    const slow: ChunkSource = {
      name: 'slow-peer',
      get: (_chunk, options) => {
        asked.push('slow-peer')
        return new Promise((resolve) => {
          const t = setTimeout(() => resolve(undefined), 5000)
          options?.signal?.addEventListener('abort', () => {
            clearTimeout(t)
            resolve(undefined)
          })
        })
      }
    }
    const registry = heldSource('registry', held, asked)
    const never = heldSource('mirror', new Map(), asked)
    fakeTimers()
    const fetcher = createFetcher({ store, sources: [slow, registry, never], hedgeDelayMs: 100 })
    const got = fetcher.get(ref)
    await vi.advanceTimersByTimeAsync(99)
    expect(asked).toEqual(['slow-peer'])
    // At the hedge delay the registry is asked too, and answers: no waiting out the slow peer's 5 s.
    await vi.advanceTimersByTimeAsync(1)
    expect(hex(await got)).toBe(estargz.layers[0]!.files.get('etc/conf9.txt'))
    expect(asked).toEqual(['slow-peer', 'registry'])
    expect(fetcher.metrics().hedges).toBe(1)
  })

  it('hedges batches too: what a stalled source has not delivered goes to the next one', async () => {
    const store = createMemoryStore()
    const image = await openImage({ client, store, ref: estargz.ref })
    const layer = image.layers[0]!
    const tool = layer.toc.lookup('usr/bin/tool')!
    const held = await heldBytes(tool.chunks.map((c) => chunkRef(layer, c)))
    const asked: string[] = []
    const registrySource = heldSource('registry', held, asked)
    let peerDelivered = 0
    // A peer that has the first chunk of the file at once, then stalls until it is told to stop.
    const stalling: ChunkSource = {
      name: 'peer',
      get: async () => undefined,
      async *getMany(chunks, options) {
        const first = chunks.find((c) => c.digest === tool.chunks[0]!.digest)
        if (first !== undefined) {
          peerDelivered++
          yield { chunk: first, bytes: held.get(first.digest)! }
        }
        await new Promise((resolve) => options?.signal?.addEventListener('abort', resolve))
      }
    }
    fakeTimers()
    const fetcher = createFetcher({ store, sources: [stalling, registrySource], hedgeDelayMs: 100, readAheadBytes: 0 })
    const reading = readFile(fetcher, layer, tool, 0, tool.size)
    await vi.advanceTimersByTimeAsync(99)
    expect(asked).toEqual([])
    // The peer delivered nothing more for the hedge delay: what it still owes goes to the registry.
    await vi.advanceTimersByTimeAsync(1)
    const bytes = await reading
    expect(asked).toEqual(['registry', 'registry'])
    expect(hex(bytes)).toBe(estargz.layers[0]!.files.get('usr/bin/tool'))
    const m = fetcher.metrics()
    expect(peerDelivered).toBe(1)
    expect(m.sources.peer!.chunks).toBe(1)
    expect(m.sources.registry!.chunks).toBe(tool.chunks.length - 1)
    expect(m.hedges).toBe(1)
  })

  it("waits a batch's own hedge delay, when it gives one, before asking the next source", async () => {
    const store = createMemoryStore()
    const image = await openImage({ client, store, ref: estargz.ref })
    const layer = image.layers[0]!
    const refs = ['etc/conf1.txt', 'etc/conf2.txt'].map((p) => chunkRef(layer, layer.toc.lookup(p)!.chunks[0]!))
    const other = chunkRef(layer, layer.toc.lookup('etc/conf3.txt')!.chunks[0]!)
    const held = await heldBytes([...refs, other])
    const registrySource = heldSource('registry', held)
    let registryAsked = 0
    // A peer that answers each chunk after 600 ms: slower than the fetcher's hedge delay, within the batch's.
    const slowPeer: ChunkSource = {
      name: 'peer',
      get: async (chunk) => {
        await new Promise((resolve) => setTimeout(resolve, 600))
        return registrySource.get(chunk)
      }
    }
    const registry: ChunkSource = {
      name: 'registry',
      get: (chunk, options) => {
        registryAsked++
        return registrySource.get(chunk, options)
      }
    }
    fakeTimers()
    const fetcher = createFetcher({ store, sources: [slowPeer, registry], hedgeDelayMs: 100, readAheadBytes: 0 })
    const getting = fetcher.getMany(refs, { hedgeDelayMs: 5000 })
    expect(await settlesAfter(getting)).toBe(600)
    const got = await getting
    expect(got.map((b) => hex(b))).toEqual(
      ['etc/conf1.txt', 'etc/conf2.txt'].map((p) => estargz.layers[0]!.files.get(p))
    )
    expect(registryAsked).toBe(0)
    expect(fetcher.metrics()).toMatchObject({ hedges: 0, sources: { peer: { chunks: 2 } } })
    // The fetcher's own delay for a batch without one: the registry is asked too, and answers first.
    expect(await settlesAfter(fetcher.getMany([other]), 50)).toBe(100)
    expect(registryAsked).toBe(1)
  })

  it('prefetches the prioritized files in one range read, and reads ahead the rest of a file', async () => {
    const store = createMemoryStore()
    const c = counting(client)
    const image = await openImage({ client: c, store, ref: estargz.ref })
    const layer = image.layers[0]!
    expect(layer.toc.prioritized.map((e) => e.path)).toEqual(expect.arrayContaining(['etc/conf1.txt', 'etc/conf2.txt']))
    const fetcher = createFetcher({
      store,
      sources: [createRegistrySource({ client: c })]
    })
    c.reads = 0
    await fetcher.prefetch(image)
    expect(c.reads).toBe(1)
    for (const e of layer.toc.prioritized) for (const ch of e.chunks) expect(await store.has(ch.digest)).toBe(true)

    const tool = layer.toc.lookup('usr/bin/tool')!
    await readFile(fetcher, layer, tool, 0, 100)
    const deadline = Date.now() + 10_000
    while (!(await store.has(tool.chunks[2]!.digest)) && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 20))
    for (const ch of tool.chunks) expect(await store.has(ch.digest)).toBe(true)
  })

  it('reads ahead only the chunks the store lacks: stored ones are looked up, never read', async () => {
    const store = createMemoryStore()
    const image = await openImage({ client, store, ref: estargz.ref })
    const layer = image.layers[0]!
    const tool = layer.toc.lookup('usr/bin/tool')!
    const sources = [createRegistrySource({ client })]
    // Every chunk but the last is stored already.
    await readFile(
      createFetcher({ store, sources, readAheadBytes: 0 }),
      layer,
      tool,
      0,
      tool.chunks.at(-2)!.fileOffset + 1
    )
    const last = tool.chunks.at(-1)!
    expect(await store.has(last.digest)).toBe(false)
    const gets: string[] = []
    const counted = Object.create(store) as typeof store
    counted.get = (digest, options) => {
      gets.push(digest)
      return store.get(digest, options)
    }
    const fetcher = createFetcher({ store: counted, sources })
    await readFile(fetcher, layer, tool, 0, 100)
    const deadline = Date.now() + 10_000
    while (!(await store.has(last.digest)) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20))
    expect(await store.has(last.digest)).toBe(true)
    // The read itself is in place (no get); the missing last one is a miss before the sources: nothing else.
    expect(gets).toEqual([last.digest])
    expect(fetcher.metrics().sources.registry!.chunks).toBe(1)
  })

  it('lets concurrent readers of neighbouring files share Range requests', async () => {
    const store = createMemoryStore()
    const c = counting(client)
    const image = await openImage({ client: c, store, ref: estargz.ref })
    const layer = image.layers[1]!
    const fetcher = createFetcher({
      store,
      sources: [createRegistrySource({ client: c })]
    })
    const names = Array.from({ length: 20 }, (_, i) => `etc/conf${i}.txt`)
    c.reads = 0
    const got = await Promise.all(names.map((n) => readFile(fetcher, layer, layer.toc.lookup(n)!, 0, 1 << 20)))
    expect(got.map(hex)).toEqual(names.map((n) => estargz.layers[1]!.files.get(n)))
    expect(c.reads).toBeLessThanOrEqual(names.length / 4)
  })

  it('serves verified bytes when the store fails to read or write (an I/O error a real disk rarely gives on cue)', async () => {
    const real = createMemoryStore()
    const image = await openImage({ client, store: real, ref: estargz.ref })
    const failing = Object.create(real) as typeof real
    failing.get = async () => {
      throw new Error('EIO: i/o error, read')
    }
    failing.put = async () => {
      throw new Error('ENOSPC: no space left on device')
    }
    const fetcher = createFetcher({
      store: failing,
      sources: [createRegistrySource({ client })]
    })
    const errors: FetchEvent[] = []
    fetcher.addEventListener('store:error', (e) => errors.push((e as CustomEvent<FetchEvent>).detail))
    const layer = image.layers[0]!
    const entry = layer.toc.lookup('etc/conf5.txt')!
    expect(hex(await readFile(fetcher, layer, entry, 0, entry.size))).toBe(
      estargz.layers[0]!.files.get('etc/conf5.txt')
    )
    expect(errors.map((e) => (e as { message: string }).message)).toEqual([
      expect.stringContaining('EIO'),
      expect.stringContaining('ENOSPC')
    ])
    expect(fetcher.metrics().sources.store).toMatchObject({ errors: 2, misses: 1 })
  })

  it('fetches whole layers in the background at a bounded rate', async () => {
    const store = createMemoryStore()
    const image = await openImage({ client, store, ref: estargz.ref })
    const one: Image = { ...image, layers: [image.layers[1]!] }
    const layer = one.layers[0]!
    const chunks = [...layer.toc.entries.values()].flatMap((e) => e.chunks)
    const total = chunks.reduce((a, c) => a + c.size, 0)
    const held = await heldBytes(chunks.map((c) => chunkRef(layer, c)))
    fakeTimers()
    const fetcher = createFetcher({ store, sources: [heldSource('registry', held)] })
    const progress: FetchEvent[] = []
    fetcher.addEventListener('prefetch', (e) => progress.push((e as CustomEvent<FetchEvent>).detail))
    const rate = 2 * 1024 * 1024
    const seconds = (await settlesAfter(fetcher.prefetch(one, { wholeLayerBytesPerSecond: rate }))) / 1000
    for (const c of chunks) expect(await store.has(c.digest)).toBe(true)
    // About one second per `rate` bytes fetched: no faster (the bound), and no slower than a batch more.
    expect(seconds).toBeGreaterThanOrEqual(total / rate - 1)
    expect(seconds).toBeLessThanOrEqual(total / rate + 1)
    expect(progress.at(-1)).toMatchObject({ type: 'prefetch', bytes: total, total })
  })

  it('keeps reads correct under a store cap smaller than the image', async () => {
    const store = createMemoryStore({ maxBytes: 6 * 1024 * 1024 })
    const image = await openImage({ client, store, ref: estargz.ref })
    const fetcher = createFetcher({
      store,
      sources: [createRegistrySource({ client })]
    })
    await readAll(fetcher, image, estargz)
    await readAll(fetcher, image, estargz)
    const stats = await store.stats()
    expect(stats.evictions).toBeGreaterThan(0)
    expect(stats.bytes).toBeLessThanOrEqual(6 * 1024 * 1024)
  })
})

describe('trust in the TOC', () => {
  it('refuses a layer whose TOC does not match the manifest annotation', async () => {
    const bad = await buildTestImage({
      registry: registry.host,
      repository: 'test/bad-toc',
      layers: [{ files: join(work, 'a') }],
      estargz: true,
      gzipLevel: 1,
      tocAnnotation: `sha256:${'0'.repeat(64)}`
    })
    const err = await openImage({ client, store: createMemoryStore(), ref: bad.ref }).catch((e: unknown) => e)
    expect(err).toMatchObject({ name: 'TOCDigestMismatchError', layer: bad.layers[0]!.digest })
    expect((err as Error).message).toContain(`sha256:${'0'.repeat(64)}`)
  })

  it('opens a layer without annotation as unverified with a warning, and refuses it under requireVerified', async () => {
    const bare = await buildTestImage({
      registry: registry.host,
      repository: 'test/no-annotation',
      layers: [{ files: join(work, 'b') }],
      estargz: true,
      gzipLevel: 1,
      omitTocAnnotation: true
    })
    const events: FetchEvent[] = []
    const image = await openImage({
      client,
      store: createMemoryStore(),
      ref: bare.ref,
      onProgress: (e) => events.push(e)
    })
    expect(image.layers[0]!.verified).toBe(false)
    expect(events.some((e) => e.type === 'layer:unverified' && e.message.includes('toc.digest'))).toBe(true)
    const err = await openImage({ client, store: createMemoryStore(), ref: bare.ref, requireVerified: true }).catch(
      (e: unknown) => e
    )
    expect(err).toMatchObject({ name: 'UnverifiedLayerError', code: 'ERR_UNVERIFIED_LAYER' })
  })
})

describe('a plain gzip image', () => {
  it('is downloaded once, indexed, and read like an eStargz one', async () => {
    const store = createMemoryStore()
    const c = counting(client)
    const events: FetchEvent[] = []
    const image = await openImage({ client: c, store, ref: plain.ref, onProgress: (e) => events.push(e) })
    const layer = image.layers[0]!
    expect(layer).toMatchObject({ format: 'indexed', verified: true, compression: 'gzip' })
    expect(c.downloads).toBe(1)
    expect(events.some((e) => e.type === 'layer:download' && e.bytes === e.total)).toBe(true)
    expect(events).toContainEqual(expect.objectContaining({ type: 'layer:indexed', files: 22, chunks: 22 }))
    expect(layer.toc.lookup('etc/tool-link')).toMatchObject({ type: 'symlink', linkName: '../usr/bin/tool' })
    expect(layer.toc.lookup('data/empty')).toMatchObject({ type: 'reg', size: 0 })
    const fetcher = createFetcher({
      store,
      sources: [createRegistrySource({ client: c })]
    })
    await readAll(fetcher, image, plain)
    expect(fetcher.metrics().sources.registry).toBeUndefined()
    expect((await store.stats()).pinned).toBe(22)

    const again = await openImage({ client: c, store, ref: plain.ref })
    expect(c.downloads).toBe(1)
    expect(again.layers[0]!.tocDigest).toBe(layer.tocDigest)
  })

  it('reads a tar+zstd layer the same way', async () => {
    for (const compression of ['zstd'] as const) {
      const test = await buildTestImage({
        registry: registry.host,
        repository: `test/plain-${compression}`,
        layers: [{ files: join(work, 'a') }],
        estargz: false,
        plainCompression: compression
      })
      const store = createMemoryStore()
      const image = await openImage({ client, store, ref: test.ref })
      expect(image.layers[0]).toMatchObject({ format: 'indexed', compression, verified: true })
      const fetcher = createFetcher({ store, sources: [] })
      expect(await readAll(fetcher, image, test)).toBe(22)
    }
  })

  it('indexes pax tars: long names, hardlinks and xattrs', async () => {
    const root = join(work, 'pax')
    const deep = join(root, 'a'.repeat(60), 'b'.repeat(60))
    await mkdir(deep, { recursive: true })
    const long = join(deep, `${'c'.repeat(90)}.txt`)
    await writeFile(long, 'a file with a long name\n')
    await link(long, join(root, 'hard'))
    await run('setfattr', ['-n', 'user.strata', '-v', 'hello', long])
    const test = await buildTestImage({
      registry: registry.host,
      repository: 'test/pax',
      layers: [{ files: root, tarArgs: ['--format=pax', '--xattrs'] }],
      estargz: false
    })
    const store = createMemoryStore()
    const image = await openImage({ client, store, ref: test.ref })
    const layer = image.layers[0]!
    const longPath = relative(root, long)
    const entry = layer.toc.lookup(longPath)!
    expect(entry).toMatchObject({ type: 'reg', size: 24 })
    expect(Buffer.from(entry.xattrs['user.strata']!).toString()).toBe('hello')
    // GNU tar stores the second name of a hardlinked pair as the link.
    const names = [longPath, 'hard']
    const link1 = names.map((n) => layer.toc.lookup(n)!).find((e) => e.type === 'hardlink')!
    expect(names).toContain(link1.linkName)
    const fetcher = createFetcher({ store, sources: [] })
    expect(Buffer.from(await readFile(fetcher, layer, entry, 0, entry.size)).toString()).toBe(
      'a file with a long name\n'
    )
  })

  it('gets chunks the store lost back from the registry by downloading the layer again', async () => {
    const store = createMemoryStore()
    const image = await openImage({ client, store, ref: plain.ref })
    const layer = image.layers[0]!
    const tool = layer.toc.lookup('usr/bin/tool')!
    const refs: ChunkRef[] = tool.chunks.map((ch) => chunkRef(layer, ch))
    await store.unpin(layer.digest)
    for (const r of refs) await store.delete(r.digest)
    const fetcher = createFetcher({
      store,
      sources: [createRegistrySource({ client })]
    })
    const bytes = await readFile(fetcher, layer, tool, 0, tool.size)
    expect(hex(bytes)).toBe(plain.layers[0]!.files.get('usr/bin/tool'))
    expect(fetcher.metrics().sources.registry!.chunks).toBe(refs.length)
  })
})

describe('registry faults', () => {
  it('opens what a reference last named when the registry is down, and only then', async () => {
    const store = createMemoryStore()
    let fail: Error | undefined
    const flaky = Object.create(client) as RegistryClient
    flaky.getImage = (ref, options) => (fail !== undefined ? Promise.reject(fail) : client.getImage(ref, options))
    const down = Object.assign(new Error('connect ECONNREFUSED'), { name: 'RegistryUnavailableError' })
    const events: FetchEvent[] = []
    const onProgress = (e: FetchEvent) => events.push(e)

    // Never opened here: the outage is the error.
    fail = down
    await expect(resolveImage({ client: flaky, store, ref: estargz.ref })).rejects.toBe(down)
    fail = undefined
    const online = await openImage({ client: flaky, store, ref: estargz.ref })
    fail = down
    const offline = await openImage({ client: flaky, store, ref: estargz.ref, onProgress })
    expect(offline.digest).toBe(online.digest)
    expect(offline.layers.map((l) => l.tocDigest)).toEqual(online.layers.map((l) => l.tocDigest))
    expect(events.filter((e) => e.type === 'image:stale')).toMatchObject([
      { ref: estargz.ref, digest: online.digest, message: expect.stringContaining('connect ECONNREFUSED') }
    ])
    // Another platform was never opened; a refusal (the tag is gone) is not an outage.
    await expect(resolveImage({ client: flaky, store, ref: estargz.ref, platform: 'linux/arm64' })).rejects.toBe(down)
    fail = Object.assign(new Error('manifest unknown'), { name: 'ManifestUnknownError' })
    await expect(resolveImage({ client: flaky, store, ref: estargz.ref })).rejects.toBe(fail)
    // What the store kept is checked against its digest before use.
    fail = down
    const key = `image/@${estargz.ref}`
    const kept = JSON.parse(new TextDecoder().decode(await store.getMeta(key)))
    kept.manifest = Buffer.from('{"layers":[],"config":{}}').toString('base64')
    await store.putMeta(key, new TextEncoder().encode(JSON.stringify(kept)))
    await expect(resolveImage({ client: flaky, store, ref: estargz.ref })).rejects.toBe(down)
  })

  it('recovers when connections drop in the middle of a read', async () => {
    const proxy = await startWanProxy({ target: registry.host, rttMs: 2, bitsPerSecond: 40_000_000 })
    try {
      const ref = estargz.ref.replace(registry.host, proxy.host)
      const c = createRegistryClient({ retries: 3, backoffMs: 50 })
      const store = createMemoryStore()
      const image = await openImage({ client: c, store, ref })
      const fetcher = createFetcher({
        store,
        sources: [createRegistrySource({ client: c })]
      })
      const layer = image.layers[0]!
      const tool = layer.toc.lookup('usr/bin/tool')!
      proxy.reset()
      const reading = readFile(fetcher, layer, tool, 0, tool.size)
      while (proxy.bytesDown < 1024 * 1024) await new Promise((r) => setTimeout(r, 10))
      proxy.cut()
      expect(hex(await reading)).toBe(estargz.layers[0]!.files.get('usr/bin/tool'))
      expect(proxy.connections).toBeGreaterThan(1)
    } finally {
      await proxy.stop()
    }
  })

  it('fails with the chunk, the layer and the registry error when the registry is gone', async () => {
    const proxy = await startWanProxy({ target: registry.host, rttMs: 0, bitsPerSecond: 0 })
    const ref = estargz.ref.replace(registry.host, proxy.host)
    const c = createRegistryClient({ retries: 1, backoffMs: 10 })
    const store = createMemoryStore()
    const image = await openImage({ client: c, store, ref })
    await proxy.stop()
    const fetcher = createFetcher({ store, sources: [createRegistrySource({ client: c })] })
    const layer = image.layers[1]!
    const entry = layer.toc.lookup('etc/conf4.txt')!
    const err = await readFile(fetcher, layer, entry, 0, entry.size).catch((e: unknown) => e)
    expect(err).toMatchObject({ name: 'ChunkUnavailableError', digest: entry.chunks[0]!.digest, layer: layer.digest })
    expect((err as Error).message).toMatch(/registry: .+/)
    expect((err as { hint?: string }).hint).toBeDefined()
  })
})

describe('source liveness: the source timeout measures progress, not total time', () => {
  /** The eStargz image opened over a fresh 12 Mbit/s, 10 ms link (a client without retries), for `fn`. */
  const overThinLink = async (
    fn: (link: { c: RegistryClient; store: ReturnType<typeof createMemoryStore>; image: Image }) => Promise<void>
  ) => {
    const proxy = await startWanProxy({ target: registry.host, rttMs: 10, bitsPerSecond: 12_000_000 })
    try {
      const ref = estargz.ref.replace(registry.host, proxy.host)
      const c = createRegistryClient({ retries: 0 })
      const store = createMemoryStore()
      await fn({ c, store, image: await openImage({ client: c, store, ref }) })
    } finally {
      await proxy.stop()
    }
  }

  it('never gives up a slow but moving registry: every chunk arrives though each range takes longer than the timeout', async () => {
    // 12 Mbit/s: the ~5 MiB layer takes ~3.5 s, 7x the timeout; its 4 MiB chunk arrives whole only after ~2.8 s.
    await overThinLink(async ({ c, store, image }) => {
      const fetcher = createFetcher({
        store,
        sources: [createRegistrySource({ client: c })],
        sourceTimeoutMs: 500,
        readAheadBytes: 0
      })
      const layer = image.layers[1]!
      const list = files(image).filter((f) => f.layer === layer)
      const started = performance.now()
      // One ask per file, all at once: most wait in the layer's queue behind the others.
      const got = await Promise.all(list.map(({ entry }) => readFile(fetcher, layer, entry, 0, entry.size)))
      expect(performance.now() - started).toBeGreaterThan(4 * 500)
      got.forEach((bytes, i) => {
        const path = list[i]!.entry.path
        expect(hex(bytes), path).toBe(estargz.layers[1]!.files.get(path))
      })
      expect(fetcher.metrics().sources.registry).toMatchObject({ errors: 0, misses: 0 })
    })
  })

  it('keeps asks waiting behind other asks of a busy source alive (one read at a time on a thin link)', async () => {
    await overThinLink(async ({ c, store, image }) => {
      const source = createRegistrySource({
        client: c,
        concurrency: 1,
        maxRangeBytes: 1 << 20
      })
      const fetcher = createFetcher({ store, sources: [source], sourceTimeoutMs: 500, readAheadBytes: 0 })
      const layer = image.layers[1]!
      const tool = layer.toc.lookup('usr/bin/tool')!
      const confs = files(image).filter((f) => f.layer === layer && f.entry.path.startsWith('etc/conf'))
      const started = performance.now()
      // The tool's 4 MiB chunk goes first (~2.8 s); the small files' asks wait in the queue, hearing no bytes.
      const first = readFile(fetcher, layer, tool, 0, tool.size)
      const waited = await Promise.all(
        confs.map(async ({ entry }) => {
          const bytes = await readFile(fetcher, layer, entry, 0, entry.size)
          expect(hex(bytes), entry.path).toBe(estargz.layers[1]!.files.get(entry.path))
          return performance.now() - started
        })
      )
      expect(hex(await first)).toBe(estargz.layers[1]!.files.get('usr/bin/tool'))
      expect(Math.min(...waited)).toBeGreaterThan(4 * 500)
      expect(fetcher.metrics().sources.registry).toMatchObject({ errors: 0, misses: 0 })
    })
  })

  it('counts a whole-layer download on a thin link as progress (plain layers)', async () => {
    const proxy = await startWanProxy({ target: registry.host, rttMs: 10, bitsPerSecond: 12_000_000 })
    try {
      const c = through(createRegistryClient({ retries: 0 }), proxy.host)
      const store = createMemoryStore()
      // Opened (downloaded and indexed) directly; then the tool's chunks are lost, to be downloaded again slowly.
      const image = await openImage({ client, store, ref: plain.ref })
      const layer = image.layers[0]!
      const tool = layer.toc.lookup('usr/bin/tool')!
      await store.unpin(layer.digest)
      for (const ch of tool.chunks) await store.delete(ch.digest)
      const fetcher = createFetcher({
        store,
        sources: [createRegistrySource({ client: c })],
        sourceTimeoutMs: 500
      })
      const started = performance.now()
      const bytes = await readFile(fetcher, layer, tool, 0, tool.size)
      expect(performance.now() - started).toBeGreaterThan(4 * 500)
      expect(hex(bytes)).toBe(plain.layers[0]!.files.get('usr/bin/tool'))
    } finally {
      await proxy.stop()
    }
  })

  it('gives up hung sources (one-by-one and batched, deaf to their signal) after about sourceTimeoutMs each, then asks the next', async () => {
    const store = createMemoryStore()
    const image = await openImage({ client, store, ref: estargz.ref })
    const asked: string[] = []
    // Faults a real peer cannot be made to produce on cue: requests accepted, then nothing, signal ignored.
    const hung: ChunkSource = {
      name: 'peer',
      get: () => {
        asked.push('peer')
        return new Promise(() => {})
      }
    }
    const hungBatch: ChunkSource = {
      name: 'mirror',
      get: () => new Promise(() => {}),
      async *getMany() {
        asked.push('mirror')
        await new Promise(() => {})
      }
    }
    const layer = image.layers[0]!
    const entry = layer.toc.lookup('etc/conf9.txt')!
    const held = await heldBytes(entry.chunks.map((c) => chunkRef(layer, c)))
    fakeTimers()
    const fetcher = createFetcher({
      store,
      sources: [hung, hungBatch, heldSource('registry', held, asked)],
      hedgeDelayMs: 60_000,
      sourceTimeoutMs: 300
    })
    const reading = readFile(fetcher, layer, entry, 0, entry.size)
    await vi.advanceTimersByTimeAsync(299)
    expect(asked).toEqual(['peer'])
    await vi.advanceTimersByTimeAsync(1)
    expect(asked).toEqual(['peer', 'mirror'])
    await vi.advanceTimersByTimeAsync(299)
    expect(asked).toEqual(['peer', 'mirror'])
    await vi.advanceTimersByTimeAsync(1)
    expect(hex(await reading)).toBe(estargz.layers[0]!.files.get('etc/conf9.txt'))
    expect(asked).toEqual(['peer', 'mirror', 'registry'])
    const m = fetcher.metrics()
    expect(m.sources.peer).toMatchObject({ chunks: 0, errors: 1 })
    expect(m.sources.mirror).toMatchObject({ chunks: 0, errors: 1 })
    expect(m.sources.registry!.chunks).toBe(1)
    expect(m.hedges).toBe(0)
  })

  it('fails a read from a registry that sends headers and then nothing, naming the source and the timeout', async () => {
    const proxy = await startFaultProxy(registry.host)
    try {
      const ref = estargz.ref.replace(registry.host, proxy.host)
      // The client's own idle timeout is longer: the fetcher's liveness is what gives up here.
      const c = createRegistryClient({ retries: 0, timeoutMs: 60_000 })
      const store = createMemoryStore()
      const image = await openImage({ client: c, store, ref })
      proxy.faults.push({ kind: 'stall', afterBytes: 0, path: /\/blobs\//, times: Number.POSITIVE_INFINITY })
      const fetcher = createFetcher({
        store,
        sources: [createRegistrySource({ client: c })],
        sourceTimeoutMs: 300
      })
      const layer = image.layers[1]!
      const entry = layer.toc.lookup('etc/conf4.txt')!
      const started = performance.now()
      const err = await readFile(fetcher, layer, entry, 0, entry.size).catch((e: unknown) => e)
      const ms = performance.now() - started
      expect(err).toMatchObject({ name: 'ChunkUnavailableError', digest: entry.chunks[0]!.digest })
      expect((err as Error).message).toContain(
        `registry: source registry made no progress for 300 ms while asked for chunk ${entry.chunks[0]!.digest}`
      )
      expect(ms).toBeGreaterThanOrEqual(295)
      expect(ms).toBeLessThan(1500)
      expect(proxy.requests.some((r) => r.fault === 'stall')).toBe(true)
    } finally {
      await proxy.stop()
    }
  })
})

describe('damaged registry responses: a flipped byte is asked again, a bounded number of times', () => {
  /** The eStargz image opened through a fault proxy (no faults yet), and a fetcher reading it from the registry. */
  const throughProxy = async (fn: (p: { proxy: FaultProxy; fetcher: Fetcher; image: Image }) => Promise<void>) => {
    const proxy = await startFaultProxy(registry.host)
    try {
      const ref = estargz.ref.replace(registry.host, proxy.host)
      const store = createMemoryStore()
      const image = await openImage({ client, store, ref })
      const fetcher = createFetcher({
        store,
        sources: [createRegistrySource({ client })],
        readAheadBytes: 0
      })
      await fn({ proxy, fetcher, image })
    } finally {
      await proxy.stop()
    }
  }
  const bad = (fetcher: Fetcher) => {
    const events: FetchEvent[] = []
    fetcher.addEventListener('chunk:bad', (e) => events.push((e as CustomEvent<FetchEvent>).detail))
    return events
  }

  it('reads a file whose compressed chunk arrived with a byte flipped (it does not inflate), counting it', async () => {
    await throughProxy(async ({ proxy, fetcher, image }) => {
      const events = bad(fetcher)
      const layer = image.layers[0]!
      const entry = layer.toc.lookup('etc/conf19.txt')!
      proxy.faults.push({ kind: 'corrupt', path: /\/blobs\//, times: 1 })
      const bytes = await readFile(fetcher, layer, entry, 0, entry.size)
      expect(hex(bytes)).toBe(estargz.layers[0]!.files.get('etc/conf19.txt'))
      expect(proxy.requests.filter((r) => r.fault === 'corrupt')).toHaveLength(1)
      expect(fetcher.metrics().verificationFailures).toEqual({ registry: 1 })
      expect(events).toEqual([
        expect.objectContaining({ type: 'chunk:bad', source: 'registry', digest: entry.chunks[0]!.digest })
      ])
    })
  })

  it('asks the last source again for a chunk whose bytes inflate but do not match its digest', async () => {
    const store = createMemoryStore()
    const image = await openImage({ client, store, ref: estargz.ref })
    const real = createRegistrySource({ client })
    let served = 0
    // Well-formed wrong bytes, once (a mirror serving another blob): a registry behind a proxy cannot be made to
    // do that on cue, since a flipped byte fails the gzip checksum first.
    const wrong: ChunkSource = {
      name: 'registry',
      async get(chunk, options) {
        const bytes = await real.get(chunk, options)
        return served++ === 0 && bytes !== undefined ? bytes.slice(1) : bytes
      }
    }
    const fetcher = createFetcher({ store, sources: [wrong], readAheadBytes: 0 })
    const events = bad(fetcher)
    const layer = image.layers[0]!
    const entry = layer.toc.lookup('etc/conf11.txt')!
    const bytes = await readFile(fetcher, layer, entry, 0, entry.size)
    expect(hex(bytes)).toBe(estargz.layers[0]!.files.get('etc/conf11.txt'))
    expect(served).toBe(2)
    expect(fetcher.metrics().verificationFailures).toEqual({ registry: 1 })
    expect(events).toEqual([expect.objectContaining({ reason: expect.stringContaining('failed verification') })])
  })

  it('gives up after two more tries when every response is damaged, naming each', async () => {
    await throughProxy(async ({ proxy, fetcher, image }) => {
      const layer = image.layers[1]!
      const entry = layer.toc.lookup('etc/conf4.txt')!
      proxy.faults.push({ kind: 'corrupt', path: /\/blobs\//, times: Number.POSITIVE_INFINITY })
      const err = await readFile(fetcher, layer, entry, 0, entry.size).catch((e: unknown) => e)
      expect(err).toMatchObject({ name: 'ChunkUnavailableError', digest: entry.chunks[0]!.digest })
      expect((err as { attempts: string[] }).attempts).toEqual([
        expect.stringMatching(/^registry: bad bytes \(/),
        expect.stringMatching(/^registry: bad bytes \(/),
        expect.stringMatching(/^registry: bad bytes \(/)
      ])
      expect(proxy.requests.filter((r) => r.fault === 'corrupt')).toHaveLength(3)
      expect(fetcher.metrics().verificationFailures).toEqual({ registry: 3 })
    })
  })
})

describe('stalled sources: a read gets its answer, or its error, within a bound of its sources stalling', () => {
  it('bounds a read by default within 35 s of its sources stalling, p2pd (a peer, then the registry) included', () => {
    expect(stallBound()).toEqual({ freshMs: 24_000, knownMs: 1_000 })
    // p2pd: peers first, the registry 8 s after a silent peer (node.ts); the kernel asks again once for a read
    // that failed, when its sources are known stalled.
    const p2pd = stallBound({ hedgeDelayMs: 8_000 }, 2)
    expect(p2pd).toEqual({ freshMs: 32_000, knownMs: 2_000 })
    expect(p2pd.freshMs + p2pd.knownMs).toBeLessThanOrEqual(35_000)
  })

  /** Fetchers over registries behind proxies whose blob requests stall (headers and `afterBytes`, then nothing). */
  const stalling = async (
    afterBytes: number,
    fn: (p: { proxies: FaultProxy[]; image: Image; store: ReturnType<typeof createMemoryStore> }) => Promise<void>,
    count = 1
  ) => {
    const proxies = await Promise.all(Array.from({ length: count }, () => startFaultProxy(registry.host)))
    try {
      const store = createMemoryStore()
      // Opened through the first proxy: its chunks' LayerRefs name it.
      const image = await openImage({ client, store, ref: estargz.ref.replace(registry.host, proxies[0]!.host) })
      for (const p of proxies)
        p.faults.push({ kind: 'stall', afterBytes, path: /\/blobs\//, times: Number.POSITIVE_INFINITY })
      await fn({ proxies, image, store })
    } finally {
      await Promise.all(proxies.map((p) => p.stop()))
    }
  }
  const timeouts = { sourceTimeoutMs: 400, stalledTimeoutMs: 100, readAheadBytes: 0 }
  /** Waits (real time: the proxies and the registry are real) until `cond` holds. */
  const until = async (cond: () => boolean) => {
    for (let i = 0; !cond(); i++) {
      if (i > 1_000_000) throw new Error('waited too long')
      await new Promise((r) => setImmediate(r))
    }
  }
  /** Blob requests a proxy stalled so far. */
  const stalls = (proxy: FaultProxy) => proxy.requests.filter((r) => r.fault === 'stall').length
  /** `source`, counting the progress it reports (bytes arriving before a chunk is whole). */
  const watched = (source: ChunkSource) => {
    const seen = { progress: 0 }
    const wrap = (o?: SourceOptions): SourceOptions => ({
      ...o,
      onProgress: () => {
        seen.progress++
        o?.onProgress?.()
      }
    })
    const out: ChunkSource = {
      name: source.name,
      get: (chunk, o) => source.get(chunk, wrap(o)),
      ...(source.getMany !== undefined && { getMany: (chunks, o) => source.getMany!(chunks, wrap(o)) }),
      reportBad: (chunk, reason) => source.reportBad?.(chunk, reason)
    }
    return { source: out, seen }
  }
  /** Whether `p` has settled, and its error. */
  const watch = (p: Promise<unknown>) => {
    const state: { settled: boolean; err?: Error } = { settled: false }
    p.then(
      () => {
        state.settled = true
      },
      (e: unknown) => {
        state.settled = true
        state.err = e as Error
      }
    )
    return state
  }

  for (const afterBytes of [0, 100]) {
    it(`fails a read within the bound, and the kernel's retry of it within its short one (${afterBytes} bytes, then nothing)`, async () => {
      await stalling(afterBytes, async ({ proxies, image, store }) => {
        // The client's own idle timeout (30 s) is longer, as by default: the fetcher's liveness gives up first.
        const c = createRegistryClient({ timeoutMs: 30_000 })
        const { source, seen } = watched(createRegistrySource({ client: c }))
        fakeTimers()
        const fetcher = createFetcher({ ...timeouts, store, sources: [source] })
        const bound = stallBound(timeouts, 1)
        const layer = image.layers[1]!
        const entry = layer.toc.lookup('etc/conf4.txt')!
        // Fake time starts once the request stalls (and its bytes, if any, came): the bound is from the stall.
        const stalled = async (n: number) => {
          await until(() => stalls(proxies[0]!) === n && (afterBytes === 0 || seen.progress >= n))
          await vi.advanceTimersByTimeAsync(0)
        }
        const reading = readFile(fetcher, layer, entry, 0, entry.size)
        await stalled(1)
        const first = watch(reading)
        await vi.advanceTimersByTimeAsync(bound.freshMs - 1)
        expect(first.settled).toBe(false)
        await vi.advanceTimersByTimeAsync(1)
        expect(first.err).toMatchObject({ name: 'ChunkUnavailableError' })
        expect(first.err!.message).toContain('registry: source registry made no progress for 400 ms')
        const retrying = readFile(fetcher, layer, entry, 0, entry.size)
        await stalled(2)
        const again = watch(retrying)
        await vi.advanceTimersByTimeAsync(bound.knownMs - 1)
        expect(again.settled).toBe(false)
        await vi.advanceTimersByTimeAsync(1)
        expect(again.err!.message).toMatch(
          /made no progress for 1\d\d ms while asked for chunk \S+ \(it is stalled: none for \d+ ms\)/
        )
        // Each read made one request, cancelled when given up: none was retried by the client meanwhile.
        await vi.advanceTimersByTimeAsync(200)
        expect(stalls(proxies[0]!)).toBe(2)
      })
    })
  }

  it('gives up every read waiting on a source once it is found stalled, not each at its own timeout', async () => {
    await stalling(0, async ({ proxies, image, store }) => {
      fakeTimers()
      const fetcher = createFetcher({
        ...timeouts,
        store,
        sources: [createRegistrySource({ client })]
      })
      const layer = image.layers[1]!
      const reading = readFile(fetcher, layer, layer.toc.lookup('etc/conf4.txt')!, 0, 10)
      await until(() => stalls(proxies[0]!) === 1)
      const first = watch(reading)
      await vi.advanceTimersByTimeAsync(250)
      const later = watch(readFile(fetcher, layer, layer.toc.lookup('etc/conf5.txt')!, 0, 10))
      await vi.advanceTimersByTimeAsync(149)
      expect([first.settled, later.settled]).toEqual([false, false])
      // Started 250 ms after the first, it fails with it: 400 ms after the stall began, not 650.
      await vi.advanceTimersByTimeAsync(1)
      expect(first.err).toMatchObject({ name: 'ChunkUnavailableError' })
      expect(later.err).toMatchObject({ name: 'ChunkUnavailableError' })
    })
  })

  it('with two stalled sources hedged one after the other, fails within their bound, then its retry within the short one', async () => {
    await stalling(
      0,
      async ({ proxies, image, store }) => {
        const init = { ...timeouts, hedgeDelayMs: 150 }
        fakeTimers()
        const fetcher = createFetcher({
          ...init,
          store,
          sources: [
            createRegistrySource({ client: through(client, proxies[0]!.host), name: 'mirror' }),
            createRegistrySource({ client: through(client, proxies[1]!.host) })
          ]
        })
        const bound = stallBound(init, 2)
        expect(bound).toEqual({ freshMs: 550, knownMs: 200 })
        const layer = image.layers[0]!
        const entry = layer.toc.lookup('etc/conf2.txt')!
        const first = watch(readFile(fetcher, layer, entry, 0, entry.size))
        await vi.advanceTimersByTimeAsync(bound.freshMs - 1)
        expect(first.settled).toBe(false)
        await vi.advanceTimersByTimeAsync(1)
        expect(first.err!.message).toMatch(
          /mirror: source mirror made no progress.*registry: source registry made no progress/
        )
        const again = watch(readFile(fetcher, layer, entry, 0, entry.size))
        await vi.advanceTimersByTimeAsync(bound.knownMs - 1)
        expect(again.settled).toBe(false)
        await vi.advanceTimersByTimeAsync(1)
        expect(again.err).toMatchObject({ name: 'ChunkUnavailableError' })
      },
      2
    )
  })

  it('reads again at once when the stalled source recovers', async () => {
    await stalling(0, async ({ proxies, image, store }) => {
      const fetcher = createFetcher({
        ...timeouts,
        store,
        sources: [createRegistrySource({ client })]
      })
      const layer = image.layers[1]!
      const entry = layer.toc.lookup('etc/conf6.txt')!
      await expect(readFile(fetcher, layer, entry, 0, entry.size)).rejects.toMatchObject({
        name: 'ChunkUnavailableError'
      })
      proxies[0]!.faults.length = 0
      // Within the stalled window: a source that answers shows it within stalledTimeoutMs.
      const bytes = await readFile(fetcher, layer, entry, 0, entry.size)
      expect(hex(bytes)).toBe(estargz.layers[1]!.files.get('etc/conf6.txt'))
      const tool = layer.toc.lookup('usr/bin/tool')!
      expect(hex(await readFile(fetcher, layer, tool, 0, tool.size))).toBe(estargz.layers[1]!.files.get('usr/bin/tool'))
    })
  })
})

describe('stalled sources: the timing, with the defaults (fake timers)', () => {
  /** Sources that accept every request and never answer (nor heed their signal), and a chunk to ask them for. */
  const hungFetcher = (names: string[], init: Partial<FetcherInit> = {}) => {
    const asked: string[] = []
    const sources: ChunkSource[] = names.map((name) => ({
      name,
      get: () => {
        asked.push(name)
        return new Promise<undefined>(() => {})
      }
    }))
    const fetcher = createFetcher({ store: createMemoryStore(), sources, ...init })
    const chunk = (i: number): ChunkRef => ({
      digest: `sha256:${String(i).padStart(64, '0')}`,
      layer: { digest: `sha256:${'1'.repeat(64)}`, repository: 'localhost/test' },
      compression: 'gzip',
      offset: 0,
      end: 10,
      size: 10,
      innerOffset: 0,
      fileOffset: 0
    })
    return { fetcher, chunk, asked }
  }
  it("p2pd's sources (a peer, the registry 8 s later) stalled: a read fails at 32 s, the kernel's retry 2 s later", async () => {
    fakeTimers()
    const { fetcher, chunk, asked } = hungFetcher(['peer', 'registry'], { hedgeDelayMs: 8_000 })
    const first = await settlesAfter(fetcher.get(chunk(1)))
    expect(first).toBe(32_000)
    expect(asked).toEqual(['peer', 'registry'])
    const retry = await settlesAfter(fetcher.get(chunk(1)))
    expect(retry).toBe(2_000)
    expect(first + retry).toBeLessThanOrEqual(35_000)
  })

  it('gives a source found stalled its full timeout again once sourceTimeoutMs has passed', async () => {
    fakeTimers()
    const { fetcher, chunk } = hungFetcher(['registry'])
    expect(await settlesAfter(fetcher.get(chunk(1)))).toBe(24_000)
    expect(await settlesAfter(fetcher.get(chunk(2)))).toBe(1_000)
    await vi.advanceTimersByTimeAsync(24_000)
    expect(await settlesAfter(fetcher.get(chunk(3)))).toBe(24_000)
  })
})

describe('memory: what read-ahead and prefetch hold at once', () => {
  /** A file of `n` chunks of `size` bytes each, and a source that serves them, counting the bytes it owes. */
  function synthetic(n: number, size: number) {
    const parts = Array.from({ length: n }, (_, i) => new Uint8Array(size).fill(i + 1))
    const chunks = parts.map((p, i) => ({
      digest: `sha256:${hex(p)}`,
      fileOffset: i * size,
      size,
      offset: i * size,
      end: (i + 1) * size,
      innerOffset: 0
    }))
    const entry = { path: 'big', type: 'reg', size: n * size, chunks } as unknown as Entry
    const layer = {
      digest: `sha256:${'1'.repeat(64)}`,
      ref: { digest: `sha256:${'1'.repeat(64)}`, repository: 'localhost/test' },
      compression: 'gzip',
      toc: { chunkIndexAt: (_e: Entry, offset: number) => (offset < n * size ? Math.floor(offset / size) : -1) }
    } as unknown as ImageLayer
    let owed = 0
    let most = 0
    const source: ChunkSource = {
      name: 'registry',
      async get(chunk) {
        owed += chunk.size
        most = Math.max(most, owed)
        await new Promise((r) => setTimeout(r, 5))
        owed -= chunk.size
        return parts[chunks.findIndex((c) => c.digest === chunk.digest)]
      }
    }
    return { entry, layer, source, most: () => most }
  }

  it('reads ahead a file in windows within readAheadInFlightBytes, and all of it, past readAheadBytes too', async () => {
    const MiB = 1024 * 1024
    const { entry, layer, source, most } = synthetic(24, MiB)
    const store = createMemoryStore()
    const fetcher = createFetcher({
      store,
      sources: [source],
      concurrency: 64,
      readAheadBytes: 12 * MiB,
      readAheadInFlightBytes: 4 * MiB
    })
    // A sequential reader through the store's fast path, as a mount reads (1 MiB at a time).
    const into = new Uint8Array(MiB)
    for (let at = 0; at < entry.size; at += MiB) {
      await fetcher.readRange(layer, entry, at, into)
    }
    // Before the windows, one read-ahead asked for all its 12 MiB at once (and held them until the last came).
    expect(most()).toBeLessThanOrEqual(4 * MiB + MiB)
    for (const c of entry.chunks) expect(await store.has(c.digest)).toBe(true)
    // Each chunk came from the source once: the reader joined what was being read ahead, or found it stored.
    expect(fetcher.metrics().sources.registry!.chunks).toBe(24)
  })
})

/**
 * `c`, reading every repository at `host` instead of its own registry: a source whose chunks' LayerRefs name
 * where the image was opened, made to read through a proxy in front of it.
 */
function through(c: RegistryClient, host: string): RegistryClient {
  return new Proxy(c, {
    get(target, key) {
      const value = Reflect.get(target, key) as unknown
      if (typeof value !== 'function') return value
      return (ref: string | { toString(): string }, ...rest: unknown[]) =>
        (value as (...args: unknown[]) => unknown).call(
          target,
          makeReference({ ...parseReference(String(ref)), registry: host }),
          ...rest
        )
    }
  })
}
