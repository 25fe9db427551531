import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { cpus, loadavg, tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { parseArgs } from 'node:util'
import { repoRoot } from '../helpers/tools.js'
import { convert, type PreparedImage, prepareImage, WORKLOADS } from './images.js'
import { type Lab, type LabKind, push, startLab } from './lab.js'
import {
  type ImageResult,
  type Results,
  renderChart,
  renderCpuLines,
  renderMarkdown,
  renderTable,
  updateDocs
} from './report.js'
import { clusterWarm, cold, fleetAlone, fleetPeers, independentWarms, warmPeer } from './scenarios.js'

const USAGE = `Usage: node --no-warnings test/bench/run.ts [options]

The end-to-end benchmark: lazy start vs full pull, a warm peer, N cold nodes at once, cluster warm-up.

Options:
  --small              one image (host), three nodes, one run: the CI version
  --images LIST        workloads, comma-separated, of ${Object.keys(WORKLOADS).join(', ')} (default: python3,gcc,node)
  --nodes N            nodes of the fleet and cluster scenarios (default: 10)
  --runs N             runs of each one-node cold start; the report takes the median (default: 3)
  --scenarios LIST     of cold,peer,fleet,cluster (default: all)
  --rtt-ms MS          round trip added to every registry connection (default: 20)
  --mbit N             registry uplink bandwidth, Mbit/s (default: 100)
  --lab KIND           loopback: every node on 127.0.0.1, links unshaped (default; CI);
                       netns: each node in its own network namespace, on a veth link to a bridge shaped
                       with tc tbf (root; only bandwidth is shaped between nodes, no delay: no netem here)
  --node-mbit N        netns: each node's link, Mbit/s each way (default: 1000)
  --out FILE           results JSON (default: test/bench/out/results.json)
  --no-docs            do not write docs/bench/time-to-ready.svg and docs/benchmarks.md
  --cache DIR          root file systems, images and conversions (default: /var/cache/strata-bench)
  --from FILE          measure nothing: print and write the outputs from a results JSON of an earlier run
  -h, --help           show this help`

const SCENARIOS = ['cold', 'peer', 'fleet', 'cluster']

interface Settings {
  images: string[]
  nodes: number
  runs: number
  scenarios: string[]
  rttMs: number
  mbit: number
  lab: LabKind
  nodeMbit: number
  out: string
  docs: boolean
  cache: string
  from?: string
}

function settings(argv: string[]): Settings | undefined {
  const { values: v } = parseArgs({
    args: argv,
    allowNegative: true,
    options: {
      small: { type: 'boolean', default: false },
      images: { type: 'string' },
      nodes: { type: 'string' },
      runs: { type: 'string' },
      scenarios: { type: 'string', default: SCENARIOS.join(',') },
      'rtt-ms': { type: 'string', default: '20' },
      mbit: { type: 'string', default: '100' },
      lab: { type: 'string', default: 'loopback' },
      'node-mbit': { type: 'string', default: '1000' },
      out: { type: 'string', default: join(repoRoot, 'test', 'bench', 'out', 'results.json') },
      docs: { type: 'boolean', default: true },
      cache: { type: 'string', default: '/var/cache/strata-bench' },
      from: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false }
    }
  })
  if (v.help) return undefined
  const number = (name: string, text: string, min: number) => {
    const n = Number(text)
    if (!Number.isFinite(n) || n < min) throw new UsageError(`--${name} must be a number >= ${min}, not '${text}'`)
    return n
  }
  const list = (name: string, text: string, known: string[]) => {
    const items = text.split(',').filter((s) => s !== '')
    const unknown = items.filter((s) => !known.includes(s))
    if (unknown.length > 0 || items.length === 0) {
      throw new UsageError(`--${name}: unknown '${unknown.join(',')}' (choose from ${known.join(', ')})`)
    }
    return items
  }
  const lab = list('lab', v.lab, ['loopback', 'netns'])
  if (lab.length !== 1) throw new UsageError(`--lab: one of loopback, netns, not '${v.lab}'`)
  return {
    images: list('images', v.images ?? (v.small ? 'host' : 'python3,gcc,node'), Object.keys(WORKLOADS)),
    nodes: number('nodes', v.nodes ?? (v.small ? '3' : '10'), 2),
    runs: number('runs', v.runs ?? (v.small ? '1' : '3'), 1),
    scenarios: list('scenarios', v.scenarios, SCENARIOS),
    rttMs: number('rtt-ms', v['rtt-ms'], 0),
    mbit: number('mbit', v.mbit, 0.1),
    lab: lab[0] as LabKind,
    nodeMbit: number('node-mbit', v['node-mbit'], 1),
    out: v.out,
    docs: v.docs,
    cache: v.cache,
    ...(v.from !== undefined ? { from: v.from } : {})
  }
}

