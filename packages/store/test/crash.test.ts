import { type ChildProcess, spawn } from 'node:child_process'
import { randomBytes, randomInt } from 'node:crypto'
import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { afterAll, describe, expect, it } from 'vitest'
import { openDiskStore } from '../src/index.js'
import { expectConsistent } from './consistency.js'

const fixtures = fileURLToPath(new URL('./fixtures/', import.meta.url))
const dirs: string[] = []
afterAll(async () => {
  for (const d of dirs) await rm(d, { recursive: true, force: true })
})

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'strata-crash-'))
  dirs.push(dir)
  return dir
}

interface Worker {
  child: ChildProcess
  /** Output lines so far. */
  lines: string[]
  exited: Promise<void>
}

/**
 * Starts a worker fixture (default the put loop) on `dir` and resolves once it has printed `ready`.
 * `env` replaces the child's environment.
 */
async function startWorker(
  dir: string,
  cap?: number,
  fixture = 'put-loop.ts',
  env: NodeJS.ProcessEnv = process.env
): Promise<Worker> {
  const args = ['--no-warnings', '--import', join(fixtures, 'ts-resolve.mjs'), join(fixtures, fixture), dir]
  const child = spawn(process.execPath, cap === undefined ? args : [...args, String(cap)], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env
  })
  const lines: string[] = []
  let stderr = ''
  child.stderr!.on('data', (d: Buffer) => {
    stderr += d.toString()
  })
  // 'close', not 'exit': only then has everything the child wrote to stdout been read (a `deleting` line still
  // in the pipe would make a deleted chunk look acknowledged).
  const exited = new Promise<void>((resolve) => child.once('close', () => resolve()))
  const ready = new Promise<void>((resolve, reject) => {
    createInterface({ input: child.stdout! }).on('line', (line) => {
      lines.push(line)
      if (line === 'ready') resolve()
    })
    child.once('exit', (code) => reject(new Error(`put-loop exited (${code}) before it was ready: ${stderr}`)))
  })
  await ready
  return { child, lines, exited }
}

async function kill(worker: Worker): Promise<void> {
  worker.child.kill('SIGKILL')
  await worker.exited
}

describe('crash safety', () => {
  it('a second process cannot open a store in use; a killed owner releases it', async () => {
    const dir = await tempDir()
    const worker = await startWorker(dir)
    await expect(openDiskStore(dir)).rejects.toMatchObject({ name: 'StoreLockedError', dir })
    await kill(worker)
    const store = await openDiskStore(dir)
    await expectConsistent(dir, store)
    await store.close()
  })

  it('after an unclean stop, verifies what was put since the last checkpoint before serving it, and only that', async () => {
    const dir = await tempDir()
    const worker = await startWorker(dir, undefined, 'unclean.ts')
    await kill(worker)
    const put = (label: string) => worker.lines.filter((l) => l.startsWith(`${label} `)).map((l) => l.slice(2))
    const [a, b] = [put('a'), put('b')]
    expect(a).toHaveLength(3)
    expect(b).toHaveLength(3)
    // What a power loss can leave of files that were never fsynced: garbage of the right size, an empty file.
    const path = (digest: string) => join(dir, 'chunks', digest.slice(7, 9), digest.slice(7))
    await writeFile(path(b[0]!), randomBytes(4096))
    await truncate(path(b[1]!), 0)

    let store = await openDiskStore(dir)
    expect(store.repair).toMatchObject({ verified: 3, badRemoved: 2, missingDropped: 0, reindexed: 0 })
    expect(await store.get(b[0]!)).toBeUndefined()
    expect(await store.has(b[1]!)).toBe(false)
    expect((await expectConsistent(dir, store)).sort()).toEqual([...a, b[2]!].sort())
    await store.close()
    // Verified once (and made durable): a clean reopen reads nothing again.
    store = await openDiskStore(dir)
    expect(store.repair).toMatchObject({ verified: 0, badRemoved: 0 })
    await store.close()
  })

  it('a timed checkpoint makes puts durable, with syncfs or, without the sync command, an fsync per file', async () => {
    for (const env of [process.env, { ...process.env, PATH: '/nonexistent' }]) {
      const dir = await tempDir()
      const worker = await startWorker(dir, undefined, 'checkpointed.ts', env)
      await kill(worker)
      const put = worker.lines.filter((l) => l.startsWith('put ')).map((l) => l.slice(4))
      expect(put).toHaveLength(3)
      const store = await openDiskStore(dir)
      // Killed after the checkpoint: nothing was suspect, so nothing had to be read again.
      expect(store.repair, `PATH=${env.PATH}`).toMatchObject({ verified: 0, badRemoved: 0, reindexed: 0 })
      expect((await expectConsistent(dir, store)).sort()).toEqual([...put].sort())
      await store.close()
    }
  })

  it('survives SIGKILL at random moments: every acknowledged put is there, files and index agree', async () => {
    const durable = await tempDir()
    const capped = await tempDir()
    const cap = 1 << 20
    /** Digests the worker on `durable` acknowledged and did not start deleting: all must survive. */
    const acknowledged = new Set<string>()
    const repaired = { tempRemoved: 0, missingDropped: 0, reindexed: 0, badRemoved: 0, verified: 0 }
    for (let round = 0; round < 20; round++) {
      const useCap = round % 2 === 1
      const dir = useCap ? capped : durable
      const worker = await startWorker(dir, useCap ? cap : undefined)
      await new Promise((resolve) => setTimeout(resolve, randomInt(20, 250)))
      await kill(worker)
      if (!useCap) {
        for (const line of worker.lines) {
          const [verb, digest] = line.split(' ')
          if (verb === 'put') acknowledged.add(digest!)
          if (verb === 'deleting') acknowledged.delete(digest!)
        }
      }

      const store = await openDiskStore(dir, useCap ? { maxBytes: cap } : {})
      for (const key of Object.keys(repaired) as Array<keyof typeof repaired>) repaired[key] += store.repair[key]
      expect(store.repair.indexRebuilt).toBe(false)
      expect(store.repair.badRemoved, `round ${round}: no chunk file has wrong bytes`).toBe(0)
      const keys = new Set(await expectConsistent(dir, store))
      if (useCap) expect((await store.stats()).bytes).toBeLessThanOrEqual(cap)
      else for (const digest of acknowledged) expect(keys.has(digest), `round ${round}: ${digest} kept`).toBe(true)
      await store.close()
    }
    expect(acknowledged.size).toBeGreaterThan(0)
    // The kills did land mid-put: interrupted temp files or renamed-but-unindexed chunks were cleaned up.
    expect(repaired.tempRemoved + repaired.reindexed).toBeGreaterThan(0)
    // Each kill left chunks put since the last checkpoint: they were verified on reopen.
    expect(repaired.verified).toBeGreaterThan(0)
  }, 120_000)
})
