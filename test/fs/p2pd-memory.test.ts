import { type ChildProcess, spawn } from 'node:child_process'
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { buildCli, type P2pdProcess, startP2pd } from '@test/cluster.js'
import { buildTestImage, type TestImage } from '@test/images.js'
import { noiseTree } from '@test/noise.js'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { repoRoot, run } from '@test/tools.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

// Issue 14 item 9: what p2pd keeps (chunk buffers, read-ahead) after a mount read a whole image is bounded. A real
// p2pd, the p2p-mount binary, a registry; its RSS from /proc (VmRSS) at start and after the reads settle.

const BIN = join(repoRoot, 'packages', 'cli', 'bin', 'p2p-mount.js')
const MiB = 1024 * 1024
const MB = 1_000_000
/** 3 files of 48 MiB (12 chunks each) and 1,000 of 50-150 kB (one chunk each): 251 MB. */
const BIG = 48 * MiB + 12345
const smallSize = (i: number) => 50_000 + ((i * 7919) % 100_000)
const TOTAL = 3 * BIG + Array.from({ length: 1000 }, (_, i) => smallSize(i)).reduce((a, b) => a + b, 0)

let work: string
let registry: TestRegistry
let image: TestImage
let daemon: P2pdProcess | undefined
const running = new Set<ChildProcess>()

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'strata-memory-'))
  await buildCli()
  registry = await startRegistry()
  const tree = join(work, 'tree')
  await noiseTree(join(tree, 'big'), 3, () => BIG, 1)
  await noiseTree(join(tree, 'small'), 1000, smallSize, 2)
  image = await buildTestImage({
    registry: registry.host,
    repository: 'fs/memory',
    estargz: true,
    gzipLevel: 1,
    layers: [{ files: tree }]
  })
  await rm(tree, { recursive: true, force: true })
})

afterAll(async () => {
  for (const p of running) p.kill('SIGKILL')
  await daemon?.stop('SIGKILL')
  await registry?.stop()
  if (work !== undefined) {
    await run('umount', ['-l', join(work, 'mnt')]).catch(() => {})
    await rm(work, { recursive: true, force: true })
  }
})

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

async function status(pid: number): Promise<{ rss: number; hwm: number }> {
  const text = await readFile(`/proc/${pid}/status`, 'utf8')
  const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(text)![1]) * 1024
  return { rss: kb('VmRSS'), hwm: kb('VmHWM') }
}

function sh(script: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const proc = spawn('sh', ['-c', script], { stdio: ['ignore', 'pipe', 'pipe'] })
    running.add(proc)
    let stdout = ''
    let stderr = ''
    proc.stdout!.on('data', (d) => {
      stdout += d
    })
    proc.stderr!.on('data', (d) => {
      stderr += d
    })
    proc.on('exit', (code) => {
      running.delete(proc)
      resolve({ code, stdout, stderr })
    })
  })
}

const mb = (n: number) => `${Math.round(n / MB)} MB`

describe('what p2pd keeps after reading an image through a mount', () => {
  it('stays within its start RSS + 230 MB after reading a 251 MB image whole', { timeout: 90_000 }, async () => {
    const dataDir = join(work, 'data')
    await mkdir(dataDir)
    daemon = await startP2pd({ dataDir, insecureRegistry: [registry.host] })
    const pid = daemon.proc.pid!
    const mnt = join(work, 'mnt')
    await mkdir(mnt)
    const start = await status(pid)
    const proc = spawn(process.execPath, [BIN, image.ref, mnt, '--socket', daemon.socket], {
      stdio: ['ignore', 'pipe', 'pipe']
    })
    running.add(proc)
    let out = ''
    proc.stdout!.on('data', (d) => {
      out += d
    })
    for (const end = Date.now() + 30_000; !/^mounted /m.test(out); await sleep(50)) {
      if (Date.now() > end) throw new Error(`p2p-mount did not mount: ${out}`)
    }
    // Every file, whole, by a child process (this one must not touch the mount); the bytes are all there.
    const r = await sh(`cd ${mnt} && find . -type f -print0 | xargs -0 cat | wc -c`)
    expect(r.code, r.stderr).toBe(0)
    expect(Number(r.stdout.trim())).toBe(TOTAL)
    await sleep(3000)
    const settled = await status(pid)
    const grew = settled.rss - start.rss
    console.log(
      `p2pd RSS: ${mb(start.rss)} at start, ${mb(settled.rss)} after reading ${mb(TOTAL)} (+${mb(grew)}), peak ${mb(settled.hwm)}`
    )
    // Before the bounds (a 64 MiB chunk buffer that also loaded the next chunks from the store, read-ahead of up to
    // 64 MiB per file held in memory until all of it was in) this image left p2pd 246 MB larger (peak 389 MB); with
    // them, 126-156 MB: the caches' bounds (32 MiB chunk buffer, 16 MiB of read-ahead in flight) and what they do
    // not bound: V8's young generation growing under the allocation rate (about 40 MB) and freed memory the
    // allocator keeps. That last part swings with the machine's load: +206 MB was seen in a CI-like run beside
    // other test files. The bound is what the test can hold on a loaded machine: less than the image itself, so a
    // p2pd that kept what it read fails.
    expect(grew).toBeLessThan(230 * MB)
    proc.kill('SIGTERM')
    await new Promise((r) => proc.once('exit', r))
  })
})
