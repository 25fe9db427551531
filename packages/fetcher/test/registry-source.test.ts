import { createHash } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createRegistryClient, type RegistryClient } from '@strata/registry'
import { createMemoryStore } from '@strata/store'
import { type FaultProxy, startFaultProxy } from '@test/fault-proxy.js'
import { buildTestImage, makeTestTree, type TestImage } from '@test/images.js'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { type ChunkRef, chunkRef, createFetcher, createRegistrySource, type Image, openImage } from '../src/index.js'

// The registry source against a real registry behind a fault proxy: one source for every image, its coalescing
// (strata's one range coalescer) and the "Range ignored" quirk on the production read path.

const hex = (b: Uint8Array) => createHash('sha256').update(b).digest('hex')

let registry: TestRegistry
let work: string
let image: TestImage
let proxy: FaultProxy

beforeAll(async () => {
  registry = await startRegistry()
  work = await mkdtemp(join(tmpdir(), 'strata-registry-source-'))
  const files = await makeTestTree(join(work, 'a'), { seed: 3 })
  image = await buildTestImage({
    registry: registry.host,
    repository: 'test/source',
    layers: [{ files }],
    estargz: true
  })
})

afterAll(async () => {
  await registry?.stop()
  if (work !== undefined) await rm(work, { recursive: true, force: true })
})

beforeEach(async () => {
  proxy = await startFaultProxy(registry.host)
})

afterEach(async () => {
  await proxy.stop()
})

const viaProxy = () => image.ref.replace(registry.host, proxy.host)
/** GETs of the layer blob the proxy saw since `from`. */
const blobGets = (from: number, layer: string) =>
  proxy.requests.slice(from).filter((r) => r.method === 'GET' && r.path.includes(`/blobs/${layer}`))

/** Every chunk of every regular file of the image's only layer, and what each file must hash to. */
function chunksOf(opened: Image): ChunkRef[] {
  const layer = opened.layers[0]!
  return [...layer.toc.entries.values()].flatMap((e) => e.chunks.map((c) => chunkRef(layer, c)))
}

async function readAllFiles(fetcher: ReturnType<typeof createFetcher>, opened: Image): Promise<void> {
  const layer = opened.layers[0]!
  const files = [...layer.toc.entries.values()].filter((e) => e.type === 'reg' && e.size > 0)
  await Promise.all(
    files.map(async (entry) => {
      const into = new Uint8Array(entry.size)
      expect(await fetcher.readRange(layer, entry, 0, into)).toBe(entry.size)
      expect(hex(into), entry.path).toBe(image.layers[0]!.files.get(entry.path))
    })
  )
}