/** A bad flag: exit 2 with the usage. */
class UsageError extends Error {
  override name = 'UsageError'
  readonly code = 'ERR_USAGE'
}

const log = (line: string) => process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${line}\n`)

/** An image pushed to the lab's registry, with its results so far. */
interface Subject {
  image: PreparedImage
  repo: string
  refs: { plain: string; esgz: string }
  /** What scenarios 2-4 start: the image with the recorded profile once scenario 1 made one, as an operator would. */
  ref: string
  result: ImageResult
}

async function setUp(lab: Lab, s: Settings, image: PreparedImage): Promise<Subject> {
  const { workload } = image
  const repo = `bench/${workload.name}`
  const esgz = await convert(image, s.cache, undefined, { signal: lab.signal, log })
  const refs = {
    plain: await push(lab, image.plain, repo, 'plain'),
    esgz: await push(lab, esgz.layout, repo, 'esgz')
  }
  const result: ImageResult = {
    name: workload.name,
    description: workload.description,
    command: workload.shown,
    rootfsBytes: image.rootfsBytes,
    plainBytes: image.plain.bytes,
    esgzBytes: esgz.layout.bytes
  }
  return { image, repo, refs, ref: refs.esgz, result }
}

/**
 * The measurements of one scenario on one image. A failure is kept in the results (and fails the run at the
 * end) while the others go on.
 */
async function measure(lab: Lab, s: Settings, scenario: string, subject: Subject): Promise<void> {
  const { image, result } = subject
  const { workload } = image
  const attempt = async <T>(what: string, body: () => Promise<T>): Promise<T | undefined> => {
    log(`${workload.name}: ${what}`)
    const start = performance.now()
    try {
      const value = await body()
      log(`${workload.name}: ${what}: done in ${((performance.now() - start) / 1000).toFixed(0)} s`)
      return value
    } catch (err) {
      if (lab.signal.aborted) throw err
      const message = `${(err as Error).name}: ${(err as Error).message}`
      log(`${workload.name}: ${what} failed: ${message}`)
      result.errors = { ...result.errors, [what]: message }
      return undefined
    }
  }
  const n = s.nodes
  if (scenario === 'cold') {
    result.cold = await attempt(`1. one node, cold (${s.runs} runs)`, () =>
      cold(lab, workload, subject.refs, s.runs, async (record) => {
        const profiled = await convert(image, s.cache, record, { signal: lab.signal, log })
        result.profileBytes = profiled.layout.bytes
        result.profileFiles = (await readFile(record, 'utf8')).split('\n').filter((l) => l !== '').length
        subject.ref = await push(lab, profiled.layout, subject.repo, 'profile')
        return subject.ref
      })
    )
  } else if (scenario === 'peer') {
    result.warmPeer = await attempt('2. one node with a warm peer', () =>
      warmPeer(lab, workload, subject.ref, subject.refs.plain)
    )
  } else if (scenario === 'fleet') {
    result.fleetAlone = await attempt(`3. ${n} cold nodes at once, without peers`, () =>
      fleetAlone(lab, workload, subject.ref, n)
    )
    result.fleetPeers = await attempt(`3. ${n} cold nodes at once, with peers`, () =>
      fleetPeers(lab, workload, subject.ref, n)
    )
  } else if (scenario === 'cluster') {
    result.clusterWarm = await attempt(`4. p2pctl warm --cluster on ${n} nodes`, () => clusterWarm(lab, subject.ref, n))
    result.independentWarms = await attempt(`4. ${n} independent p2pctl warm`, () =>
      independentWarms(lab, subject.ref, n)
    )
  }
}

/** The table on the terminal; with docs, the chart and docs/benchmarks.md's section. */
async function report(s: Settings, results: Results): Promise<void> {
  const cpu = renderCpuLines(results)
  process.stdout.write(`${renderTable(results)}\n${cpu.map((l) => `${l}\n`).join('')}results: ${s.out}\n`)
  if (!s.docs) return
  const chart = join(repoRoot, 'docs', 'bench', 'time-to-ready.svg')
  await mkdir(dirname(chart), { recursive: true })
  await writeFile(chart, renderChart(results))
  await updateDocs(join(repoRoot, 'docs', 'benchmarks.md'), renderMarkdown(results))
  process.stdout.write(`chart: ${chart}\ndocs: docs/benchmarks.md (section "End-to-end (pnpm bench)")\n`)
}

export async function main(argv: string[]): Promise<number> {
  let s: Settings | undefined
  try {
    s = settings(argv)
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n\n${USAGE}\n`)
    return 2
  }
  if (s === undefined) {
    process.stdout.write(`${USAGE}\n`)
    return 0
  }
  if (s.from !== undefined) {
    await report({ ...s, out: s.from }, JSON.parse(await readFile(s.from, 'utf8')) as Results)
    return 0
  }
  const aborter = new AbortController()
  const onSignal = (sig: string) => aborter.abort(new Error(`stopped by ${sig}`))
  process.once('SIGINT', onSignal)
  process.once('SIGTERM', onSignal)
  const work = await mkdtemp(join(tmpdir(), 'strata-bench-'))
  const results: Results = {
    date: new Date().toISOString(),
    host: { cpus: cpus().length, loadBefore: loadavg(), node: process.version },
    settings: {
      rttMs: s.rttMs,
      mbit: s.mbit,
      nodes: s.nodes,
      runs: s.runs,
      scenarios: s.scenarios,
      lab: s.lab,
      ...(s.lab === 'netns' ? { nodeMbit: s.nodeMbit } : {})
    },
    argv,
    images: []
  }
  const save = async () => {
    results.host.loadAfter = loadavg()
    await mkdir(dirname(s.out), { recursive: true })
    await writeFile(s.out, `${JSON.stringify(results, null, 2)}\n`)
  }
  let lab: Lab | undefined
  try {
    const prepared: PreparedImage[] = []
    for (const name of s.images) {
      prepared.push(await prepareImage(WORKLOADS[name]!, s.cache, { signal: aborter.signal, log }))
    }
    lab = await startLab({
      rttMs: s.rttMs,
      mbit: s.mbit,
      kind: s.lab,
      hosts: Math.max(2, s.nodes),
      nodeMbit: s.nodeMbit,
      work,
      signal: aborter.signal,
      log
    })
    const subjects: Subject[] = []
    for (const image of prepared) subjects.push(await setUp(lab, s, image))
    results.images = subjects.map((x) => x.result)
    // Scenario by scenario (each on every image), saving as it goes: a run cut short keeps whole scenarios.
    for (const scenario of SCENARIOS.filter((x) => s.scenarios.includes(x))) {
      for (const subject of subjects) {
        await measure(lab, s, scenario, subject)
        await save()
      }
    }
    await save()
    await report(s, results)
    const failed = results.images.filter((i) => i.errors !== undefined)
    if (failed.length > 0) process.stderr.write(`bench: some measurements failed (see "errors" in ${s.out})\n`)
    return failed.length > 0 ? 1 : 0
  } catch (err) {
    const e = err as Error & { hint?: string }
    process.stderr.write(`bench failed: ${e.name}: ${e.message}\n${e.hint !== undefined ? `hint: ${e.hint}\n` : ''}`)
    if (aborter.signal.aborted && results.images.length > 0) {
      results.interrupted = e.message
      await save()
      await report(s, results)
    }
    return 1
  } finally {
    await lab?.stop()
    await rm(work, { recursive: true, force: true })
  }
}
