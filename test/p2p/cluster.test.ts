import { createHash } from 'node:crypto'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createNode, type NodeStatus, type PeerStatus, type StrataNode } from '@strata/node'
import { createMemoryStore } from '@strata/store'
import { buildCli, type Cluster, startCluster, startP2pd, waitForMesh } from '@test/cluster.js'
import { type CountingProxy, startCountingProxy } from '@test/counting-proxy.js'
import { buildTestImage, type TestImage } from '@test/images.js'
import { noise, noiseTree } from '@test/noise.js'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

/** The compressed offset where a layer's TOC starts, from the eStargz footer (`%016x` + `STARGZ`). */
function tocOffset(blob: Buffer): number {
  const footer = blob.subarray(blob.byteLength - 51).toString('latin1')
  const at = footer.indexOf('STARGZ')
  return Number.parseInt(footer.slice(at - 16, at), 16)
}

let registry: TestRegistry
let proxy: CountingProxy
let image: TestImage
let ref: string
let work: string
/** Chunk payload (what precedes the TOC) per layer digest. */
const payloadEnd = new Map<string, number>()
let imageBytes = 0
let totalChunks = 0

/**
 * Registry bytes of chunk reads since request #from: ranges that end before the layer's TOC. (Opening an image
 * reads the blob's tail, footer and TOC, and a little payload before them: that is not a chunk read.)
 */
function payloadBytes(from: number): number {
  return proxy.requests
    .slice(from)
    .filter((r) => r.method === 'GET' && r.path.includes('/blobs/'))
    .filter((r) => {
      const digest = /\/blobs\/(sha256:[0-9a-f]{64})/.exec(r.path)?.[1] ?? ''
      const end = payloadEnd.get(digest)
      return end !== undefined && (r.rangeEnd === undefined || r.rangeEnd < end)
    })
    .reduce((n, r) => n + r.bytes, 0)
}

const blobBytesSince = (from: number) => proxy.blobBytes() - blobBytes(proxy.requests.slice(0, from))
function blobBytes(list: CountingProxy['requests']): number {
  return list.filter((r) => r.method === 'GET' && r.path.includes('/blobs/')).reduce((n, r) => n + r.bytes, 0)
}

const status = (c: Cluster, i: number) => c.nodes[i]!.client.get<NodeStatus>('/status')

async function warm(c: Cluster, i: number, image = ref) {
  const r = await c.nodes[i]!.p2pctl(['warm', image, '--json'])
  if (r.code !== 0) throw new Error(`p2pctl warm on node ${i} failed (${r.code}): ${r.stderr}`)
  return JSON.parse(r.stdout) as { totalChunks: number; totalBytes: number }
}

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'strata-p2p-'))
  const [reg] = await Promise.all([startRegistry(), buildCli()])
  registry = reg
  image = await buildTestImage({
    registry: registry.host,
    estargz: true,
    gzipLevel: 1,
    // Large enough that the fixed cost of opening the image on each node (a 512 KiB read of the blob's tail for
    // its TOC) stays small next to the chunks.
    layers: [{ files: await noiseTree(join(work, 'l0'), 350, (i) => 2_000 + ((i * 7919) % 120_000), 1) }]
  })
  proxy = await startCountingProxy(registry.host)
  ref = image.ref.replace(registry.host, proxy.host)
  for (const layer of image.layers) {
    const res = await fetch(`http://${registry.host}/v2/test/image/blobs/${layer.digest}`)
    const blob = Buffer.from(await res.arrayBuffer())
    payloadEnd.set(layer.digest, tocOffset(blob))
    imageBytes += blob.byteLength
    totalChunks += layer.files.size
  }
}, 180_000)

afterAll(async () => {
  await proxy?.stop()
  await registry?.stop()
  await rm(work, { recursive: true, force: true })
})

