import { createHash } from 'node:crypto'
import { mkdtemp, readdir, readFile, rm, stat } from 'node:fs/promises'
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import type { Libp2p, Stream } from '@libp2p/interface'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { buildCli, type P2pdProcess, startP2pd } from '@test/cluster.js'
import { buildTestImage, type TestImage } from '@test/images.js'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { run } from '@test/tools.js'
import { createLibp2p } from 'libp2p'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { encodeFrame, readFrames } from '../src/frames.js'
import { CHUNK_PROTOCOL, WARM_PROTOCOL } from '../src/index.js'

// A hostile peer, written from the project's own libp2p dependencies, against a real p2pd process: it speaks
// the warm and chunk protocols with no PSK and names what it likes.

let work: string
let registry: TestRegistry
let image: TestImage
let p2pd: P2pdProcess
const hostile: Libp2p[] = []

/** An HTTP server that records every request: a host p2pd was never configured for. */
interface Trap {
  host: string
  requests: Array<{ url: string; headers: IncomingHttpHeaders }>
  server: Server
}
let trap: Trap

async function startTrap(): Promise<Trap> {
  const requests: Trap['requests'] = []
  // It asks for Basic credentials: a client that has some for every host would send them here.
  const server = createServer((req, res) => {
    requests.push({ url: req.url ?? '', headers: req.headers })
    res.writeHead(401, { 'www-authenticate': 'Basic realm="trap"', 'content-type': 'application/json' })
    res.end('{"errors":[{"code":"UNAUTHORIZED"}]}')
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  return { host: `127.0.0.1:${(server.address() as AddressInfo).port}`, requests, server }
}

async function newPeer(): Promise<Libp2p> {
  const node = await createLibp2p({
    addresses: { listen: [] },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()]
  })
  hostile.push(node)
  return node
}

async function open(peer: Libp2p, protocol: string): Promise<Stream> {
  // libp2p takes at most 5 new inbound connections a second from one address, and closes the rest at once.
  for (let attempt = 1; ; attempt++) {
    try {
      return await peer.dialProtocol(multiaddr(p2pd.addrs[0]!), protocol, { signal: AbortSignal.timeout(10_000) })
    } catch (err) {
      if (attempt >= 5 || peer.getConnections().length > 0) throw err
      await new Promise((r) => setTimeout(r, 400))
    }
  }
}

async function ask(peer: Libp2p, protocol: string, request: unknown): Promise<Uint8Array[]> {
  const stream = await open(peer, protocol)
  stream.send(encodeFrame(new TextEncoder().encode(JSON.stringify(request))))
  await stream.close()
  const frames: Uint8Array[] = []
  for await (const f of readFrames(stream, 64 << 20)) frames.push(f)
  return frames
}

const text = (b: Uint8Array) => new TextDecoder().decode(b)

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'strata-hostile-'))
  await buildCli()
  registry = await startRegistry()
  trap = await startTrap()
  // A 24 MiB file of random bytes: six 4 MiB chunks, what the stalled-stream attack asks for.
  const files = join(work, 'files')
  await run('mkdir', ['-p', join(files, 'data')])
  await run('dd', ['if=/dev/urandom', `of=${join(files, 'data', 'blob')}`, 'bs=1M', 'count=24', 'status=none'])
  image = await buildTestImage({
    registry: registry.host,
    repository: 'hostile/big',
    estargz: true,
    layers: [{ files }]
  })
  p2pd = await startP2pd({
    dataDir: join(work, 'p2pd'),
    // Credentials for the one registry it uses; the trap must never see them.
    args: ['--registry', registry.host, '--creds', `${registry.host}=alice:secret`]
  })
})

afterAll(async () => {
  for (const h of hostile) await h.stop()
  await p2pd?.stop()
  await new Promise((resolve) => trap?.server.close(resolve))
  await registry?.stop()
  await rm(work, { recursive: true, force: true })
})

