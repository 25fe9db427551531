import { readFile, writeFile } from 'node:fs/promises'
import type { Timing } from './lab.js'
import type { ColdResult, FleetResult, P2pdMemory, WarmPeerResult } from './scenarios.js'

/** What one run of the suite measured (test/bench/out/results.json). */
export interface Results {
  date: string
  host: { cpus: number; loadBefore: number[]; loadAfter?: number[]; node: string }
  settings: {
    rttMs: number
    mbit: number
    nodes: number
    runs: number
    scenarios: string[]
    /** Where the nodes ran (absent in runs before the netns lab: loopback). */
    lab?: 'loopback' | 'netns'
    /** netns: each node's link, Mbit/s. */
    nodeMbit?: number
  }
  /** The flags of the run. */
  argv: string[]
  /** Set when the run was stopped before the end: the results hold the measurements made until then. */
  interrupted?: string
  images: ImageResult[]
}

export interface ImageResult {
  name: string
  description: string
  command: string
  rootfsBytes: number
  /** Layer bytes of the plain image (one gzip layer). */
  plainBytes: number
  /** Layer bytes of the eStargz image. */
  esgzBytes: number
  /** Layer bytes of the eStargz image converted with the recorded profile. */
  profileBytes?: number
  /** Files in the recorded profile. */
  profileFiles?: number
  cold?: ColdResult
  warmPeer?: WarmPeerResult
  fleetAlone?: FleetResult
  fleetPeers?: FleetResult
  clusterWarm?: Timing & { fewestPeers: number } & P2pdMemory
  independentWarms?: Timing & P2pdMemory
  /** Measurements that failed: what, and the error. */
  errors?: Record<string, string>
}

export function median(values: number[]): number {
  return percentile(values, 50)
}

/** Nearest-rank percentile. */
export function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b)
  const rank = Math.max(1, Math.ceil((p / 100) * sorted.length))
  return sorted[rank - 1] ?? Number.NaN
}

/** The run of a list whose time is the median (its egress goes with it). */
function typical(runs: Timing[]): Timing {
  const m = median(runs.map((r) => r.ms))
  return runs.find((r) => r.ms === m)!
}

const sec = (ms: number) => (ms / 1000).toFixed(2)
const mib = (bytes: number) => (bytes / 1024 / 1024).toFixed(1)
/** "3.1x faster" / "1.2x slower" of `ms` against `base`. */
const speed = (base: number, ms: number) =>
  ms <= base ? `${(base / ms).toFixed(1)}x faster` : `${(ms / base).toFixed(1)}x slower`
const share = (base: number, bytes: number) => `${(bytes / base).toFixed(2)}x`

/**
 * CPU time per MiB delivered on each path of scenario 3 (ms of user + sys per MiB):
 * - peer path: the fleet's p2pd (serving their peers and fetching for their own node) per MiB the p2pd fetched
 *   from the network (peers and registry: `fetched` without store hits) for their node's reads;
 * - registry path: the fleet's p2p-mounts without peers (fetching from the registry themselves) per MiB the
 *   registry sent;
 * - node, peer path: the peer fleet's p2pd plus its p2p-mounts (which serve FUSE as the lone p2p-mounts do),
 *   per MiB delivered: the whole node's cost, to compare with the registry path's.
 */
interface CpuPerMib {
  peer?: number
  registry?: number
  /** peer / registry. */
  ratio?: number
  peerNode?: number
  /** peerNode / registry. */
  nodeRatio?: number
  /** MiB the peer fleet's p2pd fetched for their nodes, from peers and from the registry. */
  peerMib?: { peer: number; registry: number }
  /** CPU seconds of the whole fleet: with peers (p2pd + p2p-mount), without (the lone p2p-mounts). */
  fleetCpuS?: { peers?: number; alone?: number }
}