describe('p2pd cluster on loopback', () => {
  it('node A warms from the registry; B..E then read every chunk from peers, no payload from the registry', async () => {
    const c = await startCluster(5, { insecureRegistry: [proxy.host] })
    try {
      await waitForMesh(c.nodes, 1)
      const before = proxy.requests.length
      const a = await warm(c, 0)
      expect(a.totalChunks).toBeGreaterThanOrEqual(totalChunks)
      expect(payloadBytes(before)).toBeGreaterThan(0)
      // Coarse keys (layer, TOC) are announced on the critical path; give them a moment to land.
      await expect.poll(async () => (await status(c, 0)).announce.landed, { timeout: 10_000 }).toBeGreaterThanOrEqual(2)
      // (A's warm-up asked each chunk's home node to fetch it: the cluster, not A alone, went to the registry.)
      const mark = proxy.requests.length
      await Promise.all([1, 2, 3, 4].map((i) => warm(c, i)))
      expect(payloadBytes(mark)).toBe(0)
      for (const i of [1, 2, 3, 4]) expect((await status(c, i)).store.chunks).toBe(a.totalChunks)
      expect((await status(c, 0)).bytes.served).toBeGreaterThan(0)
    } finally {
      await c.stop()
    }
  })

  it('p2pctl warm with the registry unreachable warms what the reference named before, saying so', async () => {
    const door = await startCountingProxy(registry.host)
    const c = await startCluster(1, { insecureRegistry: [door.host] })
    try {
      const doorRef = image.ref.replace(registry.host, door.host)
      expect((await warm(c, 0, doorRef)).totalChunks).toBeGreaterThanOrEqual(totalChunks)
      await door.stop()
      const said =
        /the registry cannot be reached \(.+\): using sha256:[0-9a-f]{64}, what .+ named when it was last opened here/
      const r = await c.nodes[0]!.p2pctl(['warm', doorRef])
      expect(r.code).toBe(0)
      expect(r.stderr).toMatch(new RegExp(`warning: ${said.source}`))
      const json = JSON.parse((await c.nodes[0]!.p2pctl(['warm', doorRef, '--json'])).stdout) as { stale?: string }
      expect(json.stale).toMatch(said)
    } finally {
      await c.stop()
      await door.stop().catch(() => {})
    }
  })

  it('a node that just warmed serves a fresh reader at once: B reads right after joining, nothing from the registry', async () => {
    // A warms with C connected (C is home of part of the image and fetches that part for A); B joins afterwards
    // and reads at once: A's announcements have not spread, and B is the home of chunks only A and C hold.
    const c = await startCluster(2, { insecureRegistry: [proxy.host] })
    const dir = await mkdtemp(join(tmpdir(), 'strata-p2pd-reader-'))
    try {
      await waitForMesh(c.nodes, 1)
      const total = await warm(c, 0)
      c.nodes.push(await startP2pd({ dataDir: dir, bootstrap: c.nodes[0]!.addrs, insecureRegistry: [proxy.host] }))
      await waitForMesh(c.nodes, 2)
      const mark = proxy.requests.length
      await warm(c, 2)
      expect(payloadBytes(mark)).toBe(0)
      const reader = await status(c, 2)
      expect(reader.store.chunks).toBe(total.totalChunks)
      expect(reader.bytes.fetched.registry).toBe(0)
      expect(reader.bytes.fetched.peer).toBe(total.totalBytes)
      // C went to the registry for A only: its own reads are none, its fetches for peers are what it served A.
      const home = await status(c, 1)
      expect(home.bytes.fetched.registry).toBe(0)
      expect(home.bytes.fetchedForPeers.registry).toBeGreaterThan(0)
      expect(home.bytes.served).toBeGreaterThanOrEqual(home.bytes.fetchedForPeers.registry!)
    } finally {
      await c.stop()
      await rm(dir, { recursive: true, force: true })
    }
  })

  it('five cold nodes read the same image at once: registry egress <= 1.3x the bytes read', async () => {
    const c = await startCluster(5, { insecureRegistry: [proxy.host] })
    try {
      await waitForMesh(c.nodes, 4)
      const mark = proxy.requests.length
      const results = await Promise.all(c.nodes.map((_, i) => warm(c, i)))
      const egress = blobBytesSince(mark)
      expect(egress).toBeLessThanOrEqual(1.3 * imageBytes)
      for (const [i] of c.nodes.entries()) expect((await status(c, i)).store.chunks).toBe(results[0]!.totalChunks)
    } finally {
      await c.stop()
    }
  })

  it('p2pctl warm --cluster on 5 nodes: every node holds the image, registry egress <= 1.2x its size', async () => {
    const c = await startCluster(5, { insecureRegistry: [proxy.host] })
    try {
      await waitForMesh(c.nodes, 4)
      const mark = proxy.requests.length
      const r = await c.nodes[2]!.p2pctl(['warm', ref, '--cluster', '--json'])
      expect(r.code, r.stderr).toBe(0)
      const result = JSON.parse(r.stdout) as { nodes: Record<string, { ok: boolean }> }
      expect(Object.values(result.nodes).filter((n) => n.ok)).toHaveLength(5)
      expect(blobBytesSince(mark)).toBeLessThanOrEqual(1.2 * imageBytes)
      const chunks = await Promise.all(c.nodes.map(async (_, i) => (await status(c, i)).store.chunks))
      expect(new Set(chunks).size).toBe(1)
      expect(chunks[0]).toBeGreaterThanOrEqual(totalChunks)
    } finally {
      await c.stop()
    }
  })

  it('a hostile peer serving corrupted chunks: every read is still correct and the peer is banned', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'strata-hostile-'))
    const store = createMemoryStore()
    let hostile: StrataNode | undefined
    const c = await startCluster(1, { insecureRegistry: [proxy.host] })
    try {
      // A real node whose store holds wrong bytes under the image's chunk digests: it announces and serves them.
      // (Each test file is smaller than a chunk, so a file's digest is its chunk's digest.)
      hostile = await createNode({
        store,
        dataDir: dir,
        listen: ['/ip4/127.0.0.1/tcp/0'],
        bootstrap: c.nodes[0]!.addrs
      })
      const layer = image.layers[0]!
      for (const [path, hex] of layer.files) {
        const size = layer.sizes.get(path)!
        if (size > 0) await store.put(`sha256:${hex}`, noise(size, 7), { layer: layer.digest })
      }
      await waitForMesh(c.nodes, 1)
      await hostile.announced()
      const r = await warm(c, 0)
      const s = await status(c, 0)
      // Every chunk in the store passed the fetcher's digest check; the bad ones were fetched again elsewhere.
      expect(s.store.chunks).toBe(r.totalChunks)
      const peers = await c.nodes[0]!.client.get<PeerStatus[]>('/peers')
      const seen = peers.find((p) => p.peer === hostile!.peerId)
      expect(seen?.bad).toBeGreaterThanOrEqual(1)
      expect(seen?.bannedUntil).toBeGreaterThan(Date.now())
    } finally {
      await hostile?.stop()
      await store.close()
      await c.stop()
      await rm(dir, { recursive: true, force: true })
    }
  })

  it('a peer killed mid-transfer: the read completes from the registry', async () => {
    // Many small chunks, many more than a warm-up has in flight at once: the kill after the first batch leaves
    // most of them to come from the registry.
    const many = await buildTestImage({
      registry: registry.host,
      repository: 'test/many',
      estargz: true,
      gzipLevel: 1,
      layers: [{ files: await noiseTree(join(work, 'many'), 1500, () => 1_000, 2) }]
    })
    const manyRef = many.ref.replace(registry.host, proxy.host)
    const c = await startCluster(1, { insecureRegistry: [proxy.host] })
    const dir = await mkdtemp(join(tmpdir(), 'strata-p2pd-b-'))
    try {
      const a = c.nodes[0]!
      const total = await warm(c, 0, manyRef)
      const b = await startP2pd({ dataDir: dir, bootstrap: a.addrs, insecureRegistry: [proxy.host] })
      c.nodes.push(b)
      await waitForMesh([a, b], 1)
      let killed: Promise<number | null> | undefined
      const result = await b.client.stream<{ totalChunks: number }>('/warm', { image: manyRef }, (event) => {
        const e = event as { type: string; chunks?: number }
        if (e.type === 'progress' && (e.chunks ?? 0) > 0) killed ??= a.stop('SIGKILL')
      })
      await killed
      expect(result.totalChunks).toBe(total.totalChunks)
      const s = await status(c, 1)
      expect(s.store.chunks).toBe(total.totalChunks)
      expect(s.bytes.fetched.peer).toBeGreaterThan(0)
      expect(s.bytes.fetched.registry).toBeGreaterThan(0)
    } finally {
      await c.stop()
      await rm(dir, { recursive: true, force: true })
    }
  })

  it('with a pre-shared key, a node without it cannot connect or fetch', async () => {
    const keyDir = await mkdtemp(join(tmpdir(), 'strata-psk-'))
    const key = join(keyDir, 'swarm.key')
    await writeFile(key, `/key/swarm/psk/1.0.0/\n/base16/\n${createHash('sha256').update('cluster').digest('hex')}\n`)
    const c = await startCluster(2, { insecureRegistry: [proxy.host], pskFile: () => key })
    const outsiderDir = await mkdtemp(join(tmpdir(), 'strata-outsider-'))
    try {
      await waitForMesh(c.nodes, 1)
      await warm(c, 0)
      const outsider = await startP2pd({
        dataDir: outsiderDir,
        bootstrap: c.nodes[0]!.addrs,
        insecureRegistry: [proxy.host]
      })
      c.nodes.push(outsider)
      const mark = proxy.requests.length
      const r = await warm(c, 2)
      const s = await status(c, 2)
      expect(s.peers).toBe(0)
      expect(s.bytes.fetched.peer ?? 0).toBe(0)
      expect(payloadBytes(mark)).toBeGreaterThan(0)
      expect(s.store.chunks).toBe(r.totalChunks)
      const members = await c.nodes[0]!.client.get<PeerStatus[]>('/peers')
      expect(members.map((p) => p.peer)).not.toContain(outsider.peerId)
    } finally {
      await c.stop()
      await rm(outsiderDir, { recursive: true, force: true })
      await rm(keyDir, { recursive: true, force: true })
    }
  })

  it('p2pd restarted: store and identity intact, chunks served again, announcements restored', async () => {
    const c = await startCluster(1, { insecureRegistry: [proxy.host] })
    const dir = await mkdtemp(join(tmpdir(), 'strata-p2pd-c-'))
    try {
      const first = c.nodes[0]!
      const total = await warm(c, 0)
      expect(await first.stop('SIGTERM')).toBe(0)
      const again = await startP2pd({ dataDir: first.dataDir, insecureRegistry: [proxy.host] })
      c.nodes[0] = again
      expect(again.peerId).toBe(first.peerId)
      expect((await status(c, 0)).store.chunks).toBe(total.totalChunks)
      const images = await again.client.get<Array<{ ref: string }>>('/images')
      expect(images.map((i) => i.ref)).toContain(ref)
      const fresh = await startP2pd({ dataDir: dir, bootstrap: again.addrs, insecureRegistry: [proxy.host] })
      c.nodes.push(fresh)
      await waitForMesh(c.nodes, 1)
      await expect.poll(async () => (await status(c, 0)).announce.landed, { timeout: 15_000 }).toBeGreaterThan(0)
      const mark = proxy.requests.length
      await warm(c, 1)
      expect(payloadBytes(mark)).toBe(0)
      expect((await status(c, 0)).bytes.served).toBe(total.totalBytes)
    } finally {
      await c.stop()
      await rm(dir, { recursive: true, force: true })
    }
  })
})
