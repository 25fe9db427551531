import { type ChildProcess, spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import type { Libp2p } from '@libp2p/interface'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { buildCli, type P2pdProcess, startP2pd, waitForMesh } from '@test/cluster.js'
import { type CountingProxy, startCountingProxy } from '@test/counting-proxy.js'
import { buildTestImage, makeTestTree, type TestImage } from '@test/images.js'
import { freePort, startRegistry, type TestRegistry } from '@test/registry.js'
import { run } from '@test/tools.js'
import { createLibp2p } from 'libp2p'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { encodeFrame, readFrames } from '../src/frames.js'
import { BLOB_PROTOCOL, CHUNK_PROTOCOL, type NodeStatus } from '../src/index.js'

// The pull-through mirror with stock containerd: two nodes, each with its own containerd whose hosts.toml puts
// the node's mirror before the registry.

let work: string
let registry: TestRegistry
let proxy: CountingProxy
let image: TestImage
const nodes: Array<P2pdProcess & { mirror: string }> = []
const daemons: ChildProcess[] = []
let liar: Libp2p | undefined

/** Starts a containerd of its own (root, state, socket), with CRI off: pulls need only the content store. */
async function startContainerd(dir: string): Promise<string> {
  await mkdir(dir, { recursive: true })
  const socket = join(dir, 'containerd.sock')
  const config = join(dir, 'config.toml')
  await writeFile(
    config,
    `version = 2
root = "${join(dir, 'root')}"
state = "${join(dir, 'state')}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "${socket}"
[ttrpc]
  address = "${socket}.ttrpc"
`
  )
  const proc = spawn('containerd', ['--config', config], { stdio: ['ignore', 'ignore', 'pipe'] })
  daemons.push(proc)
  let log = ''
  proc.stderr!.on('data', (d) => {
    log += d
  })
  const deadline = Date.now() + 20_000
  for (;;) {
    const ok = await run('ctr', ['-a', socket, 'version'], { timeout: 5000 }).then(
      () => true,
      () => false
    )
    if (ok) return socket
    if (Date.now() > deadline || proc.exitCode !== null) throw new Error(`containerd did not start: ${log}`)
    await new Promise((r) => setTimeout(r, 200))
  }
}

/** A hosts dir that puts `mirror` before the registry (a 404 there goes on to the registry). */
async function hostsDir(dir: string, mirror: string): Promise<string> {
  const hosts = join(dir, 'certs.d')
  await mkdir(join(hosts, proxy.host), { recursive: true })
  await writeFile(
    join(hosts, proxy.host, 'hosts.toml'),
    `server = "http://${proxy.host}"\n\n[host."http://${mirror}"]\n  capabilities = ["pull", "resolve"]\n`
  )
  return hosts
}

async function pull(i: number, ref = image.ref.replace(registry.host, proxy.host)): Promise<void> {
  const dir = join(work, `containerd${i}`)
  const socket = join(dir, 'containerd.sock')
  await run('ctr', ['-a', socket, 'images', 'pull', '--hosts-dir', await hostsDir(dir, nodes[i]!.mirror), ref])
}

const blobGets = (from: number) =>
  proxy.requests.slice(from).filter((r) => r.method === 'GET' && r.path.includes('/blobs/'))

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'strata-mirror-'))
  await buildCli()
  registry = await startRegistry()
  proxy = await startCountingProxy(registry.host)
  const files = await makeTestTree(join(work, 'files'), { bigBytes: 9 * 1024 * 1024 })
  image = await buildTestImage({
    registry: registry.host,
    repository: 'mirror/app',
    estargz: false,
    layers: [{ files }]
  })
  for (let i = 0; i < 2; i++) {
    const port = await freePort()
    const node = await startP2pd({
      dataDir: join(work, `p2pd${i}`),
      ...(i > 0 && { bootstrap: nodes[0]!.addrs }),
      args: ['--mirror-listen', `127.0.0.1:${port}`]
    })
    nodes.push({ ...node, mirror: `127.0.0.1:${port}` })
    await startContainerd(join(work, `containerd${i}`))
  }
})