function cpuPerMib(img: ImageResult): CpuPerMib {
  const out: CpuPerMib = {}
  const alone = img.fleetAlone
  const peers = img.fleetPeers
  if (alone?.mountCpuMs !== undefined && alone.egress > 0) {
    out.registry = alone.mountCpuMs / (alone.egress / 1024 / 1024)
  }
  if (peers?.p2pdCpuMs !== undefined && peers.p2pdBytes !== undefined) {
    const f = peers.p2pdBytes.fetched
    const delivered = Object.entries(f)
      .filter(([k]) => k !== 'store')
      .reduce((a, [, v]) => a + v, 0)
    out.peerMib = { peer: (f.peer ?? 0) / 1024 / 1024, registry: (f.registry ?? 0) / 1024 / 1024 }
    if (delivered > 0) {
      out.peer = peers.p2pdCpuMs / (delivered / 1024 / 1024)
      if (peers.mountCpuMs !== undefined) {
        out.peerNode = (peers.p2pdCpuMs + peers.mountCpuMs) / (delivered / 1024 / 1024)
      }
    }
  }
  out.fleetCpuS = {
    ...(peers?.p2pdCpuMs !== undefined && peers.mountCpuMs !== undefined
      ? { peers: (peers.p2pdCpuMs + peers.mountCpuMs) / 1000 }
      : {}),
    ...(alone?.mountCpuMs !== undefined ? { alone: alone.mountCpuMs / 1000 } : {})
  }
  if (out.peer !== undefined && out.registry !== undefined) out.ratio = out.peer / out.registry
  if (out.peerNode !== undefined && out.registry !== undefined) out.nodeRatio = out.peerNode / out.registry
  return out
}

/** A line per image with scenario 3's CPU per MiB on each path (empty when not measured). */
export function renderCpuLines(results: Results): string[] {
  const f = (x: number | undefined) => (x === undefined ? '?' : x.toFixed(0))
  const r = (x: number | undefined) => (x === undefined ? '?' : `${x.toFixed(2)}x`)
  const s = (x: number | undefined) => (x === undefined ? '?' : x.toFixed(1))
  return results.images.flatMap((img) => {
    const c = cpuPerMib(img)
    if (c.peer === undefined && c.registry === undefined) return []
    const mib =
      c.peerMib !== undefined
        ? ` over ${c.peerMib.peer.toFixed(1)} MiB from peers + ${c.peerMib.registry.toFixed(1)} from the registry`
        : ''
    return [
      `${img.name}: CPU per MiB (3.): peer path ${f(c.peer)} ms (p2pd serving + fetching${mib}), ` +
        `registry path ${f(c.registry)} ms (p2p-mount), ratio ${r(c.ratio)}; ` +
        `whole node with peers (p2pd + p2p-mount) ${f(c.peerNode)} ms, ratio ${r(c.nodeRatio)}; ` +
        `fleet CPU with peers ${s(c.fleetCpuS?.peers)} s, without ${s(c.fleetCpuS?.alone)} s`
    ]
  })
}

/** One line of the results table. */
interface Row {
  image: string
  scenario: string
  run: string
  time: string
  vsTime: string
  egress: string
  vsEgress: string
  /** The largest peak RSS of the scenario's p2pd (on its first row with p2pd). */
  rss: string
}