describe('the registry source', () => {
  it('reads neighbouring chunks with one Range request, and far ones apart', async () => {
    const client = createRegistryClient({ dockerConfig: false })
    const opened = await openImage({ client, store: createMemoryStore(), ref: viaProxy() })
    const layer = opened.layers[0]!
    const small = ['etc/conf1.txt', 'etc/conf2.txt', 'etc/conf3.txt'].map((p) => layer.toc.lookup(p)!)
    const tool = layer.toc.lookup('usr/bin/tool')!
    const refs = [...small.flatMap((e) => e.chunks), tool.chunks.at(-1)!].map((c) => chunkRef(layer, c))
    const before = proxy.requests.length
    const source = createRegistrySource({ client })
    const got = new Map<string, Uint8Array>()
    for await (const { chunk, bytes } of source.getMany!(refs)) got.set(chunk.digest, bytes)
    for (const r of refs) expect(hex(got.get(r.digest)!)).toBe(r.digest.slice('sha256:'.length))
    // The three small files lie side by side: one request; the tool's last chunk is megabytes away: another.
    expect(blobGets(before, layer.digest)).toHaveLength(2)
  })

  it('bounds a coalesced request by maxRangeBytes', async () => {
    const client = createRegistryClient({ dockerConfig: false })
    const opened = await openImage({ client, store: createMemoryStore(), ref: viaProxy() })
    const layer = opened.layers[0]!
    const refs = ['etc/conf1.txt', 'etc/conf2.txt', 'etc/conf3.txt'].map((p) =>
      chunkRef(layer, layer.toc.lookup(p)!.chunks[0]!)
    )
    const before = proxy.requests.length
    const source = createRegistrySource({ client, maxRangeBytes: 1 })
    for await (const _ of source.getMany!(refs)) {
      // each chunk is read by a request of its own
    }
    expect(blobGets(before, layer.digest)).toHaveLength(3)
  })

  it('serves every image from the repository each chunk names, and nothing it may not read', async () => {
    const client = createRegistryClient({ dockerConfig: false })
    const opened = await openImage({ client, store: createMemoryStore(), ref: viaProxy() })
    const chunk = chunkRef(opened.layers[0]!, opened.layers[0]!.toc.lookup('etc/conf4.txt')!.chunks[0]!)
    const asked: string[] = []
    const clientFor = (host: string): RegistryClient | undefined => {
      asked.push(host)
      return host === proxy.host ? client : undefined
    }
    const source = createRegistrySource({ clientFor, mayRead: (layer) => !layer.repository.includes('refused') })
    expect(hex((await source.get(chunk))!)).toBe(chunk.digest.slice('sha256:'.length))
    // Another registry (no client for it), a refused repository, a repository that is not one: not this source's.
    const elsewhere = { ...chunk, layer: { ...chunk.layer, repository: 'elsewhere.test/app' } }
    const refused = { ...chunk, layer: { ...chunk.layer, repository: `${proxy.host}/refused` } }
    const malformed = { ...chunk, layer: { ...chunk.layer, repository: 'not a repository' } }
    const before = proxy.requests.length
    expect(await source.get(elsewhere)).toBeUndefined()
    expect(await source.get(refused)).toBeUndefined()
    expect(await source.get(malformed)).toBeUndefined()
    expect(asked).toEqual([proxy.host, 'elsewhere.test'])
    expect(proxy.requests.length).toBe(before)
  })

  it('against a registry that ignores Range, reads a whole layer of files with ONE full blob request', async () => {
    proxy.faults.push({ kind: 'ignoreRange', path: /\/blobs\//, times: Number.POSITIVE_INFINITY })
    const client = createRegistryClient({ dockerConfig: false })
    const store = createMemoryStore()
    // Opening reads the footer and TOC: the 200 it gets teaches the client that this registry ignores Range.
    const opened = await openImage({ client, store, ref: viaProxy() })
    const layer = opened.layers[0]!
    const refs = chunksOf(opened)
    expect(refs.length).toBeGreaterThan(10)
    const before = proxy.requests.length
    // Small ranges that would otherwise be many runs (each chunk a run of its own): one whole read serves all.
    const fetcher = createFetcher({
      store,
      sources: [createRegistrySource({ client, maxRangeBytes: 1, maxGapBytes: 0 })]
    })
    const bytes = await fetcher.getMany(refs)
    refs.forEach((r, i) => {
      expect(hex(bytes[i]!)).toBe(r.digest.slice('sha256:'.length))
    })
    const gets = blobGets(before, layer.digest)
    expect(gets).toHaveLength(1)
    expect(gets[0]!.fault).toBe('ignoreRange')
    // And the files read through the fetcher (all chunks stored now) are whole and right.
    await readAllFiles(fetcher, opened)
    expect(blobGets(before, layer.digest)).toHaveLength(1)
  })

  it('against a registry that ignores Range, a mount-like read of every file at once shares one whole read, not one per run', async () => {
    proxy.faults.push({ kind: 'ignoreRange', path: /\/blobs\//, times: Number.POSITIVE_INFINITY })
    const client = createRegistryClient({ dockerConfig: false })
    const store = createMemoryStore()
    const opened = await openImage({ client, store, ref: viaProxy() })
    const layer = opened.layers[0]!
    const before = proxy.requests.length
    const fetcher = createFetcher({
      store,
      sources: [createRegistrySource({ client, maxRangeBytes: 1, maxGapBytes: 0 })],
      readAheadBytes: 0
    })
    await readAllFiles(fetcher, opened)
    const runs = chunksOf(opened).length
    // Each chunk is a run of its own here (maxRangeBytes 1): without the quirk handled, that many whole reads.
    // The files' reads reach the source one after another: those the stream has not passed join it (one
    // request here, as a rule); one it has passed waits for it and goes in the next whole read.
    expect(blobGets(before, layer.digest).length).toBeLessThanOrEqual(2)
    expect(runs).toBeGreaterThan(10)
  })
})