afterAll(async () => {
  await liar?.stop()
  for (const n of nodes) await n.stop()
  for (const d of daemons) d.kill('SIGKILL')
  await proxy?.stop()
  await registry?.stop()
  if (work !== undefined) await rm(work, { recursive: true, force: true })
})

describe('the pull-through mirror', () => {
  it('serves the manifest API and 404s what it cannot serve', async () => {
    const base = `http://${nodes[0]!.mirror}/v2`
    expect((await fetch(`${base}/`)).status).toBe(200)
    const name = 'mirror/app'
    const head = await fetch(`${base}/${name}/manifests/latest?ns=${proxy.host}`, { method: 'HEAD' })
    expect(head.status).toBe(200)
    expect(head.headers.get('docker-content-digest')).toBe(image.digest)
    expect(Number(head.headers.get('content-length'))).toBeGreaterThan(0)
    const missing = await fetch(`${base}/${name}/blobs/sha256:${'0'.repeat(64)}?ns=${proxy.host}`)
    expect(missing.status).toBe(404)
  })

  it('lets a second node pull with no blob from the registry: node 1 holds them', async () => {
    await pull(0)
    const before = proxy.requests.length
    await pull(1)
    expect(blobGets(before)).toEqual([])
    const status = await nodes[1]!.client.get<NodeStatus>('/status')
    expect(status.mirror.fetched.peer + status.mirror.fetched.home).toBeGreaterThan(9 * 1024 * 1024)
    expect(status.mirror.fetched.registry).toBe(0)
  })

  it('serves Range requests of a blob from the store', async () => {
    const layer = image.layers[0]!
    const url = `http://${nodes[1]!.mirror}/v2/mirror/app/blobs/${layer.digest}?ns=${proxy.host}`
    const whole = new Uint8Array(await (await fetch(url)).arrayBuffer())
    expect(`sha256:${createHash('sha256').update(whole).digest('hex')}`).toBe(layer.digest)
    const part = await fetch(url, { headers: { range: 'bytes=100-199' } })
    expect(part.status).toBe(206)
    expect(part.headers.get('content-range')).toBe(`bytes 100-199/${layer.size}`)
    expect(Buffer.from(await part.arrayBuffer())).toEqual(Buffer.from(whole.subarray(100, 200)))
  })

  it('catches a peer that serves a wrong blob, and the pull still succeeds', async () => {
    // A peer that says it holds every blob and sends garbage of the right size.
    liar = await createLibp2p({
      addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
      transports: [tcp()],
      connectionEncrypters: [noise()],
      streamMuxers: [yamux()],
      services: { identify: identify() }
    })
    let lies = 0
    // As a chunk peer it holds nothing (an honest answer: the point is the blob it lies about).
    await liar.handle(CHUNK_PROTOCOL, async (stream) => {
      for await (const frame of readFrames(stream, 1 << 20)) {
        const req = JSON.parse(new TextDecoder().decode(frame)) as {
          op: string
          digests?: string[]
          chunks?: unknown[]
        }
        const n = (req.digests ?? req.chunks ?? []).length
        if (req.op === 'have') stream.send(encodeFrame(Uint8Array.of(0x03), new Uint8Array(Math.ceil(n / 8))))
        else for (let i = 0; i < n; i++) stream.send(encodeFrame(Uint8Array.of(0x02, 0, 0, i >> 8, i & 0xff)))
        break
      }
      await stream.close()
    })
    await liar.handle(BLOB_PROTOCOL, async (stream) => {
      lies++
      for await (const _ of readFrames(stream, 1 << 20)) break
      const size = image.layers[0]!.size
      stream.send(encodeFrame(new TextEncoder().encode(JSON.stringify({ size }))))
      for (let at = 0; at < size; at += 1 << 20) {
        if (!stream.send(encodeFrame(new Uint8Array(Math.min(1 << 20, size - at)).fill(7)))) await stream.onDrain()
      }
      await stream.close()
    })
    // A third containerd with a fresh node that knows only the liar and node 0.
    const port = await freePort()
    const fresh = await startP2pd({
      dataDir: join(work, 'p2pd2'),
      bootstrap: [liar.getMultiaddrs()[0]!.toString()],
      args: ['--mirror-listen', `127.0.0.1:${port}`]
    })
    nodes.push({ ...fresh, mirror: `127.0.0.1:${port}` })
    await liar.dial(multiaddr(fresh.addrs[0]!))
    for (let t = 0; ; t++) {
      const peers = await fresh.client.get<Array<{ peer: string; strata: boolean }>>('/peers')
      if (peers.some((p) => p.peer === liar!.peerId.toString() && p.strata)) break
      if (t > 100) throw new Error('the fresh node never took the liar for a strata peer')
      await new Promise((r) => setTimeout(r, 100))
    }
    await startContainerd(join(work, 'containerd2'))
    await pull(2)
    expect(lies).toBeGreaterThan(0)
    const status = await fresh.client.get<NodeStatus>('/status')
    expect(status.mirror.badPeers).toBeGreaterThan(0)
    expect(fresh.stderr()).toMatch(/mirror: peer \S+ sent a wrong sha256:[0-9a-f]{64}: dropped it, asking elsewhere/)
    const peers = await fresh.client.get<Array<{ peer: string; bad?: number }>>('/peers')
    expect(peers.find((p) => p.peer === liar!.peerId.toString())?.bad).toBeGreaterThan(0)
  })

  it('costs the registry about one copy of an image when five nodes pull it at once', async () => {
    const five: Array<P2pdProcess & { mirror: string }> = []
    for (let i = 0; i < 5; i++) {
      const port = await freePort()
      const node = await startP2pd({
        dataDir: join(work, `five${i}`),
        ...(i > 0 && { bootstrap: five[0]!.addrs }),
        args: ['--mirror-listen', `127.0.0.1:${port}`]
      })
      five.push({ ...node, mirror: `127.0.0.1:${port}` })
      nodes.push(five[i]!)
    }
    await waitForMesh(five, 4)
    const files = await makeTestTree(join(work, 'files-five'), { seed: 5, bigBytes: 12 * 1024 * 1024 })
    const fresh = await buildTestImage({
      registry: registry.host,
      repository: 'mirror/five',
      estargz: false,
      layers: [{ files }]
    })
    const blobs = [fresh.layers[0]!]
    const imageBytes = blobs.reduce((n, b) => n + b.size, 0)
    const before = proxy.requests.length
    // Each node's runtime: the manifest by tag, then every layer, as containerd asks them.
    await Promise.all(
      five.map(async (n) => {
        const base = `http://${n.mirror}/v2/mirror/five`
        const m = await fetch(`${base}/manifests/latest?ns=${proxy.host}`, {
          headers: { accept: 'application/vnd.oci.image.manifest.v1+json' }
        })
        expect(m.status).toBe(200)
        for (const b of blobs) {
          const got = new Uint8Array(await (await fetch(`${base}/blobs/${b.digest}?ns=${proxy.host}`)).arrayBuffer())
          expect(`sha256:${createHash('sha256').update(got).digest('hex')}`).toBe(b.digest)
        }
      })
    )
    const egress = blobGets(before)
      .filter((r) => blobs.some((b) => r.path.includes(b.digest)))
      .reduce((n, r) => n + r.bytes, 0)
    console.log(
      `five nodes at once: registry egress ${(egress / imageBytes).toFixed(2)}x the image (${imageBytes} bytes)`
    )
    expect(egress).toBeLessThanOrEqual(1.2 * imageBytes)
  })
})