function rows(results: Results): Row[] {
  const n = results.settings.nodes
  /** Says so when the cluster was not a full mesh when the scenario started. */
  const mesh = (fewest: number | undefined) =>
    fewest !== undefined && fewest < n - 1 ? ` (not a full mesh: a node saw ${fewest} peers)` : ''
  const out: Row[] = []
  for (const img of results.images) {
    const add = (
      scenario: string,
      run: string,
      time: string,
      vsTime: string,
      egress: string,
      vsEgress: string,
      memory?: P2pdMemory
    ) =>
      out.push({
        image: img.name,
        scenario,
        run,
        time,
        vsTime,
        egress,
        vsEgress,
        rss: memory?.p2pdPeakRss !== undefined ? mib(memory.p2pdPeakRss) : ''
      })
    const full = img.cold !== undefined ? typical(img.cold.full) : undefined
    if (img.cold !== undefined && full !== undefined) {
      const lazy = typical(img.cold.lazy)
      const profile = typical(img.cold.profile)
      add(
        '1. one node, cold',
        'full pull (download, extract, run)',
        sec(full.ms),
        'baseline',
        mib(full.egress),
        '1.00x'
      )
      add(
        '1. one node, cold',
        'lazy (p2p-mount)',
        sec(lazy.ms),
        speed(full.ms, lazy.ms),
        mib(lazy.egress),
        share(full.egress, lazy.egress)
      )
      add(
        '1. one node, cold',
        'lazy, recorded profile',
        sec(profile.ms),
        speed(full.ms, profile.ms),
        mib(profile.egress),
        share(full.egress, profile.egress)
      )
    }
    if (img.warmPeer !== undefined) {
      // The baseline of scenario 2 is a node that has the image already: a local extracted copy.
      const { start, local, extracted } = img.warmPeer
      if (extracted !== undefined) {
        add('2. one node, warm peer', 'local extracted copy (pulled before)', sec(extracted.ms), 'baseline', '', '')
      }
      const vs = (t: Timing) =>
        extracted !== undefined ? speed(extracted.ms, t.ms) : full !== undefined ? speed(full.ms, t.ms) : ''
      add(
        '2. one node, warm peer',
        'p2p-mount through p2pd, from the peer',
        sec(start.ms),
        vs(start),
        mib(start.egress),
        full !== undefined ? share(full.egress, start.egress) : '',
        img.warmPeer
      )
      if (local !== undefined) {
        add('2. one node, warm peer', 'again, from its own store', sec(local.ms), vs(local), mib(local.egress), '')
      }
    }
    const p = (f: FleetResult) => `p50 ${sec(median(f.times))}, p99 ${sec(percentile(f.times, 99))}`
    const alone = img.fleetAlone
    const peers = img.fleetPeers
    if (alone !== undefined) {
      add(`3. ${n} cold nodes at once`, 'lazy, no peers', p(alone), 'baseline', mib(alone.egress), '1.00x')
    }
    if (peers !== undefined) {
      add(
        `3. ${n} cold nodes at once`,
        `lazy through p2pd, with peers${mesh(peers.fewestPeers)}`,
        p(peers),
        alone !== undefined ? `p50 ${speed(median(alone.times), median(peers.times))}` : '',
        mib(peers.egress),
        alone !== undefined ? share(alone.egress, peers.egress) : '',
        peers
      )
    }
    const independent = img.independentWarms
    const cluster = img.clusterWarm
    if (independent !== undefined) {
      add(
        `4. warm-up of ${n} nodes`,
        `${n} independent p2pctl warm`,
        sec(independent.ms),
        'baseline',
        mib(independent.egress),
        '1.00x',
        independent
      )
    }
    if (cluster !== undefined) {
      add(
        `4. warm-up of ${n} nodes`,
        `p2pctl warm --cluster${mesh(cluster.fewestPeers)}`,
        sec(cluster.ms),
        independent !== undefined ? speed(independent.ms, cluster.ms) : '',
        mib(cluster.egress),
        independent !== undefined ? share(independent.egress, cluster.egress) : '',
        cluster
      )
    }
    for (const [what, error] of Object.entries(img.errors ?? {})) {
      add(what, 'FAILED', error.length > 140 ? `...${error.slice(-140)}` : error, '', '', '')
    }
  }
  return out
}

const HEAD: Row = {
  image: 'image',
  scenario: 'scenario',
  run: 'run',
  time: 'time (s)',
  vsTime: 'vs baseline',
  egress: 'registry egress (MiB)',
  vsEgress: 'egress vs baseline',
  rss: 'p2pd peak RSS (MiB)'
}
const COLUMNS = Object.keys(HEAD) as Array<keyof Row>

/** The results as an aligned text table for the terminal. */
export function renderTable(results: Results): string {
  const all = [HEAD, ...rows(results)]
  const width = COLUMNS.map((c) => Math.max(...all.map((r) => r[c].length)))
  const line = (r: Row) =>
    COLUMNS.map((c, i) => r[c].padEnd(width[i]!))
      .join('  ')
      .trimEnd()
  return [line(HEAD), width.map((w) => '-'.repeat(w)).join('  '), ...all.slice(1).map(line)].join('\n')
}

/** One bar of the chart. */
interface Bar {
  label: string
  ms: number
  /** A second mark (p99) drawn as a tick. */
  p99?: number
  color: string
}

const GREY = '#9e9e9e'
const BLUE = '#1565c0'
const GREEN = '#2e7d32'

function bars(img: ImageResult, nodes: number): Bar[] {
  const out: Bar[] = []
  if (img.cold !== undefined) {
    out.push({ label: 'full pull', ms: typical(img.cold.full).ms, color: GREY })
    out.push({ label: 'lazy', ms: typical(img.cold.lazy).ms, color: BLUE })
    out.push({ label: 'lazy, recorded profile', ms: typical(img.cold.profile).ms, color: BLUE })
  }
  if (img.warmPeer?.extracted !== undefined) {
    out.push({ label: 'local extracted copy', ms: img.warmPeer.extracted.ms, color: GREY })
  }
  if (img.warmPeer !== undefined) out.push({ label: 'warm peer', ms: img.warmPeer.start.ms, color: GREEN })
  const p99 = (f: FleetResult) => percentile(f.times, 99)
  const { fleetAlone: alone, fleetPeers: peers } = img
  if (alone !== undefined) {
    out.push({ label: `${nodes} at once, no peers (p50)`, ms: median(alone.times), p99: p99(alone), color: BLUE })
  }
  if (peers !== undefined) {
    out.push({ label: `${nodes} at once, peers (p50)`, ms: median(peers.times), p99: p99(peers), color: GREEN })
  }
  return out
}

