// The containerd benchmark (see bench.ts): images made of this machine's programs (python3 with its standard
// library; node), each built as gzip and as eStargz, pulled and run four ways, each on a fresh containerd and
// fresh p2pd data directories, the registry behind the WAN emulator:
//   overlayfs    containerd's own snapshotter: ctr pull (download + unpack) + ctr run
//   strata       strata without labels: ctr pull --snapshotter strata (containerd unpacks into strata) + ctr run
//   lazy         ctr-remote rpull --snapshotter strata (remote snapshots, nothing downloaded) + ctr run
//   warm peer    as lazy, on a second node whose peer ran `p2pctl warm` on the image first
import { existsSync } from 'node:fs'
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { type P2pdProcess, startP2pd, waitForMesh } from '@test/cluster.js'
import { startRegistry } from '@test/registry.js'
import { repoRoot, run } from '@test/tools.js'
import { startWanProxy, type WanProxy } from '@test/wan-proxy.js'
import { type Containerd, releaseP2pdMounts, startContainerd } from './containerd.js'
import { buildRunnableImage } from './images.js'

const SCENARIOS = ['overlayfs', 'strata', 'lazy', 'warm peer'] as const
type Scenario = (typeof SCENARIOS)[number]

interface Sample {
  seconds: number
  registryBytes: number
}

interface Workload {
  name: string
  description: string
  programs: string[]
  hostDirs?: string[]
  command: string[]
  output: string
}

const WORKLOADS: Workload[] = [
  {
    name: 'python3',
    description: "this machine's python3 and its standard library",
    programs: ['/usr/bin/python3', 'sh'],
    hostDirs: ['/usr/lib/python3.11'],
    command: ['python3', '-c', 'print(1)'],
    output: '1'
  },
  {
    name: 'node',
    description: "this machine's node",
    programs: ['/usr/local/bin/node', 'sh'],
    command: ['/usr/local/bin/node', '-e', 'console.log(1)'],
    output: '1'
  }
]

const MARK_START = '<!-- containerd-bench:start -->'
const MARK_END = '<!-- containerd-bench:end -->'

export async function main(argv: string[]): Promise<number> {
  const flag = (name: string, dflt: number) => {
    const i = argv.indexOf(`--${name}`)
    return i >= 0 ? Number(argv[i + 1]) : dflt
  }
  const runs = flag('runs', 3)
  const rttMs = flag('rtt-ms', 20)
  const mbit = flag('mbit', 100)
  const ctrRemote = process.env.STRATA_CTR_REMOTE ?? join(repoRoot, '.tools', 'ctr-remote', 'ctr-remote')
  if (!existsSync(ctrRemote)) {
    process.stderr.write(`no ctr-remote at ${ctrRemote}: run scripts/setup.sh\n`)
    return 1
  }
  const registry = await startRegistry()
  const wan = await startWanProxy({ target: registry.host, rttMs, bitsPerSecond: mbit * 1e6 })
  const cleanup: Array<() => Promise<unknown>> = [() => registry.stop(), () => wan.stop()]
  try {
    process.stderr.write('building the images\n')
    const via = (ref: string) => ref.replace(registry.host, wan.host)
    const tables: string[] = []
    const all: Record<string, unknown> = {}
    for (const w of WORKLOADS) {
      const spec = { registry: registry.host, programs: w.programs, ...(w.hostDirs && { hostDirs: w.hostDirs }) }
      const [plain, lazy] = await Promise.all([
        buildRunnableImage({ ...spec, repository: `bench/${w.name}`, estargz: false }),
        buildRunnableImage({ ...spec, repository: `bench/${w.name}-esgz`, estargz: true })
      ])
      const results: Record<Scenario, Sample[]> = { overlayfs: [], strata: [], lazy: [], 'warm peer': [] }
      for (let i = 0; i < runs; i++) {
        for (const scenario of SCENARIOS) {
          const sample = await measure(scenario, {
            wan,
            ctrRemote,
            plain: via(plain.ref),
            lazy: via(lazy.ref),
            id: `bench${i}`,
            command: w.command,
            output: w.output
          })
          results[scenario].push(sample)
          process.stderr.write(
            `${w.name} run ${i + 1}/${runs} ${scenario}: ${sample.seconds.toFixed(2)} s, ${mib(sample.registryBytes)} from the registry\n`
          )
        }
      }
      const size = plain.sizes.reduce((a, b) => a + b, 0)
      tables.push(report(w, results, size))
      all[w.name] = { imageBytes: size, results }
    }
    const text = [
      `Registry behind the WAN emulator (${mbit} Mbit/s, ${rttMs} ms RTT); a fresh containerd and fresh p2pd stores for`,
      `every start; time from the pull to the command's output, median of ${runs} runs`,
      `(\`node --no-warnings test/containerd/bench.ts\`, ${new Date().toISOString().slice(0, 10)}).`,
      ...tables
    ].join('\n')
    process.stdout.write(`${text}\n`)
    const out = join(tmpdir(), 'strata-containerd-bench.json')
    process.stderr.write(`results in ${out}\n`)
    await writeFile(
      out,
      `${JSON.stringify({ date: new Date().toISOString(), runs, rttMs, mbit, workloads: all }, null, 2)}\n`
    )
    if (argv.includes('--docs')) {
      const doc = join(repoRoot, 'docs', 'containerd.md')
      const body = await readFile(doc, 'utf8')
      const start = body.indexOf(MARK_START)
      const end = body.indexOf(MARK_END)
      if (start < 0 || end < start) throw new Error(`${doc} has no ${MARK_START} ... ${MARK_END} section`)
      await writeFile(doc, `${body.slice(0, start + MARK_START.length)}\n${text}\n${body.slice(end)}`)
    }
    return 0
  } finally {
    for (const c of cleanup.reverse()) await c().catch(() => {})
  }
}

