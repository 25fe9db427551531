import { createHash } from 'node:crypto'
import { mkdtemp, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import type { Libp2p } from '@libp2p/interface'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import type { ChunkRef } from '@strata/fetcher'
import { createMemoryStore } from '@strata/store'
import { createLibp2p } from 'libp2p'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { encodeFrame, readFrames } from '../src/frames.js'
import { CHUNK_PROTOCOL, createNode, DEFAULT_LIMITS, type StrataNode } from '../src/index.js'
import { ChunkServer, requestChunks, requestHave } from '../src/protocol.js'

const sha = (b: Uint8Array) => `sha256:${createHash('sha256').update(b).digest('hex')}`
const LAYER = sha(new TextEncoder().encode('layer'))

function chunk(i: number, size = 1000 + i): { ref: ChunkRef; bytes: Uint8Array } {
  const bytes = new Uint8Array(size).fill(i & 0xff)
  bytes[0] = i >> 8
  return {
    ref: {
      digest: sha(bytes),
      fileOffset: 0,
      size,
      offset: 0,
      end: 10,
      innerOffset: 0,
      layer: { digest: LAYER, repository: 'localhost/test' },
      compression: 'gzip'
    },
    bytes
  }
}

async function* from(parts: Uint8Array[]) {
  for (const p of parts) yield p
}

async function collect(it: AsyncIterable<Uint8Array>) {
  const out: Uint8Array[] = []
  for await (const x of it) out.push(x)
  return out
}

describe('frames', () => {
  it('reassembles frames split anywhere across reads', async () => {
    const a = encodeFrame(new Uint8Array([1, 2, 3]))
    const b = encodeFrame(new Uint8Array(0))
    const c = encodeFrame(new Uint8Array(300).fill(7))
    const all = new Uint8Array([...a, ...b, ...c])
    const parts = [all.subarray(0, 2), all.subarray(2, 9), all.subarray(9, 10), all.subarray(10)]
    const frames = await collect(readFrames(from(parts), 1000))
    expect(frames.map((f) => f.byteLength)).toEqual([3, 0, 300])
    expect([...frames[0]!]).toEqual([1, 2, 3])
  })

  it('refuses a frame over the limit before buffering it, and a cut-off frame', async () => {
    const big = encodeFrame(new Uint8Array(2000))
    await expect(collect(readFrames(from([big.subarray(0, 8)]), 1000))).rejects.toThrow(/over the limit/)
    await expect(collect(readFrames(from([big.subarray(0, 100)]), 5000))).rejects.toMatchObject({
      name: 'ProtocolError'
    })
  })
})

describe('two nodes in one process', () => {
  const dirs: string[] = []
  let a: StrataNode
  let b: StrataNode
  const storeA = createMemoryStore()
  const storeB = createMemoryStore()
  const chunks = Array.from({ length: 40 }, (_, i) => chunk(i))
  let client: Libp2p

  beforeAll(async () => {
    for (let i = 0; i < 2; i++) dirs.push(await mkdtemp(join(tmpdir(), 'strata-node-')))
    const common = { listen: ['/ip4/127.0.0.1/tcp/0'] }
    a = await createNode({
      ...common,
      store: storeA,
      dataDir: dirs[0]!
    })
    for (const c of chunks) await storeA.put(c.ref.digest, c.bytes, { layer: LAYER })
    b = await createNode({
      ...common,
      store: storeB,
      dataDir: dirs[1]!,
      bootstrap: a.addrs()
    })
    client = await createLibp2p({
      transports: [tcp()],
      connectionEncrypters: [noise()],
      streamMuxers: [yamux()]
    })
    // B has joined once it has identified A as a strata node.
    while (!b.peers().some((p) => p.peer === a.peerId && p.strata)) await new Promise((r) => setTimeout(r, 20))
    await a.announced()
  })

  afterAll(async () => {
    await Promise.all([a?.stop(), b?.stop(), client?.stop()])
    for (const d of dirs) await rm(d, { recursive: true, force: true })
  })

  it('keeps its identity in the data dir, readable by its owner only', async () => {
    expect((await stat(join(dirs[0]!, 'peer.key'))).mode & 0o777).toBe(0o600)
    expect(a.peerId).not.toBe(b.peerId)
  })

  it('B finds A by the layer key and gets one chunk, then a batch, verified by its fetcher', async () => {
    const one = chunks[3]!
    const bytes = await b.fetcher.get(one.ref)
    expect(Buffer.from(bytes).equals(Buffer.from(one.bytes))).toBe(true)
    const many = await b.fetcher.getMany(chunks.map((c) => c.ref))
    expect(many.map((x) => sha(x))).toEqual(chunks.map((c) => c.ref.digest))
    const status = await b.status()
    expect(status.bytes.fetched.peer).toBe(chunks.reduce((n, c) => n + c.bytes.byteLength, 0))
    expect((await a.status()).bytes.served).toBeGreaterThanOrEqual(status.bytes.fetched.peer!)
    expect(await storeB.has(chunks[39]!.ref.digest)).toBe(true)
  })

  it('answers have-queries with what it holds', async () => {
    const stream = await client.dialProtocol(multiaddr(a.addrs()[0]!), CHUNK_PROTOCOL)
    const missing = chunk(999).ref.digest
    const have = await requestHave(stream, a.peerId, [chunks[0]!.ref.digest, missing, chunks[1]!.ref.digest])
    expect(have).toEqual([true, false, true])
  })

  it('refuses a request over the digest limit and a malformed one', async () => {
    const tooMany = Array.from({ length: DEFAULT_LIMITS.maxDigestsPerRequest + 1 }, () => chunks[0]!.ref.digest)
    const s1 = await client.dialProtocol(multiaddr(a.addrs()[0]!), CHUNK_PROTOCOL)
    await expect(collect(answers(requestChunks(s1, a.peerId, { op: 'get', digests: tooMany })))).rejects.toMatchObject({
      name: 'PeerRefusedError',
      reason: 'too-large'
    })
    const s2 = await client.dialProtocol(multiaddr(a.addrs()[0]!), CHUNK_PROTOCOL)
    await expect(
      collect(answers(requestChunks(s2, a.peerId, { op: 'get', digests: ['sha256:nothex'] })))
    ).rejects.toThrow(/sha256/)
  })

  it('marks chunks past the per-answer byte budget missing rather than sending them', async () => {
    // A server whose answers may carry 10,000 bytes: the 40 chunks of about 1 KB are more than that.
    const server = await createLibp2p({
      addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
      transports: [tcp()],
      connectionEncrypters: [noise()],
      streamMuxers: [yamux()]
    })
    const chunkServer = new ChunkServer({ store: storeA }, { ...DEFAULT_LIMITS, maxResponseBytes: 10_000 })
    await server.handle(CHUNK_PROTOCOL, (stream, connection) =>
      chunkServer.handle(stream, connection.remotePeer.toString())
    )
    try {
      const s = await client.dialProtocol(server.getMultiaddrs()[0]!, CHUNK_PROTOCOL)
      const got = []
      for await (const x of requestChunks(s, 'server', { op: 'get', digests: chunks.map((c) => c.ref.digest) })) {
        got.push(x)
      }
      const sent = got.filter((x) => x.bytes !== undefined)
      const bytes = sent.reduce((n, x) => n + x.bytes!.byteLength, 0)
      expect(bytes).toBeLessThanOrEqual(10_000)
      expect(bytes).toBeGreaterThan(10_000 - 1100)
      expect(sent.length).toBeLessThan(chunks.length)
      // Every chunk is answered once: the rest as missing.
      expect(new Set(got.map((x) => x.index)).size).toBe(chunks.length)
    } finally {
      await server.stop()
    }
  })

  it('a peer that serves corrupt bytes is reported by the fetcher and banned', async () => {
    const good = chunk(500)
    await storeA.put(good.ref.digest, new Uint8Array(good.bytes.byteLength).fill(9), { layer: LAYER })
    await expect(b.fetcher.get(good.ref)).rejects.toMatchObject({ name: 'ChunkUnavailableError' })
    const peerA = b.peers().find((p) => p.peer === a.peerId)
    expect(peerA?.bad).toBe(1)
    expect(peerA?.bannedUntil).toBeGreaterThan(Date.now())
    expect(await storeB.has(good.ref.digest)).toBe(false)
  })
})

async function* answers(it: AsyncIterable<{ bytes: Uint8Array | undefined }>) {
  for await (const x of it) if (x.bytes !== undefined) yield x.bytes
}

describe('a holder the DHT has not heard of', () => {
  const dirs: string[] = []
  let holder: StrataNode
  let reader: StrataNode
  const storeH = createMemoryStore()
  const storeR = createMemoryStore()
  // Each in a segment of its own: their homes (rendezvous over both nodes) are the reader for about half.
  const chunks = Array.from({ length: 64 }, (_, i) => {
    const c = chunk(2000 + i)
    return { ...c, ref: { ...c.ref, offset: i << 20, end: (i << 20) + 10 } }
  })

  beforeAll(async () => {
    for (let i = 0; i < 2; i++) dirs.push(await mkdtemp(join(tmpdir(), 'strata-node-')))
    const common = { listen: ['/ip4/127.0.0.1/tcp/0'] }
    // No announcement slots: the holder's keys never reach the DHT (as right after a warm-up, before they spread).
    holder = await createNode({ ...common, store: storeH, dataDir: dirs[0]!, announce: { concurrency: 0 } })
    for (const c of chunks) await storeH.put(c.ref.digest, c.bytes, { layer: LAYER })
    reader = await createNode({ ...common, store: storeR, dataDir: dirs[1]!, bootstrap: holder.addrs() })
    while (!reader.peers().some((p) => p.peer === holder.peerId && p.strata))
      await new Promise((r) => setTimeout(r, 20))
  })

  afterAll(async () => {
    await Promise.all([holder?.stop(), reader?.stop()])
    for (const d of dirs) await rm(d, { recursive: true, force: true })
  })

  it('is found among the connected peers: every chunk, one by one and in a batch, comes from it', async () => {
    expect((await holder.status()).announce.landed).toBe(0)
    const one = await reader.fetcher.get(chunks[0]!.ref)
    expect(sha(one)).toBe(chunks[0]!.ref.digest)
    // Without a registry the reader has no other source: a chunk not found on the holder fails the batch.
    const many = await reader.fetcher.getMany(chunks.map((c) => c.ref))
    expect(many.map((x) => sha(x))).toEqual(chunks.map((c) => c.ref.digest))
    const status = await reader.status()
    expect(status.bytes.fetched.peer).toBe(chunks.reduce((n, c) => n + c.bytes.byteLength, 0))
    expect(status.bytes.fetchedForPeers).toEqual({ peer: 0, registry: 0 })
  })
})
