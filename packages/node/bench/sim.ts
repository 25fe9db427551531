/**
 * Many nodes in one process (not a test: prints figures, and rewrites the "Scale" section of docs/benchmarks.md).
 *
 *   node --experimental-transform-types --no-warnings packages/node/bench/sim.ts [--sizes 50,100,200]
 *
 * Each node is a real strata node (createNode: kad-dht, announcer, chunk protocol, homes, Noise, yamux) over
 * libp2p's memory transport (1 ms a message), with an in-memory store and datastore; the registry is a real
 * CNCF distribution behind a byte-counting proxy. For each cluster size N it reports:
 *   - the DHT provides a node makes before its image can be found (the coarse keys), against its chunk count;
 *   - findProviders of the image's layer from other nodes: p50 and p99, and how many found the holder;
 *   - provider records each node holds once the holder's chunk keys are announced: mean and max;
 *   - registry egress when every node warms a second image at once, as a multiple of the image;
 *   - how far the nodes agree on the chunk homes just before: distinct homes per segment across all nodes (1 is
 *     full agreement), as chosen (homes.ts: the home sets of a large cluster) and as rendezvous over each node's
 *     connected view would choose them; and the DHT walks each node made for its home sets.
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { cpus, tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { memory } from '@libp2p/memory'
import { MemoryDatastore } from 'datastore-core'
import { registerStrataHooks } from '../../../test/helpers/ts-loader.mjs'
import { writeDocSection } from './doc-section.ts'

registerStrataHooks({ strata: 'src' })

const { createNode } = await import('@strata/node')
const { createRegistryClient } = await import('@strata/registry')
const { createMemoryStore } = await import('@strata/store')
const { startCountingProxy } = await import('@test/counting-proxy.js')
const { buildTestImage } = await import('@test/images.js')
const { noiseTree } = await import('@test/noise.js')
const { startRegistry } = await import('@test/registry.js')
const { homeOf } = await import('../src/homes.ts')

type StrataNode = Awaited<ReturnType<typeof createNode>>

const { values } = parseArgs({ options: { sizes: { type: 'string' } } })
const sizes = (values.sizes ?? '50,100,200').split(',').map(Number)
const work = await mkdtemp(join(tmpdir(), 'strata-sim-'))
const registry = await startRegistry()
const proxy = await startCountingProxy(registry.host)
const lines: string[] = []
const say = (s: string) => {
  console.log(s)
  lines.push(s)
}
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
const pct = (xs: number[], p: number) =>
  [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((xs.length * p) / 100))]!

async function image(name: string, seed: number) {
  // Two layers of 32 files of 32 KiB each: 64 chunks, 2 MiB.
  const layers = [0, 1].map(async (l) => ({
    files: await noiseTree(join(work, `${name}-${l}`), 32, () => 32 * 1024, seed * 10 + l)
  }))
  const img = await buildTestImage({
    registry: registry.host,
    repository: `sim/${name}`,
    estargz: true,
    gzipLevel: 1,
    layers: await Promise.all(layers)
  })
  return {
    ref: img.ref.replace(registry.host, proxy.host),
    layers: img.layers.map((l) => l.digest),
    layerBytes: img.layers.map((l) => l.size),
    bytes: img.layers.reduce((n, l) => n + l.size, 0),
    chunks: img.layers.reduce((n, l) => n + l.files.size, 0)
  }
}

interface Row {
  n: number
  startS: number
  coarse: number
  chunks: number
  findableS: number
  findP50: number
  findP99: number
  found: string
  recordsMean: number
  recordsMax: number
  egress: number
  warmP50: number
  /** Nodes whose warm-up of the second image failed (a manifest or TOC past its deadline, say). */
  warmFailed: number
  /** Distinct homes per segment of the second image across the nodes, mean: as chosen, and over connected views. */
  homesChosen: number
  homesByView: number
  /** DHT walks for home sets per node, mean and max. */
  walksMean: number
  walksMax: number
  /**
   * Verified chunk bytes the nodes took from the registry in the warm-ups, as multiples of the image: for forwarded
   * requests, for own reads (a forwarded request that joins the home's own read of the chunk counts as own).
   */
  asHomes: number
  ownReads: number
}

