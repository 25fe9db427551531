// The containerd benchmark's report (see bench-main.ts): per image, a table of medians, each figure as a ratio
// against its baseline of the same run, the issue's three goals, and where the first lazy start's time goes.
import type { Phase, Sample, Scenario } from './bench-run.js'

export interface ImageResults {
  name: string
  description: string
  /** The command as shown. */
  command: string
  /** Compressed sizes of the plain and eStargz images. */
  plainBytes: number
  lazyBytes: number
  results: Partial<Record<Scenario, Sample[]>>
}

export interface Goal {
  image: string
  what: string
  ratio: number
  /** The goal as text, e.g. `>= 10x faster`. */
  goal: string
  met: boolean
}

export const mib = (b: number) => `${(b / 1048576).toFixed(1)} MiB`
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.floor(s.length / 2)]!
}
const medianPhase = (ps: Phase[]): Phase => ({
  seconds: median(ps.map((p) => p.seconds)),
  registryBytes: median(ps.map((p) => p.registryBytes))
})

/** The median first container, second container and phases of a scenario (undefined when not measured). */
function typical(samples: Sample[] | undefined) {
  if (samples === undefined || samples.length === 0) return undefined
  const seconds = samples.flatMap((s) => (s.second !== undefined ? [s.second] : []))
  const each = (all: Array<Record<string, Phase> | undefined>) => {
    const got = all.filter((p) => p !== undefined)
    if (got.length === 0) return undefined
    return Object.fromEntries(Object.keys(got[0]!).map((n) => [n, medianPhase(got.map((p) => p[n]!))]))
  }
  return {
    first: medianPhase(samples.map((s) => s.first)),
    second: seconds.length > 0 ? medianPhase(seconds) : undefined,
    phases: each(samples.map((s) => s.phases)),
    secondPhases: each(samples.map((s) => s.secondPhases))
  }
}

const s2 = (p: Phase) => `${p.seconds.toFixed(2)} s`
const x = (r: number) => `${r >= 10 ? r.toFixed(0) : r >= 2 ? r.toFixed(1) : r.toFixed(2)}x`
/** A speed-up (baseline time / time) as words. */
const speedUp = (r: number) => (r >= 1 ? `${x(r)} faster` : `${x(1 / r)} slower`)

export function goals(img: ImageResults): Goal[] {
  const over = typical(img.results.overlayfs)
  const lazy = typical(img.results.lazy)
  const peer = typical(img.results['warm peer'])
  const out: Goal[] = []
  if (over === undefined) return out
  if (lazy !== undefined) {
    const r = over.first.seconds / lazy.first.seconds
    out.push({ image: img.name, what: 'lazy vs the overlayfs pull', ratio: r, goal: '>= 10x faster', met: r >= 10 })
  }
  if (over.second !== undefined && lazy?.second !== undefined) {
    const r = lazy.second.seconds / over.second.seconds
    out.push({
      image: img.name,
      what: "strata's second container vs overlayfs' second container",
      ratio: r,
      goal: '<= 1.5x',
      met: r <= 1.5
    })
  }
  if (over.second !== undefined && peer !== undefined) {
    const r = peer.first.seconds / over.second.seconds
    out.push({
      image: img.name,
      what: "the first container with a warm peer vs overlayfs' second container",
      ratio: r,
      goal: '<= 2x',
      met: r <= 2
    })
  }
  return out
}

