// Benchmark (not a test): the registry client on loopback, and `p2pctl convert` of a real multi-layer image
// against `skopeo copy` of the same image, registry to registry, in the same run. From the repository root:
//
//   node --experimental-transform-types --no-warnings packages/registry/bench/registry.mjs [DIR...]
//
// DIRs (one layer each) default to /usr/lib/python3.11, /usr/lib/gcc and /usr/lib/git-core (about 200 MB).
// Prints the figures and rewrites the "registry and convert" section of docs/benchmarks.md.
import { execFileSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { cpus, tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { gzipSync } from 'node:zlib'
import { registerStrataHooks } from '../../../test/helpers/ts-loader.mjs'

registerStrataHooks({ strata: 'src' })
const root = fileURLToPath(new URL('../../../', import.meta.url))
const { createRegistryClient, convertImage, openImageRepo, sha256, MediaType } = await import('@strata/registry')
const { startRegistry } = await import('@test/registry.js')

const dirs =
  process.argv.slice(2).length > 0
    ? process.argv.slice(2)
    : ['/usr/lib/python3.11', '/usr/lib/gcc', '/usr/lib/git-core']
const MiB = 1024 * 1024
const mbps = (bytes, ms) => (bytes / MiB / (ms / 1000)).toFixed(1)
const time = async (fn) => {
  const t = performance.now()
  const r = await fn()
  return { ms: performance.now() - t, r }
}

const work = mkdtempSync(join(tmpdir(), 'strata-registry-bench-'))
const regA = await startRegistry()
const regB = await startRegistry()
const client = createRegistryClient({ dockerConfig: false })
const lines = []
const say = (s) => {
  console.log(s)
  lines.push(s)
}
try {
  // ---- Range reads vs one full GET -------------------------------------------------------------------------
  const size = 256 * MiB
  const blobPath = join(work, 'blob')
  writeFileSync(blobPath, randomBytes(size))
  const digest = `sha256:${execFileSync('sha256sum', [blobPath]).toString().split(' ')[0]}`
  const ref = `${regA.host}/bench/blob`
  await client.pushBlob(ref, digest, { path: blobPath })
  const full = await time(async () => {
    const res = await fetch(`http://${regA.host}/v2/bench/blob/blobs/${digest}`)
    let n = 0
    for await (const c of res.body) n += c.length
    return n
  })
  const dl = await time(() => client.downloadBlob(ref, digest, join(work, 'dl')))
  const blob = client.blob(ref, digest, size)
  const rangeRows = []
  for (const [chunk, concurrency] of [
    [64 * 1024, 1],
    [1 * MiB, 1],
    [4 * MiB, 1],
    [1 * MiB, 8]
  ]) {
    const total = Math.min(size, chunk * 512)
    let next = 0
    const t = await time(() =>
      Promise.all(
        Array.from({ length: concurrency }, async () => {
          while (next < total) {
            const off = next
            next += chunk
            await blob.readAt(off, chunk)
          }
        })
      )
    )
    rangeRows.push({ chunk, concurrency, total, ms: t.ms })
  }
  // Adjacent 64 KiB ranges coalesced into runs of 16 MiB (as the fetcher's registry source coalesces what
  // waits), each read by readRuns, 4 at a time.
  const runs = Array.from({ length: 4 }, (_, i) => ({ offset: i * 16 * MiB, length: 16 * MiB }))
  const co = await time(() => Promise.all(runs.map((run) => blob.readRuns([run], () => {}))))

  // ---- convert vs skopeo copy ------------------------------------------------------------------------------
  const src = `${regA.host}/bench/app:1`
  const layers = []
  let tarBytes = 0
  for (const [i, d] of dirs.entries()) {
    const tarPath = join(work, `l${i}.tar`)
    execFileSync('tar', ['-C', d, '--sort=name', '-cf', tarPath, '.'])
    const tar = readFileSync(tarPath)
    tarBytes += tar.length
    const gz = gzipSync(tar, { level: 6 })
    await client.pushBlob(src, sha256(gz), gz)
    layers.push({ gz: gz.length, gzDigest: sha256(gz), diffId: sha256(tar) })
    rmSync(tarPath)
  }
  const config = Buffer.from(
    JSON.stringify({
      architecture: 'amd64',
      os: 'linux',
      rootfs: { type: 'layers', diff_ids: layers.map((l) => l.diffId) }
    })
  )
  await client.pushBlob(src, sha256(config), config)
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: MediaType.ociManifest,
      config: { mediaType: MediaType.ociConfig, digest: sha256(config), size: config.length },
      layers: layers.map((l) => ({ mediaType: MediaType.ociLayerGzip, digest: l.gzDigest, size: l.gz }))
    })
  )
  await client.putManifest(src, manifest, MediaType.ociManifest)
  const gzBytes = layers.reduce((a, l) => a + l.gz, 0)

  const skopeo = await time(async () =>
    execFileSync(
      'skopeo',
      [
        'copy',
        '--src-tls-verify=false',
        '--dest-tls-verify=false',
        `docker://${src}`,
        `docker://${regB.host}/bench/copy:1`
      ],
      {
        stdio: 'ignore'
      }
    )
  )
  // Phases from convert's events: every layer is downloaded before the first build, and built before the first write.
  const marks = {}
  const t0 = performance.now()
  const conv = await time(() =>
    convertImage(openImageRepo(src, client), openImageRepo(`${regB.host}/bench/esgz:1`, client), {
      tmpDir: work,
      onEvent: (e) => {
        marks[e.type] ??= performance.now() - t0
      }
    })
  )
  const phases = {
    download: marks['convert-start'],
    build: marks.write - marks['convert-start'],
    push: conv.ms - marks.write
  }
  const outBytes = conv.r.images[0].layers.reduce((a, l) => a + l.size, 0)

  const date = new Date().toISOString().slice(0, 16).replace('T', ' ')
  say(`## registry and convert`)
  say('')
  say(`Measured ${date} UTC on this machine (${cpus().length} cores, shared with other work; Node ${process.version}),`)
  say('with `node --experimental-transform-types --no-warnings packages/registry/bench/registry.mjs`.')
  say('Registries are real CNCF distribution 2.8 processes on loopback (filesystem storage, plain HTTP).')
  say('')
  say(`Range reads of a ${size / MiB} MiB random blob (MiB/s of payload):`)
  say('')
  say('| read | MiB/s |')
  say('| --- | ---: |')
  say(`| one full GET, body discarded (plain fetch, the ceiling) | ${mbps(full.r, full.ms)} |`)
  say(`| downloadBlob: full GET, sha256 checked, to a file | ${mbps(size, dl.ms)} |`)
  for (const r of rangeRows) {
    say(
      `| readAt ${r.chunk >= MiB ? `${r.chunk / MiB} MiB` : `${r.chunk / 1024} KiB`} ranges, ${r.concurrency} at a time (${r.total / MiB} MiB, ${(r.total / r.chunk / (r.ms / 1000)).toFixed(0)} req/s) | ${mbps(r.total, r.ms)} |`
    )
  }
  say(
    `| readRuns of 1024 adjacent 64 KiB ranges (coalesced into 16 MiB runs, 4 at a time) | ${mbps(64 * MiB, co.ms)} |`
  )
  say('')
  say("Small ranges are bound by the registry's per-request cost on this loaded machine (a plain `fetch` of the")
  say('same 64 KiB ranges measured the same milliseconds per request as the client): coalescing is what pays.')
  say('')
  say(
    `Convert of a ${dirs.length}-layer image of real files (${dirs.join(', ')}: ${(tarBytes / MiB).toFixed(0)} MiB of tar,`
  )
  say(
    `${(gzBytes / MiB).toFixed(0)} MiB gzipped) from one registry to another, against \`skopeo copy\` of the same image between the same`
  )
  say('registries (skopeo only copies the blobs; convert downloads, rebuilds every layer at gzip level 9, and pushes):')
  say('')
  say('| run | seconds | MiB/s of tar | pushed |')
  say('| --- | ---: | ---: | ---: |')
  say(
    `| skopeo copy | ${(skopeo.ms / 1000).toFixed(1)} | ${mbps(tarBytes, skopeo.ms)} | ${(gzBytes / MiB).toFixed(0)} MiB |`
  )
  say(
    `| p2pctl convert (convertImage) | ${(conv.ms / 1000).toFixed(1)} | ${mbps(tarBytes, conv.ms)} | ${(outBytes / MiB).toFixed(0)} MiB |`
  )
  say('')
  say(
    `convert phases: download ${(phases.download / 1000).toFixed(1)} s, build ${(phases.build / 1000).toFixed(1)} s, push ${(phases.push / 1000).toFixed(1)} s.`
  )
  say(
    `convert / skopeo copy: ${(conv.ms / skopeo.ms).toFixed(1)}x the time. The builder's gzip (level 9, as the reference) is`
  )
  say('what costs: see the "stargz build" section for the builder alone.')

  const doc = join(root, 'docs/benchmarks.md')
  const old = existsSync(doc) ? readFileSync(doc, 'utf8') : '# Benchmarks\n\n'
  const section = `${lines.join('\n')}\n`
  const re = /## registry and convert\n[\s\S]*?(?=\n## |$)/
  writeFileSync(doc, re.test(old) ? old.replace(re, section.trimEnd() + '\n') : `${old.trimEnd()}\n\n${section}`)
  console.log(`wrote ${doc}`)
} finally {
  await regA.stop()
  await regB.stop()
  rmSync(work, { recursive: true, force: true })
}