async function cluster(n: number, first: Awaited<ReturnType<typeof image>>, second: Awaited<ReturnType<typeof image>>) {
  const nodes: StrataNode[] = []
  const stores: MemoryDatastore[] = []
  const started = performance.now()
  try {
    for (let i = 0; i < n; i++) {
      const datastore = new MemoryDatastore()
      stores.push(datastore)
      const node = await createNode({
        store: createMemoryStore(),
        dataDir: await mkdtemp(join(work, `n${n}-${i}-`)),
        listen: [`/memory/sim-${n}-${i}`],
        transports: [memory({ latency: 1 })],
        datastore,
        bootstrap: i === 0 ? [] : [nodes[Math.floor(Math.random() * Math.min(i, 8))]!.addrs()[0]!],
        registry: createRegistryClient({ insecure: [proxy.host] }),
        registries: [proxy.host]
      })
      nodes.push(node)
    }
    // The cluster has formed once every node knows some strata peers and the walks have settled.
    for (let t = 0; t < 120; t++) {
      if (nodes.every((x) => x.peers().filter((p) => p.strata).length >= Math.min(n - 1, 8))) break
      await sleep(500)
    }
    await sleep(3000)
    const startS = (performance.now() - started) / 1000

    // One holder warms the first image; how soon can the others find it, and at what DHT cost?
    const holder = nodes[0]!
    const warmed = await holder.warm(first.ref)
    const t0 = performance.now()
    const askers = nodes
      .slice(1)
      .sort(() => Math.random() - 0.5)
      .slice(0, Math.min(40, n - 1))
    let findableS = Number.NaN
    for (let t = 0; t < 100; t++) {
      const got = await askers[0]!.providers(first.layers[0]!, { signal: AbortSignal.timeout(5000) })
      if (got.includes(holder.peerId)) {
        findableS = (performance.now() - t0) / 1000
        break
      }
      await sleep(100)
    }
    const coarse = (await holder.status()).announce
    const times: number[] = []
    let found = 0
    await Promise.all(
      askers.map(async (a) => {
        const t = performance.now()
        const got = await a.providers(first.layers[0]!, { signal: AbortSignal.timeout(10_000) })
        times.push(performance.now() - t)
        if (got.includes(holder.peerId)) found++
      })
    )
    // Provider records per node once the chunk keys have landed too.
    await Promise.race([holder.announced(), sleep(120_000)])
    const records: number[] = []
    for (const ds of stores) {
      let k = 0
      for await (const _ of ds.queryKeys({ prefix: '/dht/provider' })) k++
      records.push(k)
    }

    // How far the nodes agree on the second image's homes (1 = all pick the same home for a segment).
    type Internals = { source: { homesFor(key: string): string[] }; homeSets: { walks: number } }
    const chosen: number[] = []
    const byView: number[] = []
    for (const [l, layer] of second.layers.entries()) {
      for (let seg = 0; seg * (1 << 20) < second.layerBytes[l]!; seg++) {
        const key = `${layer}/${seg}`
        chosen.push(new Set(nodes.map((x) => homeOf(key, (x as unknown as Internals).source.homesFor(layer)))).size)
        const views = nodes.map((x) => [
          x.peerId,
          ...x
            .peers()
            .filter((p) => p.strata)
            .map((p) => p.peer)
        ])
        byView.push(new Set(views.map((v) => homeOf(key, v))).size)
      }
    }
    const walks = nodes.map((x) => (x as unknown as Internals).homeSets.walks ?? 0)
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length)

    // Every node warms the second image at once.
    const fromRegistry = async () => {
      const all = await Promise.all(nodes.map((x) => x.status()))
      return {
        homes: all.reduce((a, st) => a + (st.bytes.fetchedForPeers.registry ?? 0), 0),
        own: all.reduce((a, st) => a + (st.bytes.fetched.registry ?? 0), 0)
      }
    }
    const registryBefore = await fromRegistry()
    const before = proxy.blobBytes()
    const warmTimes: number[] = []
    let failed = 0
    await Promise.all(
      nodes.map(async (x) => {
        const t = performance.now()
        try {
          await x.warm(second.ref)
          warmTimes.push(performance.now() - t)
        } catch (err) {
          failed++
          console.log(`warm failed: ${(err as Error).message}`)
        }
      })
    )
    const egress = (proxy.blobBytes() - before) / second.bytes
    const registryAfter = await fromRegistry()
    const row: Row = {
      n,
      startS,
      coarse: coarse.landed,
      chunks: warmed.totalChunks,
      findableS,
      findP50: pct(times, 50),
      findP99: pct(times, 99),
      found: `${found}/${askers.length}`,
      recordsMean: records.reduce((a, b) => a + b, 0) / records.length,
      recordsMax: Math.max(...records),
      egress,
      warmP50: warmTimes.length > 0 ? pct(warmTimes, 50) : Number.NaN,
      warmFailed: failed,
      homesChosen: mean(chosen),
      homesByView: mean(byView),
      walksMean: mean(walks),
      walksMax: Math.max(...walks),
      asHomes: (registryAfter.homes - registryBefore.homes) / second.bytes,
      ownReads: (registryAfter.own - registryBefore.own) / second.bytes
    }
    console.log(JSON.stringify(row))
    return row
  } finally {
    await Promise.allSettled(nodes.map((x) => x.stop({ graceMs: 0 })))
  }
}

