import { createHash } from 'node:crypto'
import { createMemoryStore } from '@strata/store'
import { describe, expect, it } from 'vitest'
import { type ChunkRef, type ChunkSource, createFetcher, type Route, type SourceOptions } from '../src/index.js'

/** A chunk of `bytes` in a made-up uncompressed layer. */
function chunkOf(bytes: Uint8Array, layer = 'sha256:layer'): ChunkRef {
  return {
    digest: `sha256:${createHash('sha256').update(bytes).digest('hex')}`,
    offset: 0,
    end: bytes.length,
    fileOffset: 0,
    size: bytes.length,
    innerOffset: 0,
    layer: { digest: layer, repository: 'localhost/test' },
    compression: 'none'
  }
}

/** A source holding `held`, recording the options it was asked with; `gate(digest)` holds a chunk back until opened. */
function sourceOf(
  name: string,
  held: Map<string, Uint8Array>,
  gate: (digest: string) => Promise<void> = async () => {}
): ChunkSource & { asked: SourceOptions[] } {
  const asked: SourceOptions[] = []
  return {
    name,
    asked,
    async get(chunk, options) {
      asked.push(options ?? {})
      await gate(chunk.digest)
      return held.get(chunk.digest)
    }
  }
}

const bytesOf = (n: number) => new Uint8Array(64).fill(n)

describe('routes travel with a fetch', () => {
  it('passes the route of get, getMany and getEach to every source asked, batched or not', async () => {
    const a = bytesOf(1)
    const b = bytesOf(2)
    const held = new Map([
      [chunkOf(a).digest, a],
      [chunkOf(b).digest, b]
    ])
    // The first source has nothing: the route must reach the second one too.
    const empty = sourceOf('peers', new Map())
    const asked: SourceOptions[] = []
    const batched: ChunkSource = {
      name: 'registry',
      get: async () => undefined,
      async *getMany(chunks, options) {
        asked.push(options ?? {})
        for (const chunk of chunks) yield { chunk, bytes: held.get(chunk.digest)! }
      }
    }
    const route: Route = { forwarded: true, members: ['p1', 'p2'] }
    const fetcher = createFetcher({ store: createMemoryStore(), sources: [empty, batched], hedgeDelayMs: 10_000 })
    expect(await fetcher.get(chunkOf(a), { route })).toEqual(a)
    expect(await fetcher.getMany([chunkOf(b)], { route: { members: ['p3'] } })).toEqual([b])
    expect(empty.asked.map((o) => o.route)).toEqual([route, { members: ['p3'] }])
    expect(asked.map((o) => o.route)).toEqual([route, { members: ['p3'] }])
    // No route given: none passed.
    const c = bytesOf(3)
    held.set(chunkOf(c).digest, c)
    await Promise.all(fetcher.getEach([chunkOf(c)]))
    expect(empty.asked.at(-1)!.route).toBeUndefined()
  })

  it('joins a chunk in flight as it was started: with the first caller route', async () => {
    const a = bytesOf(4)
    let open!: () => void
    const opened = new Promise<void>((resolve) => {
      open = resolve
    })
    const source = sourceOf('peers', new Map([[chunkOf(a).digest, a]]), () => opened)
    const fetcher = createFetcher({ store: createMemoryStore(), sources: [source] })
    const first = fetcher.get(chunkOf(a), { route: { forwarded: true } })
    await new Promise((r) => setImmediate(r))
    const second = fetcher.getMany([chunkOf(a)], { route: { members: ['x'] } })
    await new Promise((r) => setImmediate(r))
    open()
    expect(await first).toEqual(a)
    expect(await second).toEqual([a])
    expect(source.asked.map((o) => o.route)).toEqual([{ forwarded: true }])
    expect(fetcher.metrics().singleFlightJoins).toBe(1)
  })
})

