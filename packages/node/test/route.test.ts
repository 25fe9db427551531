// The route a fetch travels on (forwarded, members) reaches the peer source and the byte counters through the
// options of each call, not through a context: these check the parts that read it.
import type { ChunkRef, ChunkSource, Route } from '@strata/fetcher'
import { describe, expect, it } from 'vitest'
import { countedSource } from '../src/counted.js'
import { homeKey, homeOf } from '../src/homes.js'
import { PeerBook } from '../src/peers.js'
import { PeerSource } from '../src/source.js'

const chunk = (i: number): ChunkRef => ({
  digest: `sha256:${i.toString(16).padStart(64, '0')}`,
  fileOffset: 0,
  size: 100,
  offset: i << 20,
  end: (i << 20) + 50,
  innerOffset: 0,
  layer: { digest: `sha256:${'a'.repeat(64)}`, repository: 'registry.test/app' },
  compression: 'gzip'
})

function peerSource(members: string[]): { source: PeerSource; dialled: string[] } {
  const dialled: string[] = []
  const source = new PeerSource({
    self: 'self',
    book: new PeerBook(),
    async *findProviders() {},
    openStream: async (peer) => {
      dialled.push(peer)
      throw new Error('no connection in this test')
    },
    members: () => members
  })
  return { source, dialled }
}

describe('homes', () => {
  it("are keyed by the layer's digest and the chunk's 1 MiB segment: the key every p2pd version computes alike", () => {
    const c = chunk(3)
    expect(homeKey(c)).toBe(`${c.layer.digest}/3`)
    expect(homeKey({ ...c, offset: (3 << 20) + 1000 })).toBe(`${c.layer.digest}/3`)
    // The same segment of another layer is another key (another home, most of the time).
    expect(homeKey({ ...c, layer: { ...c.layer, digest: `sha256:${'b'.repeat(64)}` } })).not.toBe(homeKey(c))
  })
})

describe('PeerSource reads the route', () => {
  it('a forwarded route has no home: the home node serving it forwards it no further', () => {
    const { source } = peerSource(['b', 'c', 'd'])
    for (let i = 0; i < 20; i++) expect(source.home(chunk(i), { forwarded: true })).toBeUndefined()
  })

  it("a route's members are the cluster chunks are homed in (a cluster warm-up), not the connected peers", () => {
    const { source } = peerSource(['b', 'c'])
    const members = ['self', 'x', 'y', 'z']
    const homes = new Set<string | undefined>()
    for (let i = 0; i < 40; i++) {
      const c = chunk(i)
      const expected = homeOf(homeKey(c), members)
      expect(source.home(c, { members })).toBe(expected === 'self' ? undefined : expected)
      homes.add(source.home(c, { members }))
    }
    // Homed over the route's members only, this node's share included.
    expect([...homes].every((h) => h === undefined || ['x', 'y', 'z'].includes(h))).toBe(true)
    expect(homes.size).toBeGreaterThan(1)
  })

  it('without a route, chunks are homed among this node and the connected peers', () => {
    const { source } = peerSource(['b', 'c'])
    for (let i = 0; i < 20; i++) {
      const c = chunk(i)
      const expected = homeOf(homeKey(c), ['self', 'b', 'c'])
      expect(source.home(c)).toBe(expected === 'self' ? undefined : expected)
    }
  })

  it('a forwarded get asks no home; the same get without the route asks the home too', async () => {
    // One connected peer: it is asked `have` (and fails), then, unless forwarded, asked to fetch as the home.
    const c = [...Array(40).keys()].map(chunk).find((x) => homeOf(homeKey(x), ['self', 'b']) === 'b')!
    const forwarded = peerSource(['b'])
    expect(await forwarded.source.get(c, { route: { forwarded: true } })).toBeUndefined()
    const plain = peerSource(['b'])
    expect(await plain.source.get(c)).toBeUndefined()
    expect(plain.dialled.length).toBe(forwarded.dialled.length + 1)
  })
})

describe('countedSource', () => {
  const bytes = new Uint8Array(7)
  const inner: ChunkSource = {
    name: 'registry',
    get: async () => bytes,
    async *getMany(chunks) {
      for (const c of chunks) yield { chunk: c, bytes }
    }
  }

  it('counts the bytes of each chunk with the route of the fetch that asked for it', async () => {
    const seen: Array<[number, Route | undefined]> = []
    const counted = countedSource(inner, (n, route) => seen.push([n, route]))
    expect(counted.name).toBe('registry')
    await counted.get(chunk(1), { route: { forwarded: true } })
    for await (const _ of counted.getMany!([chunk(2), chunk(3)], {})) {
      // Drained: each chunk counts as it is yielded.
    }
    expect(seen).toEqual([
      [7, { forwarded: true }],
      [7, undefined],
      [7, undefined]
    ])
  })

  it('keeps the batched form only when the source has one, and passes bad bytes on', () => {
    const bad: string[] = []
    const single: ChunkSource = { name: 'x', get: async () => undefined, reportBad: (c) => bad.push(c.digest) }
    const counted = countedSource(single, () => {})
    expect(counted.getMany).toBeUndefined()
    counted.reportBad?.(chunk(5), 'bad')
    expect(bad).toEqual([chunk(5).digest])
  })
})