const xml = (s: string) => s.replaceAll('&', '&amp;').replaceAll('<', '&lt;').replaceAll('>', '&gt;')

/**
 * A horizontal bar chart of time to ready per scenario, grouped by image (SVG). Each image has its own time
 * scale: one slow scenario would flatten every other bar of the chart.
 */
export function renderChart(results: Results): string {
  const groups = results.images.map((img) => ({ img, bars: bars(img, results.settings.nodes) }))
  const left = 220
  const plot = 440
  const barH = 16
  const gap = 6
  const parts: string[] = []
  let y = 40
  for (const { img, bars: list } of groups) {
    parts.push(`<text x="10" y="${y + 12}" font-weight="bold">${xml(`${img.name}: ${img.command}`)}</text>`)
    y += 22
    const max = Math.max(1, ...list.map((b) => b.p99 ?? b.ms))
    for (const b of list) {
      const w = Math.max(1, (b.ms / max) * plot)
      parts.push(`<text x="${left - 8}" y="${y + 12}" text-anchor="end">${xml(b.label)}</text>`)
      parts.push(`<rect x="${left}" y="${y}" width="${w.toFixed(1)}" height="${barH}" fill="${b.color}"/>`)
      let labelX = left + w + 6
      if (b.p99 !== undefined) {
        const x = left + (b.p99 / max) * plot
        parts.push(`<line x1="${x.toFixed(1)}" x2="${x.toFixed(1)}" y1="${y - 2}" y2="${y + barH + 2}" stroke="#000"/>`)
        labelX = Math.max(labelX, x + 6)
      }
      const text = `${sec(b.ms)} s${b.p99 !== undefined ? ` (p99 ${sec(b.p99)})` : ''}`
      parts.push(`<text x="${labelX.toFixed(1)}" y="${y + 12}">${text}</text>`)
      y += barH + gap
    }
    y += 12
  }
  const width = left + plot + 180
  const s = results.settings
  const title = `Time to ready (s), ${s.rttMs} ms RTT, ${s.mbit} Mbit/s to the registry; tick: p99; scale per image`
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${y + 10}" font-family="sans-serif" font-size="12">`,
    `<rect width="100%" height="100%" fill="#fff"/>`,
    `<text x="10" y="20" font-size="14" font-weight="bold">${xml(title)}</text>`,
    ...parts,
    '</svg>',
    ''
  ].join('\n')
}

export const BEGIN = '<!-- bench:begin: generated by `pnpm bench` (test/bench/report.ts); do not edit by hand -->'
export const END = '<!-- bench:end -->'