export function imageSection(img: ImageResults): string[] {
  const t = Object.fromEntries(Object.entries(img.results).map(([k, v]) => [k, typical(v)])) as Partial<
    Record<Scenario, ReturnType<typeof typical>>
  >
  const over = t.overlayfs
  const rows: string[] = []
  const row = (how: string, p: Phase, against: string) =>
    rows.push(`| ${how} | ${s2(p)} | ${against} | ${mib(p.registryBytes)} |`)
  const faster = (p: Phase) =>
    over !== undefined ? `${speedUp(over.first.seconds / p.seconds)} than overlayfs' pull` : ''
  const ofSecond = (p: Phase) =>
    over?.second !== undefined ? `${x(p.seconds / over.second.seconds)} overlayfs' second container` : ''
  if (over !== undefined) row("containerd's overlayfs: `ctr pull` + `ctr run`", over.first, 'baseline')
  if (t.strata !== undefined) {
    row(
      'strata without labels: `ctr pull --snapshotter strata` (unpacked) + `ctr run`',
      t.strata.first,
      faster(t.strata.first)
    )
  }
  if (t.lazy !== undefined) {
    row('strata lazy: `ctr-remote images rpull --snapshotter strata` + `ctr run`', t.lazy.first, faster(t.lazy.first))
  }
  if (t.cri !== undefined) {
    row(
      'strata lazy through CRI: PullImage, RunPodSandbox, CreateContainer, StartContainer, exit',
      t.cri.first,
      faster(t.cri.first)
    )
  }
  if (over?.second !== undefined) row("overlayfs' second container (`ctr run` again)", over.second, 'baseline')
  if (t.strata?.second !== undefined) {
    row("strata without labels' second container", t.strata.second, ofSecond(t.strata.second))
  }
  if (t.lazy?.second !== undefined) {
    row("strata lazy's second container (`ctr run` again)", t.lazy.second, ofSecond(t.lazy.second))
  }
  if (t['warm peer'] !== undefined) {
    const p = t['warm peer'].first
    row(
      'strata lazy, first container on a node whose peer holds the image (`p2pctl warm`)',
      p,
      `${ofSecond(p)} (${faster(p)})`
    )
  }
  const phases = (name: string, ps: Record<string, Phase> | undefined) =>
    ps === undefined
      ? []
      : [
          `- ${name}: ${Object.entries(ps)
            .map(([k, p]) => `${k} ${s2(p)}${p.registryBytes >= 1 << 20 ? ` (${mib(p.registryBytes)})` : ''}`)
            .join(', ')}`
        ]
  return [
    '',
    `**${img.name}**: ${img.description}; gzip ${mib(img.plainBytes)}, eStargz ${mib(img.lazyBytes)}; \`${img.command}\``,
    '',
    '| how | pull to exit | against its baseline | from the registry |',
    '| --- | ---: | --- | ---: |',
    ...rows,
    '',
    'Goals: ' +
      goals(img)
        .map(
          (g) =>
            `${g.what}: ${g.goal.endsWith('faster') ? speedUp(g.ratio) : x(g.ratio)} (goal ${g.goal}: ${g.met ? 'met' : 'missed'})`
        )
        .join('; ') +
      '.',
    '',
    'Phases of the first container (medians; create = snapshot Prepare, with strata the merged-root FUSE mount;',
    'start = the rootfs overlay mount, runc and the command with its first reads):',
    ...phases('overlayfs', over?.phases),
    ...phases('strata lazy', t.lazy?.phases),
    ...phases('strata lazy, warm peer', t['warm peer']?.phases),
    ...phases('strata lazy through CRI', t.cri?.phases),
    '',
    'A later container in the same steps (a third one: `ctr containers create`, `ctr tasks start`, `ctr containers rm`):',
    ...phases('overlayfs', over?.secondPhases),
    ...phases('strata without labels', t.strata?.secondPhases),
    ...phases('strata lazy', t.lazy?.secondPhases),
    ...phases('strata lazy, warm peer', t['warm peer']?.secondPhases)
  ]
}

/** The short table of docs/benchmarks.md: one row per image, each figure against its baseline. */
export function summary(images: ImageResults[]): string[] {
  const rows = images.map((img) => {
    const over = typical(img.results.overlayfs)
    const lazy = typical(img.results.lazy)
    const cri = typical(img.results.cri)
    const peer = typical(img.results['warm peer'])
    const cell = (p: Phase | undefined, base: Phase | undefined, faster: boolean) =>
      p === undefined || base === undefined
        ? '-'
        : `${s2(p)} (${faster ? speedUp(base.seconds / p.seconds) : x(p.seconds / base.seconds)})`
    return `| ${img.name} | ${over !== undefined ? s2(over.first) : '-'} | ${cell(lazy?.first, over?.first, true)} | ${cell(cri?.first, over?.first, true)} | ${over?.second !== undefined ? s2(over.second) : '-'} | ${cell(lazy?.second, over?.second, false)} | ${cell(peer?.first, over?.second, false)} |`
  })
  return [
    '| image | overlayfs pull + run | lazy (goal >= 10x faster) | lazy, CRI | overlayfs 2nd container | strata 2nd container (goal <= 1.5x) | warm peer, 1st container (goal <= 2x) |',
    '| --- | ---: | ---: | ---: | ---: | ---: | ---: |',
    ...rows
  ]
}
