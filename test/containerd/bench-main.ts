// The containerd benchmark (see bench.ts): the end-to-end bench's images (test/bench/images.ts: python3 and gcc
// from debootstrap, node from this machine), each as gzip and as its eStargz conversion, pulled and run these
// ways, each on a fresh containerd and fresh p2pd data directories, the registry behind the WAN emulator:
//   overlayfs    containerd's own snapshotter: ctr pull (download + unpack) + ctr run, then a second ctr run
//   strata       strata without labels: ctr pull --snapshotter strata (containerd unpacks into strata) + ctr run
//   lazy         ctr-remote rpull --snapshotter strata (remote snapshots, nothing downloaded) + ctr run, then a
//                second ctr run
//   warm peer    as lazy, on a second node whose peer ran `p2pctl warm` on the image first
//   cri          CRI PullImage + RunPodSandbox + CreateContainer + StartContainer to the exit, strata lazy
// The first container is run as `ctr containers create` + `ctr tasks start` (what `ctr run` does) to time both.
import { execFileSync } from 'node:child_process'
import { readFile, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { writeDocSection } from '../../packages/node/bench/doc-section.js'
import { goals, type ImageResults, imageSection, mib, summary } from './bench-report.js'
import type { Sample, Scenario } from './bench-run.js'

const USAGE = `Usage: node --no-warnings test/containerd/bench.ts [options]

  --images LIST   of python3, gcc, node, host (default: python3,gcc,node)
  --scenarios L   of overlayfs, strata, lazy, warm peer, cri (default: all; "warm-peer" for "warm peer")
  --runs N        runs of each scenario; the report takes the median (default: 3)
  --rtt-ms MS     round trip added to every registry connection (default: 20)
  --mbit N        registry uplink bandwidth, Mbit/s (default: 100)
  --cache DIR     root file systems, images and conversions (default: /var/cache/strata-bench)
  --out FILE      results JSON (default: $TMPDIR/strata-containerd-bench.json)
  --docs          write docs/containerd.md's Measured section and docs/benchmarks.md's section
  --from FILE     measure nothing: print (and with --docs write) the report of an earlier run's JSON`

const MARK_START = '<!-- containerd-bench:start -->'
const MARK_END = '<!-- containerd-bench:end -->'
const DOC_TITLE = 'containerd: ctr and CRI (test/containerd/bench.ts)'

/** What the containers run, where the end-to-end bench's command needs standard input (ctr and CRI give none). */
const COMMANDS: Record<string, { command: string[]; shown: string }> = {
  gcc: {
    command: [
      'sh',
      '-c',
      `printf '%s\\n' '#include <stdio.h>' 'int main(void) { puts("hello"); return 0; }' | gcc -x c -o /tmp/hello - && /tmp/hello`
    ],
    shown: 'sh -c "printf ... hello.c ... | gcc -x c -o /tmp/hello - && /tmp/hello"'
  }
}

interface Results {
  date: string
  commit: string
  runs: number
  rttMs: number
  mbit: number
  loadBefore: string
  loadAfter: string
  /** Wall-clock minutes of the measuring. */
  minutes: number
  images: ImageResults[]
}

const log = (line: string) => process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${line}\n`)
const loadavg = async () => (await readFile('/proc/loadavg', 'utf8')).split(' ').slice(0, 3).join(' ')

export async function main(argv: string[]): Promise<number> {
  const { values: v } = parseArgs({
    args: argv,
    options: {
      images: { type: 'string', default: 'python3,gcc,node' },
      scenarios: { type: 'string', default: 'overlayfs,strata,lazy,warm-peer,cri' },
      runs: { type: 'string', default: '3' },
      'rtt-ms': { type: 'string', default: '20' },
      mbit: { type: 'string', default: '100' },
      cache: { type: 'string', default: '/var/cache/strata-bench' },
      out: { type: 'string', default: join(tmpdir(), 'strata-containerd-bench.json') },
      docs: { type: 'boolean', default: false },
      from: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false }
    }
  })
  if (v.help) {
    process.stdout.write(`${USAGE}\n`)
    return 0
  }
  let results: Results
  if (v.from !== undefined) {
    results = JSON.parse(await readFile(v.from, 'utf8')) as Results
  } else {
    const scenarios = v.scenarios.split(',').map((s) => (s === 'warm-peer' ? 'warm peer' : s)) as Scenario[]
    results = await measureAll({
      images: v.images.split(','),
      scenarios,
      runs: Number(v.runs),
      rttMs: Number(v['rtt-ms']),
      mbit: Number(v.mbit),
      cache: v.cache
    })
    await writeFile(v.out, `${JSON.stringify(results, null, 2)}\n`)
    log(`results in ${v.out}`)
  }
  const text = render(results)
  process.stdout.write(`${text.join('\n')}\n`)
  if (v.docs) await writeDocs(results, text)
  return 0
}

interface Settings {
  images: string[]
  scenarios: Scenario[]
  runs: number
  rttMs: number
  mbit: number
  cache: string
}

async function measureAll(s: Settings): Promise<Results> {
  // Loaded only to measure: --from needs no build.
  const { measure, SCENARIOS } = await import('./bench-run.js')
  const { convert, prepareImage, WORKLOADS } = await import('../bench/images.js')
  const { startRegistry } = await import('@test/registry.js')
  const { startWanProxy } = await import('@test/wan-proxy.js')
  const { repoRoot, run } = await import('@test/tools.js')
  const { buildRunnableImage } = await import('./images.js')
  const { existsSync } = await import('node:fs')
  for (const sc of s.scenarios) if (!SCENARIOS.includes(sc)) throw new Error(`unknown scenario '${sc}'`)
  const ctrRemote = process.env.STRATA_CTR_REMOTE ?? join(repoRoot, '.tools', 'ctr-remote', 'ctr-remote')
  if (!existsSync(ctrRemote)) throw new Error(`no ctr-remote at ${ctrRemote}: run scripts/setup.sh`)
  const aborter = new AbortController()
  const registry = await startRegistry()
  const wan = await startWanProxy({ target: registry.host, rttMs: s.rttMs, bitsPerSecond: s.mbit * 1e6 })
  try {
    const push = async (dir: string, tag: string, repository: string) => {
      await run('skopeo', [
        'copy',
        '--quiet',
        '--dest-tls-verify=false',
        `oci:${dir}:${tag}`,
        `docker://${registry.host}/${repository}`
      ])
      return `${wan.host}/${repository}`
    }
    const pause = await buildRunnableImage({
      registry: registry.host,
      repository: 'bench/pause',
      estargz: true,
      programs: ['sleep'],
      entrypoint: ['/usr/bin/sleep', 'infinity']
    })
    const subjects = []
    for (const name of s.images) {
      const workload = WORKLOADS[name]
      if (workload === undefined) throw new Error(`unknown image '${name}'`)
      const options = { signal: aborter.signal, log }
      const image = await prepareImage(workload, s.cache, options)
      const esgz = await convert(image, s.cache, undefined, options)
      const { command, shown } = COMMANDS[name] ?? { command: workload.argv, shown: workload.shown }
      subjects.push({
        workload,
        command,
        result: {
          name,
          description: workload.description,
          command: shown,
          plainBytes: image.plain.bytes,
          lazyBytes: esgz.layout.bytes,
          results: {}
        } as ImageResults,
        plain: await push(image.plain.dir, image.plain.tag, `bench/${name}:plain`),
        lazy: await push(esgz.layout.dir, esgz.layout.tag, `bench/${name}:esgz`)
      })
    }
    const loadBefore = await loadavg()
    const started = Date.now()
    log(`measuring; load average ${loadBefore}`)
    for (let i = 0; i < s.runs; i++) {
      for (const subject of subjects) {
        for (const scenario of s.scenarios) {
          const sample: Sample = await measure(scenario, {
            wan,
            ctrRemote,
            plain: subject.plain,
            lazy: subject.lazy,
            pause: pause.ref,
            insecure: [registry.host, wan.host],
            id: `bench${i}`,
            command: subject.command,
            output: subject.workload.stdout
          })
          subject.result.results[scenario] = [...(subject.result.results[scenario] ?? []), sample]
          const phases = Object.entries(sample.phases)
            .map(([k, p]) => `${k} ${p.seconds.toFixed(2)}`)
            .join(', ')
          log(
            `${subject.result.name} run ${i + 1}/${s.runs} ${scenario}: ${sample.first.seconds.toFixed(2)} s (${phases}), ` +
              `${mib(sample.first.registryBytes)} from the registry` +
              (sample.second !== undefined ? `; second container ${sample.second.seconds.toFixed(2)} s` : '') +
              `; load ${await loadavg()}`
          )
        }
      }
    }
    return {
      date: new Date().toISOString(),
      commit: execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: repoRoot, encoding: 'utf8' }).trim(),
      runs: s.runs,
      rttMs: s.rttMs,
      mbit: s.mbit,
      loadBefore,
      loadAfter: await loadavg(),
      minutes: (Date.now() - started) / 60_000,
      images: subjects.map((x) => x.result)
    }
  } finally {
    aborter.abort()
    await wan.stop().catch(() => {})
    await registry.stop().catch(() => {})
  }
}

