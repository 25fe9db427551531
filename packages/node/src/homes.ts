import { createHash } from 'node:crypto'
import { peerIdFromString } from '@libp2p/peer-id'
import type { AbortOptions } from '@strata/base'
import type { ChunkRef } from '@strata/fetcher'

/**
 * Chunk homes: the node of the cluster that fetches a chunk from the registry once for everyone. Every node
 * computes them alike without talking (rendezvous hashing over the members), so the keys and weights here are a
 * contract between p2pd versions in one cluster: changing them splits a fleet that upgrades node by node.
 */

/**
 * Chunks are homed by segment (a layer's compressed range cut into SEGMENT-byte pieces), not one by one: a home
 * then reads runs of adjacent chunks, which the registry source coalesces into few Range requests.
 */
const SEGMENT = 1 << 20

/** `<layer digest>/<segment>`: the key a chunk is homed by. */
export function homeKey(chunk: ChunkRef): string {
  return `${chunk.layer.digest}/${Math.floor(chunk.offset / SEGMENT)}`
}

/** The member that is home of `key`: rendezvous (highest random weight) hashing, so all agree without talking. */
export function homeOf(key: string, members: readonly string[]): string | undefined {
  let best: string | undefined
  let bestWeight = -1n
  for (const m of members) {
    const weight = createHash('sha256').update(m).update(key).digest().readBigUInt64BE(0)
    if (weight > bestWeight || (weight === bestWeight && best !== undefined && m < best)) {
      best = m
      bestWeight = weight
    }
  }
  return best
}

/**
 * Past a full mesh the connected views differ, and so would rendezvous over them: in a large cluster a layer's
 * homes are chosen among its home set instead, the HOME_SET_SIZE peers closest (XOR distance in the DHT's
 * keyspace) to the DHT key of the layer's home bucket. Kademlia walks from every node converge to the same
 * closest peers, so the nodes agree on the set, and rendezvous over it (homeOf) on each segment's home. The
 * buckets, their keys and the set size are part of the contract above.
 *
 * Why buckets rather than a walk per layer: the sets are then walked ahead (HOME_BUCKETS walks a node, refreshed
 * every HOME_SET_TTL_MS), not on a fleet's cold start, when every node meets a new layer at once and a walk
 * takes seconds; the homes still spread over up to HOME_BUCKETS * HOME_SET_SIZE nodes.
 */
export const HOME_SET_SIZE = 20
export const HOME_BUCKETS = 8
/** A node walks for home sets once it sees at least this many strata peers (a 10-node cluster never does). */
export const HOME_WALK_AT = HOME_SET_SIZE / 2
/**
 * A set is walked again after HOME_SET_RETRY_MS, then after twice as long each time the walk finds the same set,
 * up to HOME_SET_TTL_MS: a cluster still forming (or changing) is walked often, a settled one seldom. A walk that
 * showed a small cluster (or failed) is tried again after HOME_SET_RETRY_MS.
 */
const HOME_SET_TTL_MS = 5 * 60_000
const HOME_SET_RETRY_MS = 30_000
/** How often the node looks for sets due a walk (while it sees HOME_WALK_AT strata peers). */
const HOME_REFRESH_MS = 10_000
const HOME_WALK_TIMEOUT_MS = 20_000

/** The home bucket of a layer (by its digest). */
export function homeBucket(layer: string): number {
  return createHash('sha256').update(layer).digest().readUInt16BE(0) % HOME_BUCKETS
}

/** The DHT key a home bucket's set is walked towards. */
export function bucketKey(bucket: number): Uint8Array {
  return new Uint8Array(createHash('sha256').update(`strata/homes/${bucket}`).digest())
}

const kadIds = new Map<string, Buffer>()

/** A peer's position in kad-dht's keyspace: sha256 of its multihash (kad-dht's convertPeerId). */
function peerKadId(peer: string): Buffer {
  let id = kadIds.get(peer)
  if (id === undefined) {
    id = createHash('sha256').update(peerIdFromString(peer).toMultihash().bytes).digest()
    if (kadIds.size > 100_000) kadIds.clear()
    kadIds.set(peer, id)
  }
  return id
}

