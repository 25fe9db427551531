import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createFetcher, createRegistrySource, openImage } from '@strata/fetcher'
import { createRegistryClient } from '@strata/registry'
import { createMemoryStore } from '@strata/store'
import { startFaultProxy } from '@test/fault-proxy.js'
import { buildTestImage, type TestImage } from '@test/images.js'
import { noiseTree } from '@test/noise.js'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { afterAll, beforeAll, expect, it } from 'vitest'
import { createNode } from '../src/index.js'
import { nodeMetrics } from '../src/metrics.js'
import { imageChunks, warmImage } from '../src/warm.js'

let work: string
let registry: TestRegistry
/** 1,200 small chunks: 19 batches of 64, more than the 8 a warm-up runs at once. */
let image: TestImage

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'strata-warm-failure-'))
  registry = await startRegistry()
  image = await buildTestImage({
    registry: registry.host,
    repository: 'warm/failure',
    estargz: true,
    gzipLevel: 1,
    layers: [{ files: await noiseTree(join(work, 'l0'), 1200, (i) => 1_000 + ((i * 7919) % 4_000), 3) }]
  })
})

afterAll(async () => {
  await registry?.stop()
  if (work !== undefined) await rm(work, { recursive: true, force: true })
})

it('a warm-up that fails stops its workers and gives up what they had in flight: the store stops growing', async () => {
  const proxy = await startFaultProxy(registry.host)
  try {
    const ref = image.ref.replace(registry.host, proxy.host)
    const client = createRegistryClient({ retries: 0 })
    const store = createMemoryStore()
    const opened = await openImage({ client, store, ref })
    const total = imageChunks(opened).length
    expect(total).toBeGreaterThan(16 * 64)
    // One Range request per chunk (no coalescing), and the 30th fails for good: the warm-up fails.
    const source = createRegistrySource({ client, maxRangeBytes: 1, maxGapBytes: 0 })
    const fetcher = createFetcher({ store, sources: [source] })
    proxy.faults.push({ kind: 'status', status: 404, path: /\/blobs\//, skip: 30, times: 1 })
    const err = await warmImage(fetcher, opened).catch((e: unknown) => e)
    expect(err).toMatchObject({ name: 'ChunkUnavailableError' })
    // (Requests sent just before the failure may reach the proxy a moment later.)
    await new Promise((r) => setTimeout(r, 100))
    const atFailure = { requests: proxy.requests.length, chunks: (await store.stats()).chunks }
    await new Promise((r) => setTimeout(r, 1000))
    const later = { requests: proxy.requests.length, chunks: (await store.stats()).chunks }
    // Nothing new was asked, and nothing more landed: the other workers stopped and their reads were cancelled.
    expect(later).toEqual(atFailure)
    expect(atFailure.chunks).toBeLessThan(total / 2)
  } finally {
    await proxy.stop()
  }
})

it('a warm-up through a Range response with a flipped byte succeeds: the chunk is read again, and counted', async () => {
  const proxy = await startFaultProxy(registry.host)
  const node = await createNode({
    store: createMemoryStore(),
    dataDir: join(work, 'node'),
    listen: ['/ip4/127.0.0.1/tcp/0'],
    registry: createRegistryClient({})
  })
  try {
    const ref = image.ref.replace(registry.host, proxy.host)
    await node.openImage(ref)
    // The manifest and TOC are read: the next blob read is a chunk range, and it arrives damaged.
    proxy.faults.push({ kind: 'corrupt', path: /\/blobs\//, times: 1 })
    const result = await node.warm(ref)
    expect(result).toMatchObject({ complete: true, chunks: result.totalChunks })
    expect(proxy.requests.filter((r) => r.fault === 'corrupt')).toHaveLength(1)
    const text = await nodeMetrics(node).metrics()
    expect(text).toMatch(/^strata_verification_failures_total\{source="registry"\} 1$/m)
  } finally {
    await node.stop()
    await proxy.stop()
  }
})
