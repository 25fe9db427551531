import { execFile } from 'node:child_process'
import { mkdir, mkdtemp, rm, statfs, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import type { NodeStatus, WarmResult } from '@strata/node'
import { buildCli, startP2pd } from '@test/cluster.js'
import { buildTestImage, type TestImage } from '@test/images.js'
import { noiseTree } from '@test/noise.js'
import { freePort, startRegistry, type TestRegistry } from '@test/registry.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

// p2pd on a real full disk (a tmpfs data dir; the tests run as root) and under a cap smaller than the image:
// p2pctl warm says the image did not stay, p2pd logs it once and counts it, and starts again on the full disk.

const exec = promisify(execFile)
let work: string
let registry: TestRegistry
/** About 12 MiB of incompressible files: more than an 8 MiB disk holds. */
let image: TestImage
const mounts: string[] = []

async function tmpfs(size: string): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'strata-p2pd-full-'))
  await exec('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir])
  mounts.push(dir)
  return dir
}

const free = async (dir: string) => {
  const s = await statfs(dir)
  return s.bavail * s.bsize
}

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'strata-p2pd-full-work-'))
  await buildCli()
  registry = await startRegistry()
  image = await buildTestImage({
    registry: registry.host,
    repository: 'full/app',
    estargz: true,
    gzipLevel: 1,
    layers: [{ files: await noiseTree(join(work, 'l0'), 200, (i) => 20_000 + ((i * 7919) % 80_000), 7) }]
  })
})

afterAll(async () => {
  for (const dir of mounts) await exec('umount', ['-l', dir]).catch(() => {})
  for (const dir of mounts) await rm(dir, { recursive: true, force: true })
  await registry?.stop()
  if (work !== undefined) await rm(work, { recursive: true, force: true })
})

describe('p2pctl warm when the image does not stay', () => {
  it('on a full disk: exit 1 and a warning, "complete": false, one log line, counted in status and metrics; p2pd starts again', async () => {
    const dataDir = await tmpfs('8m')
    const metricsPort = await freePort()
    const start = () =>
      startP2pd({
        dataDir,
        insecureRegistry: [registry.host],
        args: ['--metrics-listen', `127.0.0.1:${metricsPort}`]
      })
    const node = await start()
    try {
      const text = await node.p2pctl(['warm', image.ref])
      expect(text.code).toBe(1)
      // The line operators' scripts read is still there; the warning says what stayed and why.
      expect(text.stderr).toMatch(new RegExp(`^warm ${image.ref}: \\d+ chunks, [\\d.]+ MiB in [\\d.]+s$`, 'm'))
      const warning =
        /^warning: only (\d+) of (\d+) chunks \(.+ of .+\) stayed in p2pd's store: (\d+) writes to it failed \(is its disk full\? p2pd's log says why\)$/m.exec(
          text.stderr
        )
      expect(warning, text.stderr).not.toBeNull()
      const [held, total] = [Number(warning![1]), Number(warning![2])]
      expect(held).toBeGreaterThan(0)
      expect(held).toBeLessThan(total)

      const json = await node.p2pctl(['warm', image.ref, '--json'])
      expect(json.code).toBe(1)
      const result = JSON.parse(json.stdout) as WarmResult
      expect(result).toMatchObject({ complete: false, totalChunks: total })
      expect(result.held.chunks).toBeLessThan(total)
      const status = await node.client.get<NodeStatus>('/status')
      expect(status.store.chunks).toBe(result.held.chunks)
      expect(status.store.writeErrors).toBeGreaterThan(0)

      // Logged once per cause, however many puts failed; counted in full.
      const logged = node.stderr().match(/the chunk store failed to write/g) ?? []
      expect(logged, node.stderr()).toHaveLength(1)
      expect(node.stderr()).toMatch(
        /the chunk store failed to write \(put\): cannot store chunk sha256:\S+: the disk holding the store at \S+ is full/
      )
      const metrics = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text()
      expect(metrics).toMatch(new RegExp(`^strata_store_errors_total ${status.store.writeErrors}$`, 'm'))
      const human = await node.p2pctl(['status'])
      expect(human.stdout).toMatch(new RegExp(`^store-errors: ${status.store.writeErrors}$`, 'm'))
    } finally {
      expect(await node.stop()).toBe(0)
    }

    // The store kept headroom for its index: p2pd starts again on the disk it filled.
    const again = await start()
    const before = (await again.client.get<NodeStatus>('/status')).store.chunks
    expect(before).toBeGreaterThan(0)
    expect(await again.stop()).toBe(0)

    // Another program takes nearly all the rest: p2pd makes room by evicting unpinned chunks, and starts.
    await writeFile(join(dataDir, 'filler'), new Uint8Array(Math.max(0, (await free(dataDir)) - 256 * 1024)))
    const roomMade = await start()
    const after = (await roomMade.client.get<NodeStatus>('/status')).store
    expect(after.chunks).toBeLessThan(before)
    expect(after.evictions).toBeGreaterThan(0)
    expect(await free(dataDir)).toBeGreaterThanOrEqual(1024 * 1024)
    expect(await roomMade.stop()).toBe(0)

    // With not a byte left, it says plainly that the disk is full (not that permissions are wrong).
    await writeFile(join(dataDir, 'filler2'), new Uint8Array(await free(dataDir))).catch(() => {})
    const err = await start().catch((e: unknown) => e as Error)
    expect(err).toBeInstanceOf(Error)
    const message = (err as Error).message
    expect(message).toContain(
      `error: cannot open the store at ${join(dataDir, 'store')}: the disk holding it is full (0 bytes free)`
    )
    expect(message).toMatch(/hint: free space on the file system/)
    expect(message).not.toMatch(/readable and writable/)
  })

  it('under a cap smaller than the image: exit 1, and the warning names the cap', async () => {
    const dataDir = join(work, 'capped')
    await mkdir(dataDir)
    const node = await startP2pd({ dataDir, insecureRegistry: [registry.host], args: ['--cache-size', '2M'] })
    try {
      const text = await node.p2pctl(['warm', image.ref])
      expect(text.code).toBe(1)
      expect(text.stderr).toMatch(
        /^warning: only \d+ of \d+ chunks \(.+ of .+\) stayed in p2pd's store: its cap \(--cache-size\) is 2\.0 MiB, smaller than the image$/m
      )
      const json = await node.p2pctl(['warm', image.ref, '--json'])
      expect(json.code).toBe(1)
      expect(JSON.parse(json.stdout)).toMatchObject({ complete: false })
      // Evictions under a cap are no write failures.
      expect((await node.client.get<NodeStatus>('/status')).store).toMatchObject({ writeErrors: 0 })
    } finally {
      await node.stop()
    }
  })

  it('says nothing more when the image stayed: exit 0, "complete": true', async () => {
    const dataDir = join(work, 'roomy')
    await mkdir(dataDir)
    const node = await startP2pd({ dataDir, insecureRegistry: [registry.host] })
    try {
      const text = await node.p2pctl(['warm', image.ref])
      expect(text.code).toBe(0)
      expect(text.stderr).not.toMatch(/warning/)
      const json = await node.p2pctl(['warm', image.ref, '--json'])
      expect(json.code).toBe(0)
      const result = JSON.parse(json.stdout) as WarmResult
      expect(result).toMatchObject({ complete: true, held: { chunks: result.totalChunks, bytes: result.totalBytes } })
    } finally {
      await node.stop()
    }
  })
})