try {
  const rows: Row[] = []
  for (const n of sizes) {
    const first = await image(`first-${n}`, n)
    const second = await image(`second-${n}`, n + 1)
    rows.push(await cluster(n, first, second))
  }
  say(
    `Measured ${new Date().toISOString().slice(0, 16).replace('T', ' ')} UTC on ${cpus().length} CPUs shared with other work, Node ${process.version}, with`
  )
  say(
    '`node --experimental-transform-types --no-warnings packages/node/bench/sim.ts`: N strata nodes in one process over'
  )
  say(
    "libp2p's memory transport (1 ms a message), the real DHT, announcer, chunk protocol and homes; a 2-layer image of 64"
  )
  say('chunks (2 MiB); the registry behind a counting proxy.')
  say('')
  say(
    '| nodes | keys provided when findable | chunks | findable after s | findProviders p50 / p99 ms | found | provider records per node, mean / max | distinct homes per segment, chosen / by connected view | home-set walks per node, mean / max | registry egress, all warm at once | verified chunk bytes from the registry, for forwarded requests / own reads | warm p50 s | warm-ups failed |'
  )
  say('| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
  for (const r of rows) {
    say(
      `| ${r.n} | ${r.coarse} | ${r.chunks} | ${r.findableS.toFixed(2)} | ${r.findP50.toFixed(0)} / ${r.findP99.toFixed(0)} | ${r.found} | ${r.recordsMean.toFixed(1)} / ${r.recordsMax} | ${r.homesChosen.toFixed(2)} / ${r.homesByView.toFixed(2)} | ${r.walksMean.toFixed(1)} / ${r.walksMax} | ${r.egress.toFixed(2)}x | ${r.asHomes.toFixed(2)}x / ${r.ownReads.toFixed(2)}x | ${(r.warmP50 / 1000).toFixed(2)} | ${r.warmFailed} |`
    )
  }
  say('')
  await writeDocSection('Scale', lines)
} finally {
  await proxy.stop()
  await registry.stop()
  await rm(work, { recursive: true, force: true })
}
