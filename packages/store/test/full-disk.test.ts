import { execFile } from 'node:child_process'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { openDiskStore } from '../src/index.js'
import { randomChunk } from './compliance.js'
import { chunkFiles, expectConsistent } from './consistency.js'

const exec = promisify(execFile)
let mountpoint: string

beforeAll(async () => {
  mountpoint = await mkdtemp(join(tmpdir(), 'strata-full-'))
  await exec('mount', ['-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', mountpoint])
})

afterAll(async () => {
  await exec('umount', [mountpoint])
  await rm(mountpoint, { recursive: true, force: true })
})

describe('full disk', () => {
  it('fails a put with StoreFullError, stays consistent, and works again once space is freed', async () => {
    const dir = join(mountpoint, 'store')
    const store = await openDiskStore(dir)
    const stored: string[] = []
    let err: unknown
    let last = randomChunk()
    for (let i = 0; i < 100 && err === undefined; i++) {
      last = randomChunk(100_000)
      try {
        await store.put(last.digest, last.bytes)
        stored.push(last.digest)
      } catch (e) {
        err = e
      }
    }
    expect(err).toMatchObject({ name: 'StoreFullError', code: 'STORE_FULL', dir, digest: last.digest })
    expect((err as Error).message).toContain(dir)
    expect((err as Error).message).toContain(last.digest)
    expect((err as { hint: string }).hint).toMatch(/free space/)
    expect(stored.length).toBeGreaterThan(5)

    // The failed put left nothing behind: no temp file, no index entry, the earlier chunks intact.
    expect(await store.has(last.digest)).toBe(false)
    expect((await expectConsistent(dir, store)).sort()).toEqual([...stored].sort())

    await store.delete(stored[0]!)
    await store.put(last.digest, last.bytes)
    expect(await store.get(last.digest)).toEqual(last.bytes)
    await store.close()

    const reopened = await openDiskStore(dir)
    expect(reopened.repair).toEqual({
      tempRemoved: 0,
      missingDropped: 0,
      reindexed: 0,
      badRemoved: 0,
      verified: 0,
      indexRebuilt: false
    })
    expect((await expectConsistent(dir, reopened)).sort()).toEqual([...stored.slice(1), last.digest].sort())
    expect((await chunkFiles(dir)).length).toBe(stored.length)
    await reopened.close()
  })
})