/** The `k` of `peers` closest to the DHT key `key` by XOR distance in kad-dht's keyspace (sha256 of the key). */
export function closestTo(key: Uint8Array, peers: Iterable<string>, k = HOME_SET_SIZE): string[] {
  const target = createHash('sha256').update(key).digest()
  const scored: { peer: string; distance: Buffer }[] = []
  for (const peer of new Set(peers)) {
    let id: Buffer
    try {
      id = peerKadId(peer)
    } catch {
      continue
    }
    const distance = Buffer.alloc(target.length)
    for (let i = 0; i < target.length; i++) distance[i] = target[i]! ^ id[i]!
    scored.push({ peer, distance })
  }
  scored.sort((a, b) => Buffer.compare(a.distance, b.distance))
  return scored.slice(0, k).map((s) => s.peer)
}

export interface HomeSetsInit {
  /** This node's peer id: in a bucket's set when it is among the closest. */
  self: string
  /** The peers a DHT walk towards `key` meets (the closest ones, and those named closer on the way). */
  closestPeers(key: Uint8Array, options?: AbortOptions): AsyncIterable<string>
  /** The strata peers connected now (as many or more than HOME_SET_SIZE: a large cluster even if walks see less). */
  clusterSize(): number
}

/** Per home bucket, the set walked last (undefined: a small cluster, or not walked yet). Walks run one at a time. */
export class HomeSets {
  private readonly sets = new Map<number, { peers: string[] | undefined; expires: number; ttl: number }>()
  private readonly walking = new Map<number, Promise<void>>()
  private queue: Promise<void> = Promise.resolve()
  private readonly stopping = new AbortController()
  private readonly refresh: NodeJS.Timeout
  /** DHT walks made (a figure for the bench). */
  walks = 0

  constructor(private readonly init: HomeSetsInit) {
    this.refresh = setInterval(() => {
      if (this.init.clusterSize() >= HOME_WALK_AT) this.prefetch()
    }, HOME_REFRESH_MS)
    this.refresh.unref()
  }

  /** The layer's home set, if a walk showed a large cluster; starts a walk when there is none or it is old. */
  of(layer: string): string[] | undefined {
    const bucket = homeBucket(layer)
    const entry = this.sets.get(bucket)
    if (entry === undefined || entry.expires <= Date.now()) this.walk(bucket)
    return entry?.peers
  }

  /** As `of`, waiting at most `patienceMs` for a walk under way (the walk goes on). */
  async soon(layer: string, patienceMs: number): Promise<string[] | undefined> {
    const now = this.of(layer)
    const walking = this.walking.get(homeBucket(layer))
    if (now !== undefined || walking === undefined) return now
    let timer: NodeJS.Timeout | undefined
    await Promise.race([walking, new Promise((resolve) => (timer = setTimeout(resolve, patienceMs)))])
    clearTimeout(timer)
    return this.sets.get(homeBucket(layer))?.peers
  }

  /** Walks every bucket not walked lately (one walk at a time): the sets are there before a fleet needs them. */
  prefetch(): void {
    for (let b = 0; b < HOME_BUCKETS; b++) {
      const entry = this.sets.get(b)
      if (entry === undefined || entry.expires <= Date.now()) this.walk(b)
    }
  }

  stop(): void {
    clearInterval(this.refresh)
    this.stopping.abort()
  }

  private walk(bucket: number): void {
    if (this.walking.has(bucket) || this.stopping.signal.aborted) return
    const run = this.queue.then(async () => {
      const key = bucketKey(bucket)
      this.walks++
      const seen = new Set<string>()
      const signal = AbortSignal.any([this.stopping.signal, AbortSignal.timeout(HOME_WALK_TIMEOUT_MS)])
      try {
        for await (const peer of this.init.closestPeers(key, { signal })) if (peer !== this.init.self) seen.add(peer)
      } catch {
        // A walk cut short still tells the closest peers met so far.
      }
      const old = this.sets.get(bucket)
      const retry = { expires: Date.now() + HOME_SET_RETRY_MS, ttl: HOME_SET_RETRY_MS }
      if (seen.size === 0) {
        this.sets.set(bucket, { peers: old?.peers, ...retry })
        return
      }
      const large = seen.size >= HOME_SET_SIZE || this.init.clusterSize() >= HOME_SET_SIZE
      if (!large) {
        this.sets.set(bucket, { peers: undefined, ...retry })
        return
      }
      const peers = closestTo(key, [...seen, this.init.self])
      const same = old?.peers !== undefined && old.peers.join() === peers.join()
      const ttl = same ? Math.min(old.ttl * 2, HOME_SET_TTL_MS) : HOME_SET_RETRY_MS
      this.sets.set(bucket, { peers, expires: Date.now() + ttl, ttl })
    })
    const done = run.finally(() => this.walking.delete(bucket))
    this.walking.set(bucket, done)
    this.queue = done.catch(() => {})
  }
}