/** docs/benchmarks.md's "End-to-end (pnpm bench)" section. */
export function renderMarkdown(results: Results): string {
  const argv = results.argv
  const s = results.settings
  const h = results.host
  const load = (l: number[] | undefined) => (l === undefined ? '?' : l.map((x) => x.toFixed(1)).join(' '))
  /** A markdown table whose first `text` columns are left-aligned, the rest (figures) right-aligned. */
  const table = (head: string[], body: string[][], text: number) =>
    [head, head.map((_, i) => (i < text ? '---' : '---:')), ...body].map((r) => `| ${r.join(' | ')} |`).join('\n')
  const images = table(
    ['image', 'command', 'root fs (MiB)', 'plain gzip (MiB)', 'eStargz (MiB)', 'with profile (MiB, files)'],
    results.images.map((i) => [
      `${i.name}: ${i.description}`,
      `\`${i.command}\``,
      mib(i.rootfsBytes),
      mib(i.plainBytes),
      mib(i.esgzBytes),
      i.profileBytes !== undefined ? `${mib(i.profileBytes)} (${i.profileFiles})` : ''
    ]),
    2
  )
  const phases = (t: Timing) =>
    Object.entries(t.phases)
      .map(([k, v]) => `${k} ${sec(v)}`)
      .join(' + ')
  const phaseLines = results.images.flatMap((i) => {
    const parts: string[] = []
    if (i.cold !== undefined) {
      parts.push(`full pull ${phases(typical(i.cold.full))}`)
      parts.push(`lazy ${phases(typical(i.cold.lazy))}`)
      parts.push(`profile ${phases(typical(i.cold.profile))}`)
    }
    if (i.warmPeer !== undefined) parts.push(`warm peer ${phases(i.warmPeer.start)}`)
    if (i.warmPeer?.local !== undefined) parts.push(`own store ${phases(i.warmPeer.local)}`)
    return parts.length > 0 ? [`- ${i.name}: ${parts.join('; ')}`] : []
  })
  const r = rows(results)
  const resultTable = table(
    COLUMNS.map((c) => HEAD[c]),
    r.map((row) => COLUMNS.map((c) => row[c])),
    3
  )
  return `${BEGIN}
## End-to-end (pnpm bench)

Measured ${results.date.slice(0, 16).replace('T', ' ')} UTC on ${h.cpus} CPUs shared with other work (load ${load(h.loadBefore)} before,
${load(h.loadAfter)} after), Node ${h.node}, with \`node --no-warnings test/bench/run.ts${argv.length > 0 ? ` ${argv.join(' ')}` : ''}\`.
The registry (CNCF distribution 2.8, loopback) sits behind the WAN emulator (test/helpers/wan-proxy.ts):
${s.rttMs} ms per round trip, ${s.mbit} Mbit/s each way, one link shared by every node. ${s.lab === 'netns' ? `Each node runs in its own network namespace on a ${s.nodeMbit} Mbit/s link (tc tbf, no added delay) to a bridge.` : 'Peers talk over loopback.'}
Everything runs as an operator would: \`p2pd\`, \`p2p-mount\`, \`p2pctl\` as separate processes; every start
is cold (a fresh data dir). Scenario 1 is the median of ${s.runs} run(s) (runs alternate); the others are single runs.
Time to ready ends when the command has exited with the expected output; egress is what the registry sent through
the emulated link (headers included), until the processes of the run have exited. p2pd peak RSS is the largest peak
resident set (VmHWM) of the scenario's p2pd processes, read just before they stop (scenario 2: the warm peer too).

${images}

${resultTable}
${renderCpuLines(results)
  .map((l) => `\n- ${l}`)
  .join('')}

${results.interrupted !== undefined ? `**This run was stopped early (${results.interrupted}): what is missing was not measured.**\n\n` : ''}Phases of the typical runs (s):
${phaseLines.join('\n')}

![time to ready per scenario](bench/time-to-ready.svg)

How each start is made:
- full pull: \`skopeo copy docker://REF oci:DIR\` through the WAN, \`tar -xzf\` of each layer, \`chroot DIR COMMAND\`;
- lazy: \`p2p-mount REF MNT --writable\` with no p2pd (its own store), eStargz image from \`p2pctl convert\`,
  then \`chroot MNT COMMAND\`;
- recorded profile: the first lazy start ran with \`--record FILE\`; \`p2pctl convert --prioritized-file FILE\` of the
  plain image made the profiled image, which scenarios 2-4 use;
- with peers: \`p2p-mount REF MNT --socket SOCKET --writable\`: the node's p2pd serves the mount (its store,
  then its peers, then the registry); the node is cold, the peer of scenario 2 ran \`p2pctl warm REF\` before;
  "again, from its own store" is the same node's second start, with the page cache dropped;
- local extracted copy: the plain image pulled and extracted before (not timed), the page cache dropped
  (\`echo 3 > /proc/sys/vm/drop_caches\`), then \`chroot DIR COMMAND\`;
- ${s.nodes} at once: every node mounts and runs at the same moment, each with its own store (and its own p2pd);
- cluster warm-up: \`p2pctl warm REF --cluster\` on one node of ${s.nodes} (until every node holds the image),
  against ${s.nodes} p2pd with no peers each running \`p2pctl warm REF\` at once.
${END}
`
}

/** Replaces the generated section of docs/benchmarks.md (between the markers), or appends it. */
export async function updateDocs(path: string, section: string): Promise<void> {
  const text = await readFile(path, 'utf8').catch(() => '# Benchmarks\n')
  const begin = text.indexOf(BEGIN)
  const end = text.indexOf(END)
  const next =
    begin >= 0 && end > begin
      ? text.slice(0, begin) + section.trimEnd() + text.slice(end + END.length)
      : `${text.trimEnd()}\n\n${section}`
  await writeFile(path, next)
}
