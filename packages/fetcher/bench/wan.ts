/**
 * Lazy pull vs full pull over an emulated WAN (not a test: prints figures).
 *
 *   pnpm exec turbo run build --filter @strata/fetcher... --output-logs=errors-only
 *   node packages/fetcher/bench/wan.ts [--rtt-ms 20] [--mbit 100] [--gzip-level 6] [--only b,b2,c,c2] [--store disk|disk-nosync|memory]
 *
 * A real registry sits behind test/helpers/wan-proxy.ts. The image is a real rootfs slice of this machine
 * (python3 with its stdlib and shared libraries) in two eStargz layers made by the reference builder, with the
 * files `python3 -c pass` opens (found with strace) as the prioritized files. One run measures:
 *   (a) full pull: download every layer and extract it with tar;
 *   (b) lazy, the workload: open the image (TOCs), prefetch the prioritized range, read those files;
 *   (b') lazy, the workload on demand: no prefetch, each file read when "opened";
 *   (c) lazy, everything: every regular file read through the fetcher (32 at a time);
 *   (c') lazy, everything with a whole-layer background prefetch first.
 */
import { execFileSync } from 'node:child_process'
import { cp, mkdir, mkdtemp, readdir, realpath, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { parseArgs } from 'node:util'
import { createFetcher, createRegistrySource, type Image, openImage } from '@strata/fetcher'
import { createRegistryClient } from '@strata/registry'
import { createMemoryStore, openDiskStore } from '@strata/store'
import { registerStrataHooks } from '../../../test/helpers/ts-loader.mjs'

registerStrataHooks({ strata: 'dist' })
const { buildTestImage } = await import('@test/images.js')
const { startRegistry } = await import('@test/registry.js')
const { startWanProxy } = await import('@test/wan-proxy.js')

const { values: args } = parseArgs({
  options: {
    'rtt-ms': { type: 'string', default: '20' },
    mbit: { type: 'string', default: '100' },
    'gzip-level': { type: 'string', default: '6' },
    /** Runs to make, of a,b,b2,c,c2 (the full pull is the reference and always runs). */
    only: { type: 'string', default: 'b,b2,c,c2' },
    /** The chunk store of the lazy runs: disk (as p2pd: fsynced by checkpoints), disk-nosync, or memory. */
    store: { type: 'string', default: 'disk' }
  }
})

/** The image: [layer][paths under /], directories taken whole. */
async function layerPaths(): Promise<string[][]> {
  const libs = (await readdir('/usr/lib/x86_64-linux-gnu', { withFileTypes: true }))
    .filter((d) => (d.isFile() || d.isSymbolicLink()) && /^lib[a-f]/.test(d.name))
    .map((d) => `usr/lib/x86_64-linux-gnu/${d.name}`)
  const system = [
    ...libs,
    'usr/lib/x86_64-linux-gnu/libm.so.6',
    'usr/lib/x86_64-linux-gnu/libz.so.1',
    'usr/lib/x86_64-linux-gnu/libz.so.1.2.13',
    'usr/lib/x86_64-linux-gnu/libexpat.so.1',
    'usr/lib/x86_64-linux-gnu/libexpat.so.1.8.10',
    'usr/lib/x86_64-linux-gnu/gconv',
    'usr/lib/locale',
    'usr/share/zoneinfo',
    'etc/ld.so.cache',
    'etc/locale.alias'
  ]
  const python = ['usr/bin/python3', 'usr/bin/python3.11', 'usr/lib/python3.11', 'usr/lib/python3']
  return [system, python]
}

/** The files `python3 -c pass` opens, resolved to real paths (relative to /), in the order it opens them. */
async function workload(): Promise<string[]> {
  const trace = join(tmpdir(), `strata-bench-${process.pid}.trace`)
  execFileSync('strace', ['-f', '-e', 'trace=openat,execve', '-o', trace, '/usr/bin/python3', '-c', 'pass'])
  const text = execFileSync('cat', [trace], { encoding: 'utf8' })
  await rm(trace)
  const out: string[] = []
  for (const m of text.matchAll(/(?:openat|execve)\([^"]*"([^"]+)".*\)\s*=\s*\d+/g)) {
    const real = await realpath(m[1]!).catch(() => undefined)
    if (real === undefined || !(await stat(real)).isFile()) continue
    const rel = real.slice(1)
    if (!out.includes(rel)) out.push(rel)
  }
  return out
}

function mb(bytes: number): string {
  return `${(bytes / 1e6).toFixed(1)} MB`
}

const rttMs = Number(args['rtt-ms'])
const mbit = Number(args.mbit)
const work = await mkdtemp(join(tmpdir(), 'strata-bench-'))
const registry = await startRegistry()
const proxy = await startWanProxy({ target: registry.host, rttMs, bitsPerSecond: mbit * 1e6 })
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    // The registry is a child process and the work directory is large: neither outlives the benchmark.
    void Promise.all([registry.stop(), rm(work, { recursive: true, force: true })]).finally(() => process.exit(130))
  })
}
try {
  const layers = await layerPaths()
  const wanted = await workload()
  const stages: string[] = []
  const prioritized: string[][] = []
  for (const [i, paths] of layers.entries()) {
    const stage = join(work, `stage${i}`)
    for (const p of paths) {
      await mkdir(join(stage, dirname(p)), { recursive: true })
      await cp(join('/', p), join(stage, p), { recursive: true, verbatimSymlinks: true })
    }
    stages.push(stage)
    prioritized.push(wanted.filter((w) => paths.some((p) => w === p || w.startsWith(`${p}/`))))
  }
  const built = performance.now()
  const test = await buildTestImage({
    registry: registry.host,
    repository: 'bench/rootfs',
    layers: stages.map((files, i) => ({ files, prioritized: prioritized[i]! })),
    estargz: true,
    gzipLevel: Number(args['gzip-level'])
  })
  const ref = test.ref.replace(registry.host, proxy.host)
  const imageBytes = test.layers.reduce((a, l) => a + [...l.sizes.values()].reduce((x, y) => x + y, 0), 0)
  const blobBytes = test.layers.reduce((a, l) => a + l.size, 0)
  const inImage = wanted.filter((w) => test.layers.some((l) => l.files.has(w)))
  const workloadBytes = inImage.reduce((a, w) => a + (test.layers.find((l) => l.sizes.has(w))?.sizes.get(w) ?? 0), 0)
  console.log(
    `image: ${test.layers.length} layers, ${mb(imageBytes)} of files, ${mb(blobBytes)} of blobs (built in ${((performance.now() - built) / 1000).toFixed(1)} s)`
  )
  console.log(
    `workload: ${inImage.length} files python3 -c pass opens, ${mb(workloadBytes)} (${((100 * workloadBytes) / imageBytes).toFixed(1)}% of the bytes)`
  )
  console.log(`link: ${mbit} Mbit/s, ${rttMs} ms RTT; lazy runs use a ${args.store} store`)

  const client = createRegistryClient()
  // Counts the HTTP Range requests the lazy runs make (each readAt of a remote blob is one).
  let rangeRequests = 0
  const countingClient: typeof client = Object.create(client)
  countingClient.blob = (r, digest, size) => {
    const blob = client.blob(r, digest, size)
    return {
      get size() {
        return blob.size
      },
      readAt(offset, length, options) {
        rangeRequests++
        return blob.readAt(offset, length, options)
      },
      get ignoresRange() {
        return blob.ignoresRange
      },
      joins: (offset) => blob.joins(offset),
      // One request per call: the registry source reads one coalesced run per call (unless Range is ignored).
      readRuns(runs, onRun, options) {
        rangeRequests++
        return blob.readRuns(runs, onRun, options)
      }
    }
  }
  const results: Array<{ name: string; ms: number; bytes: number; requests?: number }> = []
  const only = new Set(args.only.split(','))
  const phase = async (name: string, fn: (dir: string) => Promise<number | undefined>) => {
    const key = /^\((\w+)('?)\)/.exec(name)!
    if (key[1] !== 'a' && !only.has(`${key[1]}${key[2] === "'" ? '2' : ''}`)) return
    const dir = await mkdtemp(join(work, 'run-'))
    proxy.reset()
    const started = performance.now()
    const requests = await fn(dir)
    const ms = performance.now() - started
    results.push({ name, ms, bytes: proxy.bytesDown, ...(requests !== undefined ? { requests } : {}) })
    console.log(
      `${name}: ${(ms / 1000).toFixed(2)} s, ${mb(proxy.bytesDown)} down${requests !== undefined ? `, ${requests} Range requests` : ''}`
    )
    await rm(dir, { recursive: true, force: true })
  }

  const lazy = async (
    dir: string,
    body: (image: Image, fetcher: ReturnType<typeof createFetcher>) => Promise<void>
  ): Promise<number> => {
    const store =
      args.store === 'memory'
        ? createMemoryStore()
        : await openDiskStore(join(dir, 'store'), { fsync: args.store !== 'disk-nosync' })
    try {
      rangeRequests = 0
      const image = await openImage({ client: countingClient, store, ref })
      const fetcher = createFetcher({
        store,
        sources: [createRegistrySource({ client: countingClient })]
      })
      await body(image, fetcher)
      return rangeRequests
    } finally {
      await store.close()
    }
  }
  const find = (image: Image, path: string) => {
    for (const layer of image.layers) {
      const entry = layer.toc.lookup(path)
      if (entry?.type === 'reg') return { layer, entry }
    }
    throw new Error(`${path} is not in the image`)
  }
  const readWorkload = async (image: Image, fetcher: ReturnType<typeof createFetcher>) => {
    for (const path of inImage) {
      const { layer, entry } = find(image, path)
      await fetcher.readRange(layer, entry, 0, new Uint8Array(entry.size))
    }
  }
  const readEverything = async (image: Image, fetcher: ReturnType<typeof createFetcher>) => {
    const all = image.layers.flatMap((layer) =>
      [...layer.toc.entries.values()].filter((e) => e.type === 'reg').map((entry) => ({ layer, entry }))
    )
    let next = 0
    const worker = async () => {
      while (next < all.length) {
        const { layer, entry } = all[next++]!
        await fetcher.readRange(layer, entry, 0, new Uint8Array(entry.size))
      }
    }
    await Promise.all(Array.from({ length: 32 }, worker))
  }

  await phase('(a) full pull: download + tar -x', async (dir) => {
    const image = await client.getImage(ref)
    await Promise.all(image.layers.map((l, i) => client.downloadBlob(ref, l.digest, join(dir, `layer${i}`))))
    await mkdir(join(dir, 'rootfs'))
    for (const i of image.layers.keys())
      execFileSync('tar', ['-xzf', join(dir, `layer${i}`), '-C', join(dir, 'rootfs')])
    return undefined
  })
  await phase('(b) lazy workload, prioritized prefetch', (dir) =>
    lazy(dir, async (image, fetcher) => {
      await fetcher.prefetch(image)
      await readWorkload(image, fetcher)
    })
  )
  await phase("(b') lazy workload, on demand", (dir) => lazy(dir, readWorkload))
  await phase('(c) lazy everything, 32 files at a time', (dir) => lazy(dir, readEverything))
  await phase("(c') lazy everything after a whole-layer prefetch", (dir) =>
    lazy(dir, async (image, fetcher) => {
      await fetcher.prefetch(image, { wholeLayerBytesPerSecond: Number.POSITIVE_INFINITY })
      await readEverything(image, fetcher)
    })
  )

  const full = results[0]!
  console.log('')
  console.log('| run | time | vs full pull | bytes down | Range requests (TOCs included) |')
  console.log('| --- | ---: | ---: | ---: | ---: |')
  for (const r of results) {
    const ratio =
      r === full ? '1' : r.ms < full.ms ? `${(full.ms / r.ms).toFixed(1)}x faster` : `${(r.ms / full.ms).toFixed(2)}x`
    console.log(`| ${r.name} | ${(r.ms / 1000).toFixed(2)} s | ${ratio} | ${mb(r.bytes)} | ${r.requests ?? '-'} |`)
  }
} finally {
  await proxy.stop()
  await registry.stop()
  await rm(work, { recursive: true, force: true })
}
