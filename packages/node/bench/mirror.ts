/**
 * Mirror benchmark (not a test: prints figures, and rewrites the "P2P mirror" section of docs/benchmarks.md).
 *
 *   pnpm exec turbo run build --filter @strata/cli... --output-logs=errors-only
 *   node --experimental-transform-types --no-warnings packages/node/bench/mirror.ts [--nodes 10] [--mib 40]
 *
 * N runtimes pull the same image at once (the manifest by tag, then every blob, as containerd does), the
 * registry behind one shared WAN link (100 Mbit/s, 20 ms round trip): straight from the registry, against
 * through the mirrors of N p2pd processes (a cluster on loopback). Time per pull and registry egress.
 */
import { createHash } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { cpus, tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { registerStrataHooks } from '../../../test/helpers/ts-loader.mjs'
import { writeDocSection } from './doc-section.ts'

registerStrataHooks({ strata: 'src' })

const { startP2pd, waitForMesh } = await import('@test/cluster.js')
const { startCountingProxy } = await import('@test/counting-proxy.js')
const { buildTestImage } = await import('@test/images.js')
const { noiseTree } = await import('@test/noise.js')
const { freePort, startRegistry } = await import('@test/registry.js')
const { startWanProxy } = await import('@test/wan-proxy.js')

const { values } = parseArgs({ options: { nodes: { type: 'string' }, mib: { type: 'string' } } })
const N = Number(values.nodes ?? 10)
const MiB = 1024 * 1024
const work = await mkdtemp(join(tmpdir(), 'strata-bench-mirror-'))
const registry = await startRegistry()
const counting = await startCountingProxy(registry.host)
const wan = await startWanProxy({ target: counting.host, rttMs: 20, bitsPerSecond: 100_000_000 })
const lines: string[] = []
const say = (s: string) => {
  console.log(s)
  lines.push(s)
}

/** One runtime's pull: manifest by tag, then each blob (config and layers), each checked. Milliseconds. */
async function pull(base: string, repository: string, ns: string): Promise<number> {
  const t = performance.now()
  const q = ns === '' ? '' : `?ns=${ns}`
  const m = await fetch(`${base}/v2/${repository}/manifests/latest${q}`, {
    headers: { accept: 'application/vnd.oci.image.manifest.v1+json' }
  })
  if (m.status !== 200) throw new Error(`manifest: ${m.status}`)
  const manifest = (await m.json()) as { config: { digest: string }; layers: Array<{ digest: string }> }
  await Promise.all(
    [manifest.config, ...manifest.layers].map(async ({ digest }) => {
      const res = await fetch(`${base}/v2/${repository}/blobs/${digest}${q}`)
      const bytes = new Uint8Array(await res.arrayBuffer())
      if (`sha256:${createHash('sha256').update(bytes).digest('hex')}` !== digest) throw new Error(`bad ${digest}`)
    })
  )
  return performance.now() - t
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!
const seconds = (ms: number) => (ms / 1000).toFixed(2)

try {
  const files = await noiseTree(join(work, 'files'), 40, () => Number(values.mib ?? 40) * (MiB / 40), 1)
  const image = await buildTestImage({
    registry: registry.host,
    repository: 'bench/mirror',
    estargz: false,
    layers: [{ files }]
  })
  const imageBytes = image.layers.reduce((n, l) => n + l.size, 0)
  const egress = () => counting.blobBytes()

  // Straight from the registry.
  wan.reset()
  let before = egress()
  const direct = await Promise.all(Array.from({ length: N }, () => pull(`http://${wan.host}`, 'bench/mirror', '')))
  const directEgress = egress() - before

  // Through the mirrors of a cold cluster.
  const nodes: Array<Awaited<ReturnType<typeof startP2pd>> & { mirror: string }> = []
  try {
    for (let i = 0; i < N; i++) {
      const port = await freePort()
      const node = await startP2pd({
        dataDir: join(work, `p2pd${i}`),
        ...(i > 0 && { bootstrap: nodes[0]!.addrs }),
        insecureRegistry: [wan.host],
        args: ['--mirror-listen', `127.0.0.1:${port}`]
      })
      nodes.push({ ...node, mirror: `127.0.0.1:${port}` })
    }
    await waitForMesh(nodes, N - 1, 60_000)
    before = egress()
    const mirrored = await Promise.all(nodes.map((n) => pull(`http://${n.mirror}`, 'bench/mirror', wan.host)))
    const mirrorEgress = egress() - before

    say(
      `Measured ${new Date().toISOString().slice(0, 16).replace('T', ' ')} UTC on ${cpus().length} CPUs shared with other work, Node ${process.version}, with`
    )
    say(
      `\`node --experimental-transform-types --no-warnings packages/node/bench/mirror.ts --nodes ${N}\`: ${N} runtimes pull a`
    )
    say(
      `${(imageBytes / MiB).toFixed(1)} MiB image at once (manifest, then every blob, each checked), the registry behind one shared`
    )
    say('100 Mbit/s, 20 ms link; p2pd processes on loopback.')
    say('')
    say('| pull | p50 s | slowest s | registry egress |')
    say('| --- | ---: | ---: | ---: |')
    say(
      `| straight from the registry | ${seconds(median(direct))} | ${seconds(Math.max(...direct))} | ${(directEgress / imageBytes).toFixed(2)}x the image |`
    )
    say(
      `| through the P2P mirrors | ${seconds(median(mirrored))} (${(median(mirrored) / median(direct)).toFixed(2)}x) | ${seconds(Math.max(...mirrored))} (${(Math.max(...mirrored) / Math.max(...direct)).toFixed(2)}x) | ${(mirrorEgress / imageBytes).toFixed(2)}x the image |`
    )
    say('')
  } finally {
    await Promise.all(nodes.map((n) => n.stop()))
  }

  await writeDocSection('P2P mirror', lines)
} finally {
  await wan.stop()
  await counting.stop()
  await registry.stop()
  await rm(work, { recursive: true, force: true })
}
