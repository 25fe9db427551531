import { createHash, webcrypto } from 'node:crypto'
import { mkdtemp, readdir, readFile, readlink, rm, unlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it, vi } from 'vitest'
import { type CorruptEventDetail, openDiskStore } from '../src/index.js'
import { randomChunk, runStoreCompliance } from './compliance.js'
import { chunkFiles, expectConsistent } from './consistency.js'

const dirs: string[] = []
afterAll(async () => {
  for (const d of dirs) await rm(d, { recursive: true, force: true })
})

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'strata-store-'))
  dirs.push(dir)
  return dir
}

function chunkPath(dir: string, digest: string): string {
  return join(dir, 'chunks', digest.slice(7, 9), digest.slice(7))
}

runStoreCompliance('disk', async (init) => openDiskStore(await tempDir(), init))

describe('disk store', () => {
  it('keeps chunks, layers, pins, metadata and access order across a reopen', async () => {
    const dir = await tempDir()
    const [a, b, c, d, e] = [randomChunk(), randomChunk(), randomChunk(), randomChunk(), randomChunk()]
    let store = await openDiskStore(dir, { maxBytes: 3000 })
    for (const x of [a!, b!, c!]) await store.put(x.digest, x.bytes, { layer: `sha256:${'3'.repeat(64)}` })
    await store.pin('image', [c!.digest])
    await store.get(a!.digest)
    await store.putMeta('manifest/x', new Uint8Array([7, 8, 9]))
    await store.close()

    store = await openDiskStore(dir, { maxBytes: 3000 })
    expect(store.repair).toEqual({
      tempRemoved: 0,
      missingDropped: 0,
      reindexed: 0,
      badRemoved: 0,
      verified: 0,
      indexRebuilt: false
    })
    expect(await store.getMeta('manifest/x')).toEqual(new Uint8Array([7, 8, 9]))
    expect(await store.stats()).toMatchObject({ chunks: 3, bytes: 3000, pinned: 1 })
    await store.put(d!.digest, d!.bytes)
    // b is the least recently used (a was read, c is pinned): the read of a was recorded before close.
    expect(await store.has(b!.digest)).toBe(false)
    await store.put(e!.digest, e!.bytes)
    expect(await store.has(a!.digest)).toBe(false)
    expect(await store.get(c!.digest)).toEqual(c!.bytes)
    await expectConsistent(dir, store)
    await store.close()
  })

  it('lets one owner at a time open a store', async () => {
    const dir = await tempDir()
    const first = await openDiskStore(dir)
    const err = await openDiskStore(dir).catch((e: unknown) => e)
    expect(err).toMatchObject({ name: 'StoreLockedError', code: 'STORE_LOCKED', dir })
    expect((err as Error).message).toBe(`the store at ${dir} is in use by another process (p2pd?)`)
    expect((err as { hint: string }).hint).toMatch(/only one process/)
    await first.close()
    const second = await openDiskStore(dir)
    await second.close()
  })

  it('says what failed when the store directory cannot be used', async () => {
    const dir = await tempDir()
    await writeFile(join(dir, 'index'), 'a file where the index directory belongs')
    const err = await openDiskStore(dir).catch((e: unknown) => e)
    expect(err).toMatchObject({ name: 'StoreIOError', code: 'STORE_IO', path: join(dir, 'index') })
    expect((err as Error).message).toMatch(new RegExp(`^store open failed on ${join(dir, 'index')}: .+`))
    expect((err as { hint: string }).hint).toContain(join(dir, 'index'))
  })

  it('repairs by hand-made damage on open', async () => {
    const dir = await tempDir()
    const [kept, lost, stray, wrong] = [randomChunk(), randomChunk(), randomChunk(), randomChunk()]
    let store = await openDiskStore(dir)
    await store.put(kept!.digest, kept!.bytes)
    await store.put(lost!.digest, lost!.bytes)
    await store.close()

    // An interrupted put, a vanished file, a file the index never heard of, a file with the wrong bytes,
    // and something that is no chunk at all.
    const temp = join(dir, 'chunks', '00', `.tmp-${'0'.repeat(64)}-1234`)
    await writeFile(temp, 'half a chunk')
    await unlink(chunkPath(dir, lost!.digest))
    await writeFile(chunkPath(dir, stray!.digest), stray!.bytes)
    await writeFile(chunkPath(dir, wrong!.digest), randomChunk().bytes)
    await writeFile(join(dir, 'chunks', 'ff', 'notes.txt'), 'hello')

    store = await openDiskStore(dir)
    expect(store.repair).toEqual({
      tempRemoved: 1,
      missingDropped: 1,
      reindexed: 1,
      badRemoved: 2,
      verified: 0,
      indexRebuilt: false
    })
    expect(await store.get(lost!.digest)).toBeUndefined()
    expect(await store.get(wrong!.digest)).toBeUndefined()
    expect(await store.get(stray!.digest)).toEqual(stray!.bytes)
    expect((await expectConsistent(dir, store)).sort()).toEqual([kept!.digest, stray!.digest].sort())
    await store.close()
  })

  it('rebuilds a damaged index from the chunk files', async () => {
    const dir = await tempDir()
    const [a, b] = [randomChunk(), randomChunk()]
    let store = await openDiskStore(dir)
    await store.put(a!.digest, a!.bytes)
    await store.put(b!.digest, b!.bytes)
    await store.close()
    await writeFile(join(dir, 'index', 'CURRENT'), 'garbage')

    store = await openDiskStore(dir)
    expect(store.repair).toEqual({
      tempRemoved: 0,
      missingDropped: 0,
      reindexed: 2,
      badRemoved: 0,
      verified: 0,
      indexRebuilt: true
    })
    expect((await expectConsistent(dir, store)).sort()).toEqual([a!.digest, b!.digest].sort())
    await store.close()
  })

  /** A store of two chunks: a's file removed and b's cut to 10 bytes, behind the store's back. */
  const damagedBehindItsBack = async () => {
    const dir = await tempDir()
    const store = await openDiskStore(dir)
    const [a, b] = [randomChunk(), randomChunk()] as const
    await store.put(a.digest, a.bytes)
    await store.put(b.digest, b.bytes)
    await unlink(chunkPath(dir, a.digest))
    await writeFile(chunkPath(dir, b.digest), b.bytes.subarray(0, 10))
    return { dir, store, a, b }
  }

  it('treats a chunk file removed or truncated behind its back as a miss, and forgets it', async () => {
    const { dir, store, a, b } = await damagedBehindItsBack()
    expect(await store.get(a!.digest)).toBeUndefined()
    expect(await store.get(b!.digest)).toBeUndefined()
    expect(await store.has(a!.digest)).toBe(false)
    expect(await store.stats()).toMatchObject({ chunks: 0, bytes: 0, misses: 2 })
    expect(await chunkFiles(dir)).toEqual([])
    await store.close()
  })

  it('reads pieces of a chunk removed or truncated behind its back as a miss, and forgets it', async () => {
    const { dir, store, a, b } = await damagedBehindItsBack()
    const into = new Uint8Array(100)
    expect(await store.read(a!.digest, 0, into)).toBeUndefined()
    // The first piece is intact; the one past the cut is a miss.
    expect(await store.read(b!.digest, 0, into.subarray(0, 10))).toBe(10)
    expect(await store.read(b!.digest, 500, into)).toBeUndefined()
    expect(await store.stats()).toMatchObject({ chunks: 0, bytes: 0 })
    expect(await chunkFiles(dir)).toEqual([])
    await store.close()
  })

  /**
   * A store of four chunks, reopened: a's and b's files overwritten with other bytes of the same size (a flipped
   * byte, garbage) while it was closed, c's after it was opened, all behind its back; d is intact.
   */
  const corruptBehindItsBack = async (init: { verifyReads?: boolean } = {}) => {
    const dir = await tempDir()
    let store = await openDiskStore(dir, { fsync: false })
    const [a, b, c, d] = [randomChunk(100_000), randomChunk(), randomChunk(), randomChunk()] as const
    for (const x of [a, b, c, d]) await store.put(x.digest, x.bytes)
    await store.close()
    const flipped = a.bytes.slice()
    flipped[54_321]! ^= 0x01
    await writeFile(chunkPath(dir, a.digest), flipped)
    await writeFile(chunkPath(dir, b.digest), randomChunk().bytes)
    store = await openDiskStore(dir, { fsync: false, ...init })
    await writeFile(chunkPath(dir, c.digest), randomChunk().bytes)
    const events: CorruptEventDetail[] = []
    store.addEventListener('corrupt', (e) => events.push((e as CustomEvent<CorruptEventDetail>).detail))
    return { dir, store, a, b, c, d, flipped, events }
  }

  it('never serves a chunk file damaged behind its back: get and read miss, the chunk is dropped and counted', async () => {
    const { dir, store, a, b, c, d, flipped, events } = await corruptBehindItsBack()
    // A clean close: the open hashed nothing. The damage shows on each chunk's first read.
    expect(store.repair).toMatchObject({ verified: 0, badRemoved: 0 })
    const into = new Uint8Array(1000).fill(7)
    // A piece of a away from the flipped byte, and the piece that holds it: both miss.
    expect(await store.read(a.digest, 0, into)).toBeUndefined()
    expect(into).toEqual(new Uint8Array(1000).fill(7))
    expect(await store.read(a.digest, 54_000, into)).toBeUndefined()
    expect(await store.get(b.digest)).toBeUndefined()
    // Checked ahead of a read (what the fetcher asks for the next chunks of a file read in place).
    expect(await store.verify(c.digest)).toBe(false)
    expect(await store.read(c.digest, 500, into)).toBeUndefined()
    expect(into).toEqual(new Uint8Array(1000).fill(7))
    expect(await store.verify(d.digest)).toBe(true)
    expect(await store.get(d.digest)).toEqual(d.bytes)
    expect(events.map((e) => e.digest)).toEqual([a.digest, b.digest, c.digest])
    expect(events[0]).toEqual({
      digest: a.digest,
      size: 100_000,
      path: chunkPath(dir, a.digest),
      found: `sha256:${createHash('sha256').update(flipped).digest('hex')}`
    })
    expect(await store.stats()).toMatchObject({ chunks: 1, bytes: 1000, corrupt: 3, hits: 1, misses: 1 })
    expect(await expectConsistent(dir, store)).toEqual([d.digest])
    // Dropped from the index too, and put again as any missing chunk is.
    await store.put(a.digest, a.bytes)
    expect(await store.get(a.digest)).toEqual(a.bytes)
    await store.close()
    const reopened = await openDiskStore(dir, { fsync: false })
    expect(reopened.repair).toMatchObject({ missingDropped: 0, reindexed: 0, badRemoved: 0 })
    expect((await expectConsistent(dir, reopened)).sort()).toEqual([a.digest, d.digest].sort())
    await reopened.close()
  })

  it('hashes a chunk once per process, on its first read: concurrent first reads share it, later reads are in place', async () => {
    const digest = vi.spyOn(webcrypto.subtle, 'digest')
    try {
      const dir = await tempDir()
      let store = await openDiskStore(dir, { fsync: false })
      const a = randomChunk(100_000)
      await store.put(a.digest, a.bytes)
      // Put by this process: not hashed again.
      expect(await store.get(a.digest)).toEqual(a.bytes)
      expect(digest).toHaveBeenCalledTimes(0)
      await store.close()

      store = await openDiskStore(dir, { fsync: false })
      const pieces = [0, 25_000, 50_000, 75_000].map((offset) => ({ offset, into: new Uint8Array(25_000) }))
      const [got] = await Promise.all([
        store.get(a.digest),
        ...pieces.map(({ offset, into }) => store.read(a.digest, offset, into))
      ])
      expect(got).toEqual(a.bytes)
      for (const { offset, into } of pieces) expect(into).toEqual(a.bytes.subarray(offset, offset + 25_000))
      expect(digest).toHaveBeenCalledTimes(1)
      const into = new Uint8Array(100_000)
      expect(await store.read(a.digest, 0, into)).toBe(100_000)
      expect(into).toEqual(a.bytes)
      expect(await store.get(a.digest)).toEqual(a.bytes)
      expect(digest).toHaveBeenCalledTimes(1)
      await store.close()
    } finally {
      digest.mockRestore()
    }
  })

  it('reads damaged files as they are with verifyReads false (benchmarks only)', async () => {
    const { store, b } = await corruptBehindItsBack({ verifyReads: false })
    expect(await store.get(b.digest)).not.toEqual(b.bytes)
    expect(await store.stats()).toMatchObject({ chunks: 4, corrupt: 0 })
    await store.close()
  })

  it('keeps a bounded number of chunk files open for reads, and none after close', async () => {
    const dir = await tempDir()
    const store = await openDiskStore(dir, { maxBytes: 100 * 1000 })
    const chunks = Array.from({ length: 100 }, () => randomChunk(1000))
    for (const c of chunks) await store.put(c.digest, c.bytes)
    const fds = async () => (await readdir('/proc/self/fd')).length
    const before = await fds()
    const into = new Uint8Array(10)
    for (const c of chunks) expect(await store.read(c.digest, 0, into)).toBe(10)
    expect((await fds()) - before).toBeGreaterThan(0)
    expect((await fds()) - before).toBeLessThanOrEqual(32)
    // An evicted chunk's file is closed too (no deleted file held open, no space kept).
    const extra = randomChunk(50_000)
    await store.put(extra.digest, extra.bytes)
    const deletedOpen = async () =>
      (
        await Promise.all((await readdir('/proc/self/fd')).map((fd) => readlink(`/proc/self/fd/${fd}`).catch(() => '')))
      ).filter((target) => target.startsWith(dir) && target.endsWith('(deleted)')).length
    await new Promise((r) => setTimeout(r, 50))
    expect(await deletedOpen()).toBe(0)
    await store.close()
    expect(await fds()).toBeLessThanOrEqual(before)
  })

  it('evicts down to a lowered cap on open', async () => {
    const dir = await tempDir()
    let store = await openDiskStore(dir)
    const chunks = Array.from({ length: 5 }, () => randomChunk())
    for (const c of chunks) await store.put(c.digest, c.bytes)
    await store.close()
    store = await openDiskStore(dir, { maxBytes: 2000 })
    expect((await expectConsistent(dir, store)).sort()).toEqual(
      chunks
        .slice(3)
        .map((c) => c.digest)
        .sort()
    )
    await store.close()
  })

  it('abandons a put aborted while writing: nothing stored, no temp file left', async () => {
    const dir = await tempDir()
    const store = await openDiskStore(dir)
    const big = randomChunk(8 << 20)
    const controller = new AbortController()
    const putting = store.put(big.digest, big.bytes, { signal: controller.signal })
    controller.abort()
    await expect(putting).rejects.toMatchObject({ name: 'AbortError' })
    expect(await store.has(big.digest)).toBe(false)
    expect(await expectConsistent(dir, store)).toEqual([])
    await store.put(big.digest, big.bytes)
    expect(await store.get(big.digest)).toEqual(big.bytes)
    await store.close()
  })

  it('removes orphan files in gc, but not a put in flight', async () => {
    const dir = await tempDir()
    const store = await openDiskStore(dir)
    const a = randomChunk()
    const orphan = randomChunk()
    await writeFile(chunkPath(dir, orphan.digest), orphan.bytes)
    await writeFile(join(dir, 'chunks', '01', '.tmp-stale'), 'x')
    const big = randomChunk(4 << 20)
    const putting = store.put(big.digest, big.bytes)
    const result = await store.gc()
    await putting
    await store.put(a.digest, a.bytes)
    expect(result).toEqual({ evicted: 0, freedBytes: 0, orphansRemoved: 2 })
    expect((await expectConsistent(dir, store)).sort()).toEqual([a.digest, big.digest].sort())
    expect(await readFile(chunkPath(dir, big.digest))).toHaveLength(4 << 20)
    await store.close()
  })
})
