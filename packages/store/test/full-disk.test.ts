import { execFile } from 'node:child_process'
import { mkdtemp, rm, statfs, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { afterAll, describe, expect, it } from 'vitest'
import { openDiskStore, type StoreErrorEventDetail } from '../src/index.js'
import { randomChunk } from './compliance.js'
import { chunkFiles, expectConsistent } from './consistency.js'

// Real full disks: small tmpfs mounts (the tests run as root).

const exec = promisify(execFile)
const mounts: string[] = []

/** A fresh tmpfs of `size` (e.g. `8m`), unmounted after the file. */
async function tmpfs(size: string): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'strata-full-'))
  await exec('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir])
  mounts.push(dir)
  return dir
}

const free = async (dir: string) => {
  const s = await statfs(dir)
  return s.bavail * s.bsize
}

/** Puts random chunks of `size` bytes until a put fails; the digests stored and the error. */
async function fill(
  store: Awaited<ReturnType<typeof openDiskStore>>,
  size: number
): Promise<{ stored: string[]; err: unknown; last: ReturnType<typeof randomChunk> }> {
  const stored: string[] = []
  for (let i = 0; i < 1000; i++) {
    const last = randomChunk(size)
    try {
      await store.put(last.digest, last.bytes)
      stored.push(last.digest)
    } catch (err) {
      return { stored, err, last }
    }
  }
  throw new Error('the disk never filled up')
}

afterAll(async () => {
  // Lazily: a store whose open failed may still hold a file there until this process ends.
  for (const dir of mounts) await exec('umount', ['-l', dir]).catch(() => {})
  for (const dir of mounts) await rm(dir, { recursive: true, force: true })
})

describe('full disk', () => {
  it('fails a put with StoreFullError, stays consistent, and works again once space is freed', async () => {
    // No headroom: the write itself meets ENOSPC (another program filled the disk, say).
    const dir = join(await tmpfs('2m'), 'store')
    const store = await openDiskStore(dir, { headroomBytes: 0 })
    const errors: StoreErrorEventDetail[] = []
    store.addEventListener('error', (e) => errors.push((e as CustomEvent<StoreErrorEventDetail>).detail))
    const { stored, err, last } = await fill(store, 100_000)
    expect(err).toMatchObject({ name: 'StoreFullError', code: 'STORE_FULL', dir, digest: last.digest })
    expect((err as Error).message).toContain(dir)
    expect((err as Error).message).toContain(last.digest)
    expect((err as { hint: string }).hint).toMatch(/free space/)
    expect(stored.length).toBeGreaterThan(5)
    // Counted and announced: p2pd logs it and exports the count.
    expect((await store.stats()).writeErrors).toBe(1)
    expect(errors).toEqual([{ operation: 'put', digest: last.digest, error: err }])

    // The failed put left nothing behind: no temp file, no index entry, the earlier chunks intact.
    expect(await store.has(last.digest)).toBe(false)
    expect((await expectConsistent(dir, store)).sort()).toEqual([...stored].sort())

    await store.delete(stored[0]!)
    await store.put(last.digest, last.bytes)
    expect(await store.get(last.digest)).toEqual(last.bytes)
    await store.close()

    const reopened = await openDiskStore(dir, { headroomBytes: 0 })
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

  it('leaves headroom for its index: puts stop short of a full disk, and the store opens again', async () => {
    const mnt = await tmpfs('8m')
    const dir = join(mnt, 'store')
    // The default: an eighth of the file system (at most 8 MiB).
    const store = await openDiskStore(dir)
    const { stored, err } = await fill(store, 64 * 1024)
    expect(err).toMatchObject({ name: 'StoreFullError', code: 'STORE_FULL' })
    expect((err as Error).message).toMatch(/is full \(\d+ bytes free\)/)
    expect(await free(mnt)).toBeGreaterThanOrEqual(1024 * 1024)
    // Index writes still have room: metadata, pins, deletes.
    await store.putMeta('after', new Uint8Array(10_000))
    await store.pin('image', stored.slice(0, 3))
    await store.close()

    const reopened = await openDiskStore(dir)
    expect((await reopened.stats()).chunks).toBe(stored.length)
    expect(reopened.repair.indexRebuilt).toBe(false)
    await reopened.close()
  })

  it('makes room on open by evicting unpinned chunks, least recently used first, when the disk filled up meanwhile', async () => {
    const mnt = await tmpfs('8m')
    const dir = join(mnt, 'store')
    const store = await openDiskStore(dir)
    const chunks = Array.from({ length: 40 }, () => randomChunk(64 * 1024))
    for (const c of chunks) await store.put(c.digest, c.bytes)
    // The oldest two are pinned (a mounted image): they stay.
    await store.pin('image', [chunks[0]!.digest, chunks[1]!.digest])
    await store.close()
    // Another program takes all but 512 KiB (the store keeps 1 MiB of this 8 MiB).
    await writeFile(join(mnt, 'filler'), new Uint8Array(Math.max(0, (await free(mnt)) - 512 * 1024)))

    const reopened = await openDiskStore(dir)
    expect(await free(mnt)).toBeGreaterThanOrEqual(1024 * 1024)
    const stats = await reopened.stats()
    expect(stats.evictions).toBeGreaterThanOrEqual(8)
    expect(stats.chunks).toBe(40 - stats.evictions)
    expect(await reopened.has(chunks[0]!.digest)).toBe(true)
    expect(await reopened.has(chunks[1]!.digest)).toBe(true)
    // Least recently used first: the unpinned ones put first went.
    expect(await reopened.has(chunks[2]!.digest)).toBe(false)
    expect(await reopened.has(chunks[39]!.digest)).toBe(true)
    await expectConsistent(dir, reopened)
    await reopened.close()
  })

  it('says plainly that the disk is full when its index cannot open at all', async () => {
    const mnt = await tmpfs('4m')
    const dir = join(mnt, 'store')
    const store = await openDiskStore(dir)
    for (let i = 0; i < 10; i++) {
      const c = randomChunk(64 * 1024)
      await store.put(c.digest, c.bytes)
    }
    await store.close()
    await writeFile(join(mnt, 'filler'), new Uint8Array(await free(mnt))).catch(() => {})
    expect(await free(mnt)).toBe(0)
    const err = await openDiskStore(dir).catch((e: unknown) => e)
    expect(err).toMatchObject({ name: 'StoreFullError', code: 'STORE_FULL', dir, digest: undefined, free: 0 })
    expect((err as Error).message).toBe(
      `cannot open the store at ${dir}: the disk holding it is full (0 bytes free), and its index needs room to open`
    )
    expect((err as { hint: string }).hint).not.toMatch(/readable|writable|permission/)
    expect((err as { hint: string }).hint).toMatch(/free space/)
  })
})
