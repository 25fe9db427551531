/**
 * p2pd benchmark (not a test: prints figures, and rewrites the "p2pd" section of docs/benchmarks.md).
 *
 *   pnpm exec turbo run build --filter @strata/cli... --output-logs=errors-only
 *   node --experimental-transform-types --no-warnings packages/node/bench/p2pd.ts
 *
 * Every node is a real p2pd process on loopback (disk store with fsync, Noise, yamux); the registry is a real
 * CNCF distribution behind a byte-counting proxy. Measures:
 *   1. chunk throughput: node A warms an image from the registry, then node B warms it from A;
 *   2. findability: after A warms an image of ~20,000 chunks, how soon its layer key lands (what makes the
 *      image readable from A by any node) and how fast the chunk keys follow (DHT provides per second);
 *   3. registry egress when N = 1, 5, 10 cold nodes read the same image at once.
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { cpus, tmpdir } from 'node:os'
import { join } from 'node:path'
import { registerStrataHooks } from '../../../test/helpers/ts-loader.mjs'
import { writeDocSection } from './doc-section.ts'

registerStrataHooks({ strata: 'src' })

const { startCluster, startP2pd, waitForMesh } = await import('@test/cluster.js')
const { startCountingProxy } = await import('@test/counting-proxy.js')
const { buildTestImage } = await import('@test/images.js')
const { noiseTree } = await import('@test/noise.js')
const { startRegistry } = await import('@test/registry.js')

type Status = {
  store: { chunks: number }
  bytes: { served: number; fetched: Record<string, number> }
  announce: { landed: number; backlog: number }
}

const MiB = 1024 * 1024
const work = await mkdtemp(join(tmpdir(), 'strata-bench-p2pd-'))
const registry = await startRegistry()
const proxy = await startCountingProxy(registry.host)
const lines: string[] = []
const say = (s: string) => {
  console.log(s)
  lines.push(s)
}
const blobBytes = () => proxy.blobBytes()

async function image(name: string, dir: string) {
  const img = await buildTestImage({
    registry: registry.host,
    repository: `bench/${name}`,
    estargz: true,
    gzipLevel: 1,
    layers: [{ files: dir }]
  })
  let bytes = 0
  for (const l of img.layers) bytes += l.size
  return {
    ref: img.ref.replace(registry.host, proxy.host),
    bytes,
    chunks: img.layers.reduce((n, l) => n + l.files.size, 0)
  }
}

async function warm(
  node: { p2pctl(a: string[]): Promise<{ code: number; stdout: string; stderr: string }> },
  ref: string
) {
  const t = performance.now()
  const r = await node.p2pctl(['warm', ref, '--json'])
  if (r.code !== 0) throw new Error(r.stderr)
  return { ms: performance.now() - t, result: JSON.parse(r.stdout) as { totalBytes: number; totalChunks: number } }
}

try {
  console.log('building images...')
  const big = await image('big', await noiseTree(join(work, 'big'), 48, () => 1 * MiB, 1))
  const many = await image('many', await noiseTree(join(work, 'many'), 20_000, (i) => 256 + (i % 512), 2))
  const mid = await image('mid', await noiseTree(join(work, 'mid'), 200, (i) => 40_000 + ((i * 7919) % 80_000), 3))

  say(
    `Measured ${new Date().toISOString().slice(0, 16).replace('T', ' ')} UTC on ${cpus().length} CPUs shared with other work, Node ${process.version}, with`
  )
  say(
    '`node --experimental-transform-types --no-warnings packages/node/bench/p2pd.ts` (p2pd processes on loopback, disk'
  )
  say('stores with fsync, a real registry behind a counting proxy).')
  say('')

  // 1. Throughput.
  {
    const c = await startCluster(1, { insecureRegistry: [proxy.host] })
    const dir = await mkdtemp(join(tmpdir(), 'strata-bench-b-'))
    try {
      const a = await warm(c.nodes[0]!, big.ref)
      const b0 = await startP2pd({ dataDir: dir, bootstrap: c.nodes[0]!.addrs, insecureRegistry: [proxy.host] })
      c.nodes.push(b0)
      await waitForMesh(c.nodes, 1)
      const before = blobBytes()
      const b = await warm(b0, big.ref)
      const s = (await b0.client.get('/status')) as Status
      const mibs = (r: { ms: number; result: { totalBytes: number } }) =>
        (r.result.totalBytes / MiB / (r.ms / 1000)).toFixed(1)
      say(
        `Chunk throughput, one node warming a ${(big.bytes / MiB).toFixed(0)} MiB image of ${big.chunks} 1 MiB chunks (time of \`p2pctl warm\`):`
      )
      say('')
      say('| source | seconds | MiB/s |')
      say('| --- | ---: | ---: |')
      say(`| registry (node A, alone) | ${(a.ms / 1000).toFixed(1)} | ${mibs(a)} |`)
      say(`| peer (node B from A) | ${(b.ms / 1000).toFixed(1)} | ${mibs(b)} |`)
      say('')
      say(
        `B fetched ${((s.bytes.fetched.peer ?? 0) / MiB).toFixed(1)} MiB from peers and ${((blobBytes() - before) / MiB).toFixed(1)} MiB of blobs from the registry (its TOC read).`
      )
      say('')
    } finally {
      await c.stop()
      await rm(dir, { recursive: true, force: true })
    }
  }

  // 2. Findability of a freshly warmed image of ~20,000 chunks.
  {
    const c = await startCluster(2, { insecureRegistry: [proxy.host] })
    const dir = await mkdtemp(join(tmpdir(), 'strata-bench-c-'))
    try {
      await waitForMesh(c.nodes, 1)
      const a = await warm(c.nodes[0]!, many.ref)
      const warmedAt = performance.now()
      let coarseMs = Number.NaN
      const status = async () => (await c.nodes[0]!.client.get('/status')) as Status
      while (performance.now() - warmedAt < 10_000) {
        if ((await status()).announce.landed >= 2) {
          coarseMs = performance.now() - warmedAt
          break
        }
        await new Promise((r) => setTimeout(r, 20))
      }
      // A cold node reads the whole image right away: from peers, by the layer key alone.
      const fresh = await startP2pd({ dataDir: dir, bootstrap: c.nodes[0]!.addrs, insecureRegistry: [proxy.host] })
      c.nodes.push(fresh)
      await waitForMesh([fresh], 1)
      const mark = proxy.requests.length
      const f = await warm(fresh, many.ref)
      const payload = proxy.requests
        .slice(mark)
        .filter((r) => r.path.includes('/blobs/') && r.rangeEnd !== undefined && r.bytes > 0)
      const fs = (await fresh.client.get('/status')) as Status
      const l0 = (await status()).announce.landed
      await new Promise((r) => setTimeout(r, 30_000))
      const l1 = (await status()).announce.landed
      const rate = (l1 - l0) / 30
      const left = (await status()).announce.backlog
      say(
        `Findability of an image of ${a.result.totalChunks} chunks (${(many.bytes / MiB).toFixed(1)} MiB) just warmed on node A of a 2-node cluster (A warmed it in ${(a.ms / 1000).toFixed(1)} s):`
      )
      say('')
      say(`- layer and TOC keys landed on the DHT ${coarseMs.toFixed(0)} ms after the warm-up finished;`)
      say(
        `- a cold third node then read the whole image in ${(f.ms / 1000).toFixed(1)} s: ${((fs.bytes.fetched.peer ?? 0) / MiB).toFixed(1)} of ${(f.result.totalBytes / MiB).toFixed(1)} MiB of chunk data from peers (${payload.length} registry Range requests, its TOC read);`
      )
      say(
        `- chunk keys follow in the background at ${rate.toFixed(1)} provides/s (rate limit 40/s, 4 at once); ${left} were still waiting, so`
      )
      say(
        `  every chunk key of this image is findable about ${(a.result.totalChunks / Math.max(rate, 0.1) / 60).toFixed(0)} min after the warm-up. Chunk keys matter only for`
      )
      say('  chunks shared across layers: readers find an image by its layer key.')
      say('')
    } finally {
      await c.stop()
      await rm(dir, { recursive: true, force: true })
    }
  }

  // 3. Registry egress with N concurrent cold nodes.
  say(
    `Registry egress (blob bytes, including each node's TOC read) when N cold nodes warm the same ${(mid.bytes / MiB).toFixed(1)} MiB image at once:`
  )
  say('')
  say('| N | seconds | registry egress | egress / image |')
  say('| ---: | ---: | ---: | ---: |')
  for (const n of [1, 5, 10]) {
    const c = await startCluster(n, { insecureRegistry: [proxy.host] })
    try {
      await waitForMesh(c.nodes, n - 1, 60_000)
      const before = blobBytes()
      const t = performance.now()
      await Promise.all(c.nodes.map((node) => warm(node, mid.ref)))
      const egress = blobBytes() - before
      say(
        `| ${n} | ${((performance.now() - t) / 1000).toFixed(1)} | ${(egress / MiB).toFixed(1)} MiB | ${(egress / mid.bytes).toFixed(2)}x |`
      )
    } finally {
      await c.stop()
    }
  }
  say('')

  await writeDocSection('p2pd', lines)
} finally {
  await proxy.stop()
  await registry.stop()
  await rm(work, { recursive: true, force: true })
}