interface MeasureInit {
  wan: WanProxy
  ctrRemote: string
  plain: string
  lazy: string
  id: string
  command: string[]
  output: string
}

async function measure(scenario: Scenario, m: MeasureInit): Promise<Sample> {
  const dirs: string[] = []
  const nodes: P2pdProcess[] = []
  let containerd: Containerd | undefined
  const node = async (bootstrap: string[] = []) => {
    const dataDir = await mkdtemp(join(tmpdir(), 'strata-bench-'))
    dirs.push(dataDir)
    const p = await startP2pd({
      dataDir,
      insecureRegistry: [m.wan.host],
      bootstrap,
      args: ['--snapshotter-socket', join(dataDir, 'snapshotter.sock')]
    })
    nodes.push(p)
    return p
  }
  try {
    let target: P2pdProcess | undefined
    if (scenario !== 'overlayfs') target = await node()
    if (scenario === 'warm peer') {
      const warm = await target!.p2pctl(['warm', m.lazy])
      if (warm.code !== 0) throw new Error(`warm failed: ${warm.stderr}`)
      target = await node(target!.addrs)
      await waitForMesh(nodes, 1)
    }
    containerd = await startContainerd({
      snapshotters: target !== undefined ? { strata: join(target.dataDir, 'snapshotter.sock') } : {}
    })
    const snapshotter = scenario === 'overlayfs' ? 'overlayfs' : 'strata'
    const ref = scenario === 'lazy' || scenario === 'warm peer' ? m.lazy : m.plain
    m.wan.reset()
    const started = performance.now()
    if (scenario === 'lazy' || scenario === 'warm peer') {
      await run(m.ctrRemote, [
        '-a',
        containerd.socket,
        '-n',
        'strata-test',
        'images',
        'rpull',
        '--plain-http',
        '--snapshotter',
        snapshotter,
        ref
      ])
    } else {
      await containerd.ctr(['images', 'pull', '--plain-http', '--snapshotter', snapshotter, ref])
    }
    const { stdout } = await containerd.ctr(['run', '--rm', '--snapshotter', snapshotter, ref, m.id, ...m.command], {
      timeout: 300_000
    })
    const seconds = (performance.now() - started) / 1000
    if (stdout.trim() !== m.output) throw new Error(`${scenario}: the container printed ${JSON.stringify(stdout)}`)
    return { seconds, registryBytes: m.wan.bytesDown }
  } finally {
    await containerd?.stop()
    for (const n of nodes) await n.stop()
    for (const d of dirs) {
      await releaseP2pdMounts(d)
      await rm(d, { recursive: true, force: true })
    }
  }
}

const shellQuote = (s: string) => (/^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replaceAll("'", `'\\''`)}'`)
const mib = (b: number) => `${(b / 1048576).toFixed(1)} MiB`
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.floor(s.length / 2)]!
}

function report(w: Workload, results: Record<Scenario, Sample[]>, size: number): string {
  const base = median(results.overlayfs.map((s) => s.seconds))
  const what: Record<Scenario, string> = {
    overlayfs: "containerd's overlayfs: `ctr pull` + `ctr run`",
    strata: 'strata without labels: `ctr pull --snapshotter strata` (unpacked) + `ctr run`',
    lazy: 'strata, remote snapshots: `ctr-remote images rpull --snapshotter strata` + `ctr run`',
    'warm peer': 'as above, on a node whose peer holds the image (`p2pctl warm`)'
  }
  const rows = SCENARIOS.map((s) => {
    const t = median(results[s].map((x) => x.seconds))
    const bytes = median(results[s].map((x) => x.registryBytes))
    return `| ${what[s]} | ${t.toFixed(2)} s | ${s === 'overlayfs' ? '1.0x' : `${(base / t).toFixed(1)}x`} | ${mib(bytes)} |`
  })
  return [
    '',
    `**${w.name}**: ${w.description}, one layer of ${mib(size)} (gzip); \`${w.command.map(shellQuote).join(' ')}\``,
    '',
    '| how | pull to output | speed-up | from the registry |',
    '| --- | ---: | ---: | ---: |',
    ...rows
  ].join('\n')
}