describe('getEach: one promise per chunk, each settled when its chunk is', () => {
  it('settles each chunk as soon as it is verified and stored, in one batch, in the order asked', async () => {
    const parts = [bytesOf(5), bytesOf(6), bytesOf(7)]
    const refs = parts.map((p) => chunkOf(p))
    const gates = new Map(refs.map((r) => [r.digest, Promise.withResolvers<void>()]))
    const source = sourceOf('peers', new Map(refs.map((r, i) => [r.digest, parts[i]!])), (d) => gates.get(d)!.promise)
    const store = createMemoryStore()
    const fetcher = createFetcher({ store, sources: [source] })
    const settled: number[] = []
    const each = fetcher.getEach([refs[2]!, refs[0]!, refs[1]!, refs[0]!])
    expect(each).toHaveLength(4)
    for (const [i, p] of each.entries()) void p.then(() => settled.push(i))
    gates.get(refs[0]!.digest)!.resolve()
    expect(await each[1]).toEqual(parts[0])
    // Stored before it settles; the others still wait.
    expect(await store.has(refs[0]!.digest)).toBe(true)
    expect(settled.sort()).toEqual([1, 3])
    gates.get(refs[2]!.digest)!.resolve()
    expect(await each[0]).toEqual(parts[2])
    gates.get(refs[1]!.digest)!.resolve()
    expect(await Promise.all(each)).toEqual([parts[2], parts[0], parts[1], parts[0]])
    // One ask per chunk: the duplicate was not asked twice.
    expect(source.asked).toHaveLength(3)
  })

  it('fails only the chunks no source has, and settles those in the store from there', async () => {
    const a = bytesOf(8)
    const b = bytesOf(9)
    const store = createMemoryStore()
    await store.put(chunkOf(a).digest, a)
    const fetcher = createFetcher({ store, sources: [sourceOf('peers', new Map())] })
    const [got, lost] = fetcher.getEach([chunkOf(a), chunkOf(b)])
    expect(await got).toEqual(a)
    await expect(lost).rejects.toThrow(/peers: does not have it/)
    await expect(fetcher.getMany([chunkOf(a), chunkOf(b)])).rejects.toThrow(/does not have it/)
  })

  it('rejects every chunk not yet got when the signal aborts; with cancelOnAbort the sources are told', async () => {
    const a = bytesOf(10)
    const signals: AbortSignal[] = []
    const hung: ChunkSource = {
      name: 'peers',
      get: (_chunk, options) => {
        signals.push(options!.signal!)
        return new Promise(() => {})
      }
    }
    const fetcher = createFetcher({ store: createMemoryStore(), sources: [hung] })
    const controller = new AbortController()
    const each = fetcher.getEach([chunkOf(a)], { signal: controller.signal, cancelOnAbort: true })
    await new Promise((r) => setImmediate(r))
    controller.abort(new Error('stopped'))
    await expect(each[0]).rejects.toThrow('stopped')
    expect(signals).toHaveLength(1)
    expect(signals[0]!.aborted).toBe(true)
  })
})

describe('hedged batches: bad bytes', () => {
  /** A source that gives wrong bytes for its first `bad` asks of a chunk, then the right ones. */
  const flipping = (name: string, bytes: Uint8Array, bad: number) => {
    let asked = 0
    const reported: string[] = []
    const source: ChunkSource = {
      name,
      get: async () => {
        asked++
        if (asked > bad) return bytes
        const wrong = bytes.slice()
        wrong[0]! ^= 0xff
        return wrong
      },
      reportBad: (chunk) => reported.push(chunk.digest)
    }
    return { source, reported, asked: () => asked }
  }

  it('asks the last source again for a chunk it gave bad bytes for, a bounded number of times', async () => {
    const a = bytesOf(11)
    const last = flipping('registry', a, 2)
    const fetcher = createFetcher({ store: createMemoryStore(), sources: [last.source] })
    expect(await fetcher.get(chunkOf(a))).toEqual(a)
    expect(last.asked()).toBe(3)
    expect(last.reported).toEqual([chunkOf(a).digest, chunkOf(a).digest])
    expect(fetcher.metrics().verificationFailures).toEqual({ registry: 2 })
    // Bad every time: given up after badBytesRetries more asks, each attempt named.
    const b = bytesOf(12)
    const broken = flipping('registry', b, Number.POSITIVE_INFINITY)
    const failing = createFetcher({ store: createMemoryStore(), sources: [broken.source], badBytesRetries: 1 })
    const err = (await failing.get(chunkOf(b)).catch((e: unknown) => e)) as Error
    expect(err).toMatchObject({ name: 'ChunkUnavailableError' })
    expect(err.message.match(/registry: bad bytes/g)).toHaveLength(2)
    expect(broken.asked()).toBe(2)
  })

  it('asks the next source, not the same one again, when an earlier source gives bad bytes', async () => {
    const a = bytesOf(13)
    const peer = flipping('peer', a, Number.POSITIVE_INFINITY)
    const registry = sourceOf('registry', new Map([[chunkOf(a).digest, a]]))
    const fetcher = createFetcher({ store: createMemoryStore(), sources: [peer.source, registry] })
    expect(await fetcher.get(chunkOf(a))).toEqual(a)
    expect(peer.asked()).toBe(1)
    expect(registry.asked).toHaveLength(1)
    expect(fetcher.metrics().verificationFailures).toEqual({ peer: 1 })
  })
})
