import { createHash, randomBytes } from 'node:crypto'
import { afterEach, describe, expect, it } from 'vitest'
import type { EvictEventDetail, LocalChunkStore, PutEventDetail, StoreErrorEventDetail } from '../src/index.js'

export interface Chunk {
  digest: string
  bytes: Uint8Array
}

export function randomChunk(size = 1000): Chunk {
  const bytes = new Uint8Array(randomBytes(size))
  return { digest: `sha256:${createHash('sha256').update(bytes).digest('hex')}`, bytes }
}

export type StoreFactory = (init: { maxBytes?: number }) => Promise<LocalChunkStore>

async function collect(it: AsyncIterable<string>): Promise<string[]> {
  const out: string[] = []
  for await (const d of it) out.push(d)
  return out
}

/** The behaviour every ChunkStore implementation must show. `factory` gives a fresh, empty store each call. */
export function runStoreCompliance(name: string, factory: StoreFactory): void {
  describe(`ChunkStore compliance: ${name}`, () => {
    const open: LocalChunkStore[] = []
    const make = async (init: { maxBytes?: number } = {}) => {
      const store = await factory(init)
      open.push(store)
      return store
    }
    afterEach(async () => {
      for (const s of open.splice(0)) await s.close()
    })

    it('puts, gets, has, deletes', async () => {
      const store = await make()
      const a = randomChunk()
      expect(await store.has(a.digest)).toBe(false)
      expect(await store.get(a.digest)).toBeUndefined()
      await store.put(a.digest, a.bytes)
      expect(await store.has(a.digest)).toBe(true)
      expect(await store.get(a.digest)).toEqual(a.bytes)
      expect(await store.delete(a.digest)).toBe(true)
      expect(await store.delete(a.digest)).toBe(false)
      expect(await store.has(a.digest)).toBe(false)
      expect(await store.get(a.digest)).toBeUndefined()
    })

    it('reads a stored chunk in pieces into a caller buffer', async () => {
      const store = await make()
      const a = randomChunk(1000)
      const into = new Uint8Array(300).fill(7)
      expect(await store.read(a.digest, 0, into)).toBeUndefined()
      await store.put(a.digest, a.bytes)
      expect(await store.read(a.digest, 0, into)).toBe(300)
      expect(into).toEqual(a.bytes.subarray(0, 300))
      expect(await store.read(a.digest, 600, into)).toBe(300)
      expect(into).toEqual(a.bytes.subarray(600, 900))
      // Up to the chunk's end; the rest of the buffer is left alone.
      into.fill(7)
      expect(await store.read(a.digest, 900, into)).toBe(100)
      expect(into.subarray(0, 100)).toEqual(a.bytes.subarray(900))
      expect(into.subarray(100).every((b) => b === 7)).toBe(true)
      expect(await store.read(a.digest, 1000, into)).toBe(0)
      expect(await store.read(a.digest, 5000, into)).toBe(0)
      await expect(store.read(a.digest, -1, into)).rejects.toThrow(RangeError)
      await expect(store.read(a.digest, 1.5, into)).rejects.toThrow(RangeError)
      await expect(store.read('sha256:nope', 0, into)).rejects.toMatchObject({ name: 'InvalidDigestError' })
      // Changing the caller's buffer changes nothing stored.
      into.fill(0)
      expect(await store.get(a.digest)).toEqual(a.bytes)
      await store.delete(a.digest)
      expect(await store.read(a.digest, 0, into)).toBeUndefined()
      // Hits: the get, and the one read that started at the chunk's first byte; misses are the callers' to count.
      expect(await store.stats()).toMatchObject({ hits: 2, misses: 0 })
    })

    it('reads many chunks at once, each piece from its own chunk', async () => {
      const store = await make()
      const chunks = Array.from({ length: 80 }, () => randomChunk(4096))
      for (const c of chunks) await store.put(c.digest, c.bytes)
      const pieces = await Promise.all(
        chunks.flatMap((c) =>
          [0, 1024, 3072].map(async (offset) => {
            const into = new Uint8Array(1024)
            expect(await store.read(c.digest, offset, into)).toBe(1024)
            return [into, c.bytes.subarray(offset, offset + 1024)] as const
          })
        )
      )
      for (const [got, want] of pieces) expect(got).toEqual(want)
    })

    it('stores an empty chunk', async () => {
      const store = await make()
      const empty = randomChunk(0)
      await store.put(empty.digest, empty.bytes)
      expect(await store.get(empty.digest)).toEqual(new Uint8Array(0))
    })

    it('keeps its bytes apart from the caller buffer', async () => {
      const store = await make()
      const a = randomChunk()
      const copy = a.bytes.slice()
      await store.put(a.digest, a.bytes)
      a.bytes.fill(0)
      const got = await store.get(a.digest)
      expect(got).toEqual(copy)
      got!.fill(1)
      expect(await store.get(a.digest)).toEqual(copy)
    })

    it('puts idempotently: one chunk, one put event', async () => {
      const store = await make()
      const a = randomChunk()
      const events: PutEventDetail[] = []
      store.addEventListener('put', (e) => events.push((e as CustomEvent<PutEventDetail>).detail))
      await Promise.all([store.put(a.digest, a.bytes), store.put(a.digest, a.bytes)])
      await store.put(a.digest, a.bytes, { layer: `sha256:${'1'.repeat(64)}` })
      const stats = await store.stats()
      expect(stats.chunks).toBe(1)
      expect(stats.bytes).toBe(a.bytes.length)
      expect(events).toEqual([{ digest: a.digest, size: a.bytes.length }])
    })

    it('lists every stored digest', async () => {
      const store = await make()
      const chunks = [randomChunk(), randomChunk(), randomChunk()]
      for (const c of chunks) await store.put(c.digest, c.bytes)
      await store.delete(chunks[1]!.digest)
      expect((await collect(store.keys())).sort()).toEqual([chunks[0]!.digest, chunks[2]!.digest].sort())
    })

    it('counts chunks, bytes, hits and misses', async () => {
      const store = await make({ maxBytes: 10_000 })
      const a = randomChunk(100)
      const b = randomChunk(200)
      await store.put(a.digest, a.bytes)
      await store.put(b.digest, b.bytes)
      await store.get(a.digest)
      await store.get(a.digest)
      await store.get(randomChunk().digest)
      expect(await store.stats()).toEqual({
        chunks: 2,
        bytes: 300,
        maxBytes: 10_000,
        hits: 2,
        misses: 1,
        evictions: 0,
        pinned: 0,
        corrupt: 0,
        writeErrors: 0
      })
      expect((await (await make()).stats()).maxBytes).toBe(Number.POSITIVE_INFINITY)
    })

    it('refuses what is not a chunk digest', async () => {
      const store = await make()
      for (const bad of [
        'sha256:../../etc/passwd',
        'sha256:ABC',
        `md5:${'a'.repeat(64)}`,
        `sha256:${'A'.repeat(64)}`
      ]) {
        await expect(store.put(bad, new Uint8Array(1))).rejects.toMatchObject({ name: 'InvalidDigestError' })
        await expect(store.get(bad)).rejects.toMatchObject({ name: 'InvalidDigestError' })
      }
      await expect(store.pin('img', ['nope'])).rejects.toMatchObject({ name: 'InvalidDigestError' })
    })

    it('evicts the least recently used chunk: a touched older chunk survives', async () => {
      const store = await make({ maxBytes: 3000 })
      const [a, b, c, d] = [randomChunk(), randomChunk(), randomChunk(), randomChunk()]
      for (const x of [a!, b!, c!]) await store.put(x.digest, x.bytes)
      expect(await store.get(a!.digest)).toBeDefined()
      await store.put(d!.digest, d!.bytes)
      expect(await store.has(a!.digest)).toBe(true)
      expect(await store.has(b!.digest)).toBe(false)
      expect(await store.has(c!.digest)).toBe(true)
      expect(await store.has(d!.digest)).toBe(true)
      expect((await store.stats()).evictions).toBe(1)
    })

    it('never goes over the cap', async () => {
      const store = await make({ maxBytes: 10_000 })
      for (let i = 0; i < 40; i++) {
        const c = randomChunk(500 + ((i * 397) % 1500))
        await store.put(c.digest, c.bytes)
        expect((await store.stats()).bytes).toBeLessThanOrEqual(10_000)
      }
      const stats = await store.stats()
      expect(stats.evictions).toBeGreaterThan(0)
      expect(stats.chunks).toBe((await collect(store.keys())).length)
    })

    it('stays under the cap with many puts at once', async () => {
      const store = await make({ maxBytes: 10_000 })
      const pinned = randomChunk(3000)
      await store.put(pinned.digest, pinned.bytes)
      await store.pin('image', [pinned.digest])
      const chunks = Array.from({ length: 60 }, () => randomChunk())
      await Promise.all(chunks.map((c) => store.put(c.digest, c.bytes)))
      const stats = await store.stats()
      expect(stats.bytes).toBeLessThanOrEqual(10_000)
      expect(stats.evictions).toBeGreaterThanOrEqual(53)
      const keys = await collect(store.keys())
      expect(keys).toContain(pinned.digest)
      expect(keys).toHaveLength(stats.chunks)
      for (const digest of keys) expect(await store.get(digest)).toBeDefined()
    })

    it('keeps pinned chunks, and evicts them once unpinned', async () => {
      const store = await make({ maxBytes: 3000 })
      const [a, b, c, d, e] = [randomChunk(), randomChunk(), randomChunk(), randomChunk(), randomChunk()]
      for (const x of [a!, b!, c!]) await store.put(x.digest, x.bytes)
      await store.pin('image-1', [a!.digest, b!.digest])
      await store.pin('image-2', [a!.digest])
      expect((await store.stats()).pinned).toBe(2)
      await store.put(d!.digest, d!.bytes)
      expect(await store.has(a!.digest)).toBe(true)
      expect(await store.has(b!.digest)).toBe(true)
      expect(await store.has(c!.digest)).toBe(false)
      await store.unpin('image-1')
      expect((await store.stats()).pinned).toBe(1)
      await store.put(e!.digest, e!.bytes)
      expect(await store.has(a!.digest)).toBe(true)
      expect(await store.has(b!.digest)).toBe(false)
    })

    it('pins a digest before its chunk arrives', async () => {
      const store = await make({ maxBytes: 2000 })
      const [a, b, c] = [randomChunk(), randomChunk(), randomChunk()]
      await store.pin('mount', [a!.digest])
      expect((await store.stats()).pinned).toBe(0)
      await store.put(a!.digest, a!.bytes)
      await store.put(b!.digest, b!.bytes)
      await store.put(c!.digest, c!.bytes)
      expect(await store.has(a!.digest)).toBe(true)
      expect(await store.has(b!.digest)).toBe(false)
    })

    it('refuses a chunk that pinned chunks leave no room for, and changes nothing', async () => {
      const store = await make({ maxBytes: 2500 })
      const [a, b, c] = [randomChunk(), randomChunk(), randomChunk()]
      await store.put(a!.digest, a!.bytes)
      await store.put(b!.digest, b!.bytes)
      await store.pin('image', [a!.digest, b!.digest])
      const err = await store.put(c!.digest, c!.bytes).catch((e: unknown) => e)
      expect(err).toMatchObject({ name: 'StoreCapError', code: 'STORE_CAP_EXCEEDED', digest: c!.digest })
      expect((err as Error).message).toMatch(/2000 bytes are pinned/)
      expect((err as { hint: string }).hint).toMatch(/unpin/)
      expect(await store.stats()).toMatchObject({ chunks: 2, bytes: 2000, evictions: 0 })
      const huge = randomChunk(3000)
      await expect(store.put(huge.digest, huge.bytes)).rejects.toThrow(/larger/)
    })

    it('counts and announces every write that fails', async () => {
      const store = await make({ maxBytes: 2500 })
      const errors: StoreErrorEventDetail[] = []
      store.addEventListener('error', (e) => errors.push((e as CustomEvent<StoreErrorEventDetail>).detail))
      const [a, b, c] = [randomChunk(), randomChunk(), randomChunk()]
      await store.put(a!.digest, a!.bytes)
      await store.put(b!.digest, b!.bytes)
      await store.pin('image', [a!.digest, b!.digest])
      expect((await store.stats()).writeErrors).toBe(0)
      await expect(store.put(c!.digest, c!.bytes)).rejects.toMatchObject({ name: 'StoreCapError' })
      await expect(store.put(c!.digest, c!.bytes)).rejects.toMatchObject({ name: 'StoreCapError' })
      expect((await store.stats()).writeErrors).toBe(2)
      expect(errors).toHaveLength(2)
      expect(errors[0]).toMatchObject({ operation: 'put', digest: c!.digest, error: { name: 'StoreCapError' } })
    })

    it('fires put and evict events', async () => {
      const store = await make({ maxBytes: 2000 })
      const puts: PutEventDetail[] = []
      const evicts: EvictEventDetail[] = []
      store.addEventListener('put', (e) => puts.push((e as CustomEvent<PutEventDetail>).detail))
      store.addEventListener('evict', (e) => evicts.push((e as CustomEvent<EvictEventDetail>).detail))
      const layer = `sha256:${'2'.repeat(64)}`
      const [a, b, c] = [randomChunk(), randomChunk(), randomChunk(1500)]
      await store.put(a!.digest, a!.bytes, { layer })
      await store.put(b!.digest, b!.bytes)
      await store.put(c!.digest, c!.bytes)
      expect(puts).toEqual([
        { digest: a!.digest, size: 1000, layer },
        { digest: b!.digest, size: 1000 },
        { digest: c!.digest, size: 1500 }
      ])
      expect(evicts).toEqual([{ digests: [a!.digest, b!.digest] }])
    })

    it('collects garbage down to a target, keeping pins', async () => {
      const store = await make()
      const chunks = Array.from({ length: 6 }, () => randomChunk())
      for (const c of chunks) await store.put(c.digest, c.bytes)
      await store.pin('keep', [chunks[0]!.digest])
      const evicts: EvictEventDetail[] = []
      store.addEventListener('evict', (e) => evicts.push((e as CustomEvent<EvictEventDetail>).detail))
      const result = await store.gc({ targetBytes: 2500 })
      expect(result).toMatchObject({ evicted: 4, freedBytes: 4000 })
      expect(evicts).toEqual([{ digests: chunks.slice(1, 5).map((c) => c.digest) }])
      expect((await collect(store.keys())).sort()).toEqual([chunks[0]!.digest, chunks[5]!.digest].sort())
      expect((await store.gc()).evicted).toBe(0)
    })

    it('round-trips metadata', async () => {
      const store = await make()
      const toc = new TextEncoder().encode('{"version":1,"entries":[]}')
      expect(await store.getMeta('toc/sha256:abc')).toBeUndefined()
      await store.putMeta('toc/sha256:abc', toc)
      expect(await store.getMeta('toc/sha256:abc')).toEqual(toc)
      await store.putMeta('toc/sha256:abc', new Uint8Array([1, 2]))
      expect(await store.getMeta('toc/sha256:abc')).toEqual(new Uint8Array([1, 2]))
    })

    it('rejects every call with an aborted signal', async () => {
      const store = await make()
      const a = randomChunk()
      await store.put(a.digest, a.bytes)
      const signal = AbortSignal.abort()
      const calls: Array<Promise<unknown>> = [
        store.get(a.digest, { signal }),
        store.read(a.digest, 0, new Uint8Array(1), { signal }),
        store.has(a.digest, { signal }),
        store.put(randomChunk().digest, a.bytes, { signal }),
        store.delete(a.digest, { signal }),
        collect(store.keys({ signal })),
        store.stats({ signal }),
        store.pin('x', [a.digest], { signal }),
        store.unpin('x', { signal }),
        store.getMeta('k', { signal }),
        store.putMeta('k', new Uint8Array(1), { signal }),
        store.gc({ signal })
      ]
      for (const call of calls) await expect(call).rejects.toMatchObject({ name: 'AbortError' })
      expect(await store.get(a.digest)).toEqual(a.bytes)
      expect((await store.stats()).chunks).toBe(1)
    })

    it('refuses use after close', async () => {
      const store = await make()
      await store.close()
      await expect(store.get(randomChunk().digest)).rejects.toMatchObject({ name: 'StoreClosedError' })
      await expect(store.read(randomChunk().digest, 0, new Uint8Array(1))).rejects.toMatchObject({
        name: 'StoreClosedError'
      })
      await expect(store.put(randomChunk().digest, new Uint8Array(1))).rejects.toMatchObject({
        name: 'StoreClosedError'
      })
      await store.close()
    })
  })
}