describe('a peer asking a node to read from a host it names', () => {
  it('is refused a warm-up: no request reaches the host, and no credentials', async () => {
    const peer = await newPeer()
    const frames = await ask(peer, WARM_PROTOCOL, { image: `${trap.host}/x:y`, members: [] })
    const last = JSON.parse(text(frames.at(-1)!)) as { type: string; message: string }
    expect(last.type).toBe('error')
    expect(last.message).toMatch(/refusing to warm .* for a peer/)
    expect(trap.requests).toEqual([])
  })

  it('is refused a home fetch too, also after the warm-up it asked for', async () => {
    const peer = await newPeer()
    const chunk = {
      digest: `sha256:${'1'.repeat(64)}`,
      layer: `sha256:${'2'.repeat(64)}`,
      compression: 'gzip',
      fileOffset: 0,
      size: 10,
      offset: 0,
      end: 10,
      innerOffset: 0
    }
    const frames = await ask(peer, CHUNK_PROTOCOL, { op: 'fetch', chunks: [chunk], ref: `${trap.host}/x:y` })
    expect(frames.map((f) => f[0])).toEqual([0x02]) // MISSING
    expect(trap.requests).toEqual([])
  })

  it('is refused a home fetch whose chunk names the host as its repository, beside a ref the node may use', async () => {
    const peer = await newPeer()
    const chunk = {
      digest: `sha256:${'3'.repeat(64)}`,
      layer: `sha256:${'4'.repeat(64)}`,
      repository: `${trap.host}/x`,
      compression: 'gzip',
      fileOffset: 0,
      size: 10,
      offset: 0,
      end: 10,
      innerOffset: 0
    }
    const frames = await ask(peer, CHUNK_PROTOCOL, { op: 'fetch', chunks: [chunk], ref: image.ref })
    expect(frames.map((f) => f[0])).toEqual([0x02]) // MISSING
    expect(trap.requests).toEqual([])
  })

  it('is answered bad-request for a chunk whose repository is not a repository name', async () => {
    const peer = await newPeer()
    const chunk = {
      digest: `sha256:${'3'.repeat(64)}`,
      layer: `sha256:${'4'.repeat(64)}`,
      repository: `${trap.host}/x:tag`,
      compression: 'gzip',
      fileOffset: 0,
      size: 10,
      offset: 0,
      end: 10,
      innerOffset: 0
    }
    const frames = await ask(peer, CHUNK_PROTOCOL, { op: 'fetch', chunks: [chunk] })
    expect(frames).toHaveLength(1)
    expect(frames[0]![0]).toBe(0x04) // ERROR
    expect(JSON.parse(text(frames[0]!.subarray(1)))).toMatchObject({ reason: 'bad-request' })
    expect(trap.requests).toEqual([])
  })

  it('still gets a warm-up of an image from a registry the node is configured for', async () => {
    const peer = await newPeer()
    const frames = await ask(peer, WARM_PROTOCOL, { image: image.ref, members: [] })
    const last = JSON.parse(text(frames.at(-1)!)) as { type: string; result?: { totalChunks: number } }
    expect(last.type).toBe('done')
    expect(last.result!.totalChunks).toBeGreaterThan(5)
  })
})

describe('credentials', () => {
  it('go to their own registry only, not to a host a local caller opens', async () => {
    const r = await p2pd.p2pctl(['warm', `${trap.host}/x:y`])
    expect(r.code).toBe(1)
    expect(trap.requests.length).toBeGreaterThan(0)
    expect(trap.requests.map((q) => q.headers.authorization)).toEqual(trap.requests.map(() => undefined))
  })

  it('must name their registry in p2pd: a bare USER:PASS is refused', async () => {
    await expect(startP2pd({ dataDir: join(work, 'bare'), args: ['--creds', 'alice:secret'] })).rejects.toThrow(
      /--creds needs the registry it is for: --creds HOST=USER:PASS/
    )
  })
})

/** The resident set of a process, in bytes. */
async function rss(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8')
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)![1]) * 1024
}

describe('answers nobody reads', () => {
  it('hold at most the queued-bytes bound, however many identities and streams ask', async () => {
    // The chunks the node holds after the warm-up above: the 4 MiB ones of the random file.
    const chunks: string[] = []
    const root = join(p2pd.dataDir, 'store', 'chunks')
    for (const dir of await readdir(root)) {
      for (const name of await readdir(join(root, dir))) {
        if ((await stat(join(root, dir, name))).size === 4 << 20) chunks.push(`sha256:${name}`)
      }
    }
    expect(chunks.length).toBe(6)
    const before = await rss(p2pd.proc.pid!)
    const streams: Stream[] = []
    for (let i = 0; i < 5; i++) {
      const peer = await newPeer()
      for (let j = 0; j < 20; j++) {
        const stream = await open(peer, CHUNK_PROTOCOL)
        stream.pause() // no reading, so no window updates: the server's sends stall
        stream.send(encodeFrame(new TextEncoder().encode(JSON.stringify({ op: 'get', digests: chunks }))))
        await stream.close()
        streams.push(stream) // and never read
      }
    }
    let peak = before
    let queued = 0
    for (let t = 0; t < 20; t++) {
      await new Promise((r) => setTimeout(r, 250))
      peak = Math.max(peak, await rss(p2pd.proc.pid!))
      queued = Math.max(
        queued,
        (await p2pd.client.get<{ requests: { queuedBytes: number } }>('/status')).requests.queuedBytes
      )
    }
    console.log(`queued answer bytes at most ${queued}`)
    expect(queued).toBeLessThanOrEqual(64 << 20)
    const grown = peak - before
    console.log(
      `p2pd RSS ${(before / 2 ** 20).toFixed(0)} MiB -> peak ${(peak / 2 ** 20).toFixed(0)} MiB under 100 stalled streams`
    )
    // 64 MiB of queued answers, plus the muxers' and Node's own buffers; unbounded (a frame held per stream), it was over 1 GB.
    expect(grown).toBeLessThan(160 << 20)
    // The node still answers a reader that reads.
    const reader = await newPeer()
    const sha = (b: Uint8Array) => `sha256:${createHash('sha256').update(b).digest('hex')}`
    for (const s of streams) s.abort(new Error('done'))
    const frames = await ask(reader, CHUNK_PROTOCOL, { op: 'get', digests: [chunks[0]!] })
    expect(frames).toHaveLength(1)
    expect(sha(frames[0]!.subarray(5))).toBe(chunks[0])
  })
})
