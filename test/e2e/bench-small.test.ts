import { spawn } from 'node:child_process'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { repoRoot } from '@test/tools.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Results } from '../bench/report.js'

// The CI version of `pnpm bench`: one host-rootfs image (python3 and its standard library), three nodes, one
// run of each start, through the real CLIs. The suite itself checks every command's output in every mount.

let work: string
let results: Results

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'strata-bench-small-'))
  const out = join(work, 'results.json')
  const runBench = () =>
    new Promise<{ code: number | null; stderr: string }>((resolve) => {
      const child = spawn(
        process.execPath,
        ['--no-warnings', join(repoRoot, 'test', 'bench', 'run.ts'), '--small', '--no-docs', '--out', out],
        { stdio: ['ignore', 'ignore', 'pipe'] }
      )
      let err = ''
      child.stderr.setEncoding('utf8').on('data', (d: string) => {
        err += d
      })
      child.once('close', (c) => resolve({ code: c, stderr: err }))
    })
  // Run once: a failure is a bug to fix, not to measure again. (`p2pctl warm --cluster` failed about 1 run in 6
  // under load until p2pd stopped letting libp2p abort busy connections; test/p2p/cluster-warm-repeat.test.ts.)
  const { code, stderr } = await runBench()
  expect(code, stderr).toBe(0)
  results = JSON.parse(await readFile(out, 'utf8')) as Results
}, 480_000)

afterAll(async () => {
  await rm(work, { recursive: true, force: true })
})

describe('pnpm bench --small', () => {
  it('ran every scenario on one image with three nodes', () => {
    expect(results.settings).toMatchObject({ nodes: 3, runs: 1 })
    expect(results.images.map((i) => i.name)).toEqual(['host'])
    const image = results.images[0]!
    expect(image.cold?.full).toHaveLength(1)
    expect(image.errors).toBeUndefined()
    expect(image.fleetAlone?.times).toHaveLength(3)
    expect(image.fleetPeers?.times).toHaveLength(3)
    expect(image.profileFiles).toBeGreaterThan(0)
    // p2pd's peak RSS, for every scenario with p2pd.
    for (const s of [image.warmPeer, image.fleetPeers, image.clusterWarm, image.independentWarms])
      expect(s?.p2pdPeakRss).toBeGreaterThan(50 * 1024 * 1024)
  })

  it('a lazy start beats a full pull, in time and in registry egress', () => {
    const cold = results.images[0]!.cold!
    const full = cold.full[0]!
    for (const lazy of [cold.lazy[0]!, cold.profile[0]!]) {
      expect(lazy.ms).toBeLessThan(full.ms)
      expect(lazy.egress).toBeLessThan(full.egress / 2)
    }
  })

  it('peers cut registry egress', () => {
    const image = results.images[0]!
    // A node whose peer holds the image takes no chunk from the registry (manifest and TOC requests only).
    expect(image.warmPeer!.start.egress).toBeLessThan(image.esgzBytes / 10)
    // Three cold nodes starting at once through their p2pd fetch what the command reads about once, not three times.
    expect(image.fleetPeers!.egress).toBeLessThan(0.75 * image.fleetAlone!.egress)
    const cluster = image.clusterWarm!
    const independent = image.independentWarms!
    expect(independent.egress).toBeGreaterThan(2.5 * image.esgzBytes)
    expect(cluster.egress).toBeLessThan(independent.egress / 2)
  })
})