function render(r: Results): string[] {
  return [
    `Registry behind the WAN emulator (${r.mbit} Mbit/s, ${r.rttMs} ms RTT); a fresh containerd and fresh p2pd data`,
    `directories for every first start; time from the pull to the command's exit, median of ${r.runs} run${r.runs > 1 ? 's' : ''}`,
    `(\`node --no-warnings test/containerd/bench.ts\`, ${r.date.slice(0, 16).replace('T', ' ')} UTC, built from ${r.commit};`,
    `${r.minutes.toFixed(0)} minutes on 2 cores shared with other jobs: load average ${r.loadBefore} before, ${r.loadAfter} after).`,
    'Each figure is against its baseline of the same run: first containers against the overlayfs pull, second',
    "containers and the warm peer's first against overlayfs' second container.",
    ...r.images.flatMap(imageSection)
  ]
}

async function writeDocs(r: Results, text: string[]): Promise<void> {
  const { repoRoot } = await import('@test/tools.js')
  const doc = join(repoRoot, 'docs', 'containerd.md')
  const body = await readFile(doc, 'utf8')
  const start = body.indexOf(MARK_START)
  const end = body.indexOf(MARK_END)
  if (start < 0 || end < start) throw new Error(`${doc} has no ${MARK_START} ... ${MARK_END} section`)
  await writeFile(doc, `${body.slice(0, start + MARK_START.length)}\n${text.join('\n')}\n${body.slice(end)}`)
  const all = r.images.flatMap(goals)
  const met = all.filter((g) => g.met).length
  await writeDocSection(DOC_TITLE, [
    `Measured ${r.date.slice(0, 16).replace('T', ' ')} UTC (built from ${r.commit}), median of ${r.runs} run${r.runs > 1 ? 's' : ''},`,
    `registry behind the WAN emulator (${r.mbit} Mbit/s, ${r.rttMs} ms), load average ${r.loadBefore} before and`,
    `${r.loadAfter} after on 2 shared cores; \`node --no-warnings test/containerd/bench.ts --docs\`. Time from the pull`,
    "(`ctr pull`, `ctr-remote images rpull`, CRI PullImage) to the command's exit; in brackets, against the",
    "baseline of the same run: the overlayfs pull for first containers, overlayfs' second container for second",
    "containers and the warm peer. Details, the strata-without-labels row and each start's phases: docs/containerd.md,",
    '"Measured".',
    '',
    ...summary(r.images),
    '',
    `Goals met: ${met} of ${all.length}.`
  ])
}
