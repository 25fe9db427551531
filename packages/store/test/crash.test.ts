import { type ChildProcess, spawn } from 'node:child_process'
import { randomInt } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
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

/** Starts the put loop on `dir` and resolves once it has opened the store. */
async function startWorker(dir: string, cap?: number): Promise<Worker> {
  const args = ['--no-warnings', '--import', join(fixtures, 'ts-resolve.mjs'), join(fixtures, 'put-loop.ts'), dir]
  const child = spawn(process.execPath, cap === undefined ? args : [...args, String(cap)], {
    stdio: ['ignore', 'pipe', 'pipe']
  })
  const lines: string[] = []
  let stderr = ''
  child.stderr!.on('data', (d: Buffer) => {
    stderr += d.toString()
  })
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
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

  it('survives SIGKILL at random moments: every acknowledged put is there, files and index agree', async () => {
    const durable = await tempDir()
    const capped = await tempDir()
    const cap = 1 << 20
    /** Digests the worker on `durable` acknowledged and did not start deleting: all must survive. */
    const acknowledged = new Set<string>()
    const repaired = { tempRemoved: 0, missingDropped: 0, reindexed: 0, badRemoved: 0 }
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
  }, 120_000)
})
