// Benchmark: strata's eStargz builder against the reference (`oracle build --gomaxprocs 2`) on the same tar of
// real files. Run from the repository root (no build needed; Node runs the TypeScript sources):
//
//   node --experimental-transform-types --no-warnings packages/stargz/bench/build.mjs [--runs N] [DIR...]
//
// DIRs default to a mix of big binaries and many small files under /usr/lib (about 280 MB). Prints the figures
// and the ratios, and rewrites the "stargz build" section of docs/benchmarks.md.
import { execFileSync, spawnSync } from 'node:child_process'
import {
  createReadStream,
  createWriteStream,
  existsSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync
} from 'node:fs'
import { cpus, tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { registerStrataHooks } from '../../../test/helpers/ts-loader.mjs'

registerStrataHooks({ strata: 'src' })
const root = fileURLToPath(new URL('../../../', import.meta.url))
const { buildEstargz } = await import('@strata/stargz')
const oracle = process.env.STRATA_ORACLE ?? join(root, '.tools/oracle/oracle')

const runsArg = process.argv.indexOf('--runs')
const runs = runsArg > 0 ? Number(process.argv.splice(runsArg, 2)[1]) : 2
const dirs = process.argv.slice(2)
const sources =
  dirs.length > 0
    ? dirs
    : ['/usr/lib/python3.11', '/usr/lib/gcc', '/usr/lib/git-core', '/usr/lib/postgresql', '/usr/lib/cni']
const work = mkdtempSync(join(tmpdir(), 'strata-bench-build-'))
try {
  const tar = join(work, 'layer.tar')
  execFileSync('tar', ['-cf', tar, ...sources.filter(existsSync)], { stdio: ['ignore', 'ignore', 'inherit'] })
  const tarSize = statSync(tar).size
  const files = execFileSync('tar', ['-tf', tar], { maxBuffer: 1 << 28 })
    .toString()
    .split('\n')
    .filter(Boolean).length
  if (tarSize < 200e6)
    console.warn(`warning: the tar is only ${(tarSize / 1e6).toFixed(0)} MB; the figures want >= 200 MB`)
  console.log(`input: ${sources.join(' ')}: ${(tarSize / 1e6).toFixed(1)} MB, ${files} entries; ${cpus().length} CPUs`)

  // Warm the page cache so neither side pays for the first read.
  execFileSync('cat', [tar], { stdio: ['ignore', 'ignore', 'inherit'], maxBuffer: 1 << 30 })

  const ours = join(work, 'strata.esgz')
  const theirs = join(work, 'oracle.esgz')
  const strataRuns = []
  const oracleRuns = []
  const strataCpu = []
  const oracleCpu = []
  let r
  // Alternate the two so that load from other work on a shared machine hits both alike; report the best of each.
  for (let i = 0; i < runs; i++) {
    let t = performance.now()
    const cpu = process.cpuUsage()
    r = await buildEstargz(createReadStream(tar), createWriteStream(ours), { tmpDir: work })
    strataRuns.push((performance.now() - t) / 1000)
    const used = process.cpuUsage(cpu)
    strataCpu.push((used.user + used.system) / 1e6)
    t = performance.now()
    const o = spawnSync('/usr/bin/time', ['-f', 'cpu %U %S', oracle, 'build', tar, theirs, '--gomaxprocs', '2'], {
      encoding: 'utf8'
    })
    oracleRuns.push((performance.now() - t) / 1000)
    if (o.status !== 0) throw new Error(`oracle build failed: ${o.stderr}`)
    const [, u, sys] = /cpu ([\d.]+) ([\d.]+)/.exec(o.stderr)
    oracleCpu.push(Number(u) + Number(sys))
    console.log(
      `run ${i + 1}: strata ${strataRuns[i].toFixed(1)} s (${strataCpu[i].toFixed(1)} CPU s), ` +
        `oracle ${oracleRuns[i].toFixed(1)} s (${oracleCpu[i].toFixed(1)} CPU s)`
    )
  }
  const strataSec = Math.min(...strataRuns)
  const oracleSec = Math.min(...oracleRuns)
  const peakRss = Number(/VmHWM:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'))[1]) * 1024
  const oracleSize = statSync(theirs).size

  const v = spawnSync(oracle, ['verify', ours, '--toc-digest', r.tocDigest, '-q'], { encoding: 'utf8' })
  const verified = /result: OK/.test(v.stdout) ? 'OK' : `FAILED: ${v.stdout}${v.stderr}`

  const mbps = (sec) => (tarSize / 1e6 / sec).toFixed(1)
  const speed = oracleSec / strataSec
  const size = r.blobSize / oracleSize
  const rows = [
    ['strata buildEstargz (gzip 9, 4 MiB chunks)', strataSec, mbps(strataSec), Math.min(...strataCpu), r.blobSize],
    ['oracle build --gomaxprocs 2 (reference v0.12.0)', oracleSec, mbps(oracleSec), Math.min(...oracleCpu), oracleSize]
  ]
  const table = [
    '| builder | time (s) | throughput (MB/s of tar) | CPU time (s) | blob size (bytes) |',
    '| --- | ---: | ---: | ---: | ---: |',
    ...rows.map(
      ([name, sec, tp, cpuSec, bytes]) => `| ${name} | ${sec.toFixed(1)} | ${tp} | ${cpuSec.toFixed(1)} | ${bytes} |`
    )
  ]
  const summary = [
    `- throughput ratio strata / oracle: **${speed.toFixed(2)}x** (goal >= 1.0x); CPU time ratio oracle / strata: ${(Math.min(...oracleCpu) / Math.min(...strataCpu)).toFixed(2)}x`,
    `- blob size ratio strata / oracle: **${size.toFixed(4)}** (${((size - 1) * 100).toFixed(2)}%; goal <= +2%)`,
    `- strata peak RSS: ${(peakRss / 2 ** 20).toFixed(0)} MiB; oracle verify of strata's blob: ${verified}`
  ]
  console.log([...table, ...summary].join('\n'))

  const section = [
    '## stargz build',
    '',
    `Measured ${new Date().toISOString().slice(0, 16).replace('T', ' ')} UTC on ${cpus().length} CPUs shared with other work`,
    `(${cpus()[0]?.model ?? 'unknown CPU'}), Node ${process.version}. Input: \`tar -cf\` of`,
    `${sources.map((s) => `\`${s}\``).join(', ')}: ${(tarSize / 1e6).toFixed(1)} MB, ${files} entries, page-cached.`,
    'Both sides write a gzip-9 eStargz blob with 4 MiB chunks from the same plain tar; times are wall clock of the',
    'whole conversion (strata: spool + build + write; oracle: its process, including its own post-checks).',
    'CPU time is user + system of the whole process (strata: all threads, via process.cpuUsage; oracle:',
    '/usr/bin/time); it swings less with the load of other work than wall time does. Figures are the best of',
    `${runs} alternating runs (${strataRuns.map((x) => x.toFixed(1)).join(', ')} s vs ${oracleRuns.map((x) => x.toFixed(1)).join(', ')} s).`,
    '',
    ...table,
    '',
    ...summary,
    '',
    'Reproduce: `node --experimental-transform-types --no-warnings packages/stargz/bench/build.mjs [--runs N] [DIR...]`',
    ''
  ].join('\n')
  const doc = join(root, 'docs/benchmarks.md')
  const old = existsSync(doc) ? readFileSync(doc, 'utf8') : '# Benchmarks\n\n'
  const re = /## stargz build\n[\s\S]*?(?=\n## |$)/
  writeFileSync(doc, re.test(old) ? old.replace(re, section.trimEnd() + '\n') : `${old.trimEnd()}\n\n${section}`)
  console.log(`wrote ${doc}`)
} finally {
  rmSync(work, { recursive: true, force: true })
}
