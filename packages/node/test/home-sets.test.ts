// Homes past a full mesh: nodes with different connected views agree on a layer's homes through the DHT's closest
// peers to its home bucket (homes.ts HomeSets), and a small cluster keeps homing over its connected peers.
import { generateKeyPair } from '@libp2p/crypto/keys'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import type { AbortOptions } from '@strata/base'
import type { ChunkRef } from '@strata/fetcher'
import { describe, expect, it } from 'vitest'
import { bucketKey, closestTo, HOME_SET_SIZE, HomeSets, homeBucket, homeKey, homeOf } from '../src/homes.js'
import { PeerBook } from '../src/peers.js'
import { PeerSource } from '../src/source.js'

const ids = await Promise.all(
  Array.from({ length: 60 }, async () => peerIdFromPrivateKey(await generateKeyPair('Ed25519')).toString())
)

const layer = (i: number) => `sha256:${i.toString(16).padStart(64, '0')}`
const chunk = (l: number, segment: number): ChunkRef => ({
  digest: `sha256:${(l * 1000 + segment).toString(16).padStart(64, 'c')}`,
  fileOffset: 0,
  size: 100,
  offset: segment << 20,
  end: (segment << 20) + 50,
  innerOffset: 0,
  layer: { digest: layer(l), repository: 'registry.test/app' },
  compression: 'gzip'
})

/** A node `self` connected to `connected`, whose DHT walks meet `dht` (all the cluster, as a converged walk). */
function node(self: string, connected: string[], dht: string[]) {
  const walks: number[] = []
  const homeSets = new HomeSets({
    self,
    async *closestPeers(key: Uint8Array, _options?: AbortOptions) {
      walks.push(key.length)
      yield* closestTo(
        key,
        dht.filter((p) => p !== self)
      )
    },
    clusterSize: () => connected.length
  })
  const source = new PeerSource({
    self,
    book: new PeerBook(),
    async *findProviders() {},
    openStream: async () => {
      throw new Error('no connection in this test')
    },
    members: () => connected,
    homeSets
  })
  return { source, homeSets, walks }
}

/** Waits for a layer's home set (the walk is asynchronous). */
const settled = async (n: ReturnType<typeof node>, l: number) => {
  for (let i = 0; i < 50 && (await n.homeSets.soon(layer(l), 20)) === undefined; i++);
}

describe('home sets', () => {
  it('the set is the HOME_SET_SIZE peers closest to the bucket key, this node among them when it is closer', () => {
    const key = bucketKey(3)
    const set = closestTo(key, ids)
    expect(set).toHaveLength(HOME_SET_SIZE)
    // Deterministic, whatever the order the peers came in.
    expect(closestTo(key, [...ids].reverse())).toEqual(set)
    expect(new Set(closestTo(key, ids.slice(0, 40)))).not.toEqual(new Set(closestTo(bucketKey(4), ids.slice(0, 40))))
    expect(homeBucket(layer(1))).toBe(homeBucket(layer(1)))
  })

  it('two nodes with different connected views but the same DHT closest set pick the same homes', async () => {
    const [a, b] = [ids[0]!, ids[1]!]
    // Each sees 25 peers (a large cluster), mostly different ones.
    const viewA = ids.slice(2, 27)
    const viewB = ids.slice(30, 55)
    const na = node(a, viewA, ids)
    const nb = node(b, viewB, ids)
    let differBefore = 0
    for (let l = 0; l < 8; l++) {
      // Before the walk (cold start) each homes over its own view, as today; they mostly disagree.
      for (let s = 0; s < 4; s++) {
        const c = chunk(l, s)
        const ha = homeOf(homeKey(c), [a, ...viewA])
        const hb = homeOf(homeKey(c), [b, ...viewB])
        if (ha !== hb) differBefore++
      }
      await settled(na, l)
      await settled(nb, l)
      for (let s = 0; s < 4; s++) {
        const c = chunk(l, s)
        const set = closestTo(bucketKey(homeBucket(layer(l))), ids)
        const expected = homeOf(homeKey(c), set)
        expect(na.source.homesFor(layer(l)).sort()).toEqual([...set].sort())
        expect(na.source.home(c) ?? a).toBe(expected)
        expect(nb.source.home(c) ?? b).toBe(expected)
      }
    }
    expect(differBefore).toBeGreaterThan(16)
    // One walk per home bucket, never per chunk.
    expect(na.walks.length).toBeLessThanOrEqual(8)
  })

  it('a small cluster homes over its connected peers and never walks', async () => {
    const self = ids[0]!
    const view = ids.slice(1, 10)
    const n = node(self, view, ids.slice(0, 10))
    for (let s = 0; s < 8; s++) {
      const c = chunk(1, s)
      const expected = homeOf(homeKey(c), [self, ...view])
      expect(n.source.home(c)).toBe(expected === self ? undefined : expected)
    }
    await new Promise((r) => setTimeout(r, 20))
    expect(n.walks).toHaveLength(0)
  })

  it('a walk that shows fewer than HOME_SET_SIZE peers keeps the connected view', async () => {
    const self = ids[0]!
    const view = ids.slice(1, 13)
    const n = node(self, view, ids.slice(0, 13))
    await settled(n, 2)
    expect(n.walks.length).toBeGreaterThan(0)
    expect(n.source.homesFor(layer(2)).sort()).toEqual([self, ...view].sort())
  })
})
