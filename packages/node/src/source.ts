import { AsyncLocalStorage } from 'node:async_hooks'
import { createHash } from 'node:crypto'
import type { Stream } from '@libp2p/interface'
import type { ChunkRef, ChunkSource } from '@strata/fetcher'
import type { AbortOptions } from '@strata/store'
import type { PeerBook } from './peers.js'
import { DEFAULT_LIMITS, type ProtocolLimits, requestChunks, requestHave } from './protocol.js'

export interface PeerSourceComponents {
  /** This node's peer id. */
  self: string
  book: PeerBook
  /** Peers that announced a DHT key (a `sha256:` digest), as they are found. */
  findProviders(digest: string, options?: AbortOptions): AsyncIterable<string>
  /** A new chunk-protocol stream to `peer`. */
  openStream(peer: string, options?: AbortOptions): Promise<Stream>
  /** Connected peers that speak the chunk protocol: the cluster as this node sees it. */
  members(): string[]
  /** The image a layer was opened from (sent with forwarded requests, so the home node can open it too). */
  imageOf?(layer: string): string | undefined
  limits?: ProtocolLimits
  /** Told about each chunk a peer sent (before verification). */
  onFetched?(peer: string, bytes: number): void
  /** Told when a peer's chunk failed verification. */
  onBad?(peer: string, chunk: ChunkRef, reason: string): void
}

interface Context {
  /** Serving another node's `fetch`: do not forward again (no loops between nodes that see the cluster differently). */
  forwarded?: boolean
  /** The cluster to split chunks over (cluster warm-up), instead of the connected peers. */
  members?: string[]
}

const context = new AsyncLocalStorage<Context>()

/** Runs `fn` as the home node of a forwarded request: chunks come from peers that hold them or the registry. */
export function runForwarded<T>(fn: () => Promise<T>): Promise<T> {
  return context.run({ ...context.getStore(), forwarded: true }, fn)
}

/** True while serving another node's forwarded request (see runForwarded): what is fetched is for that peer. */
export function isForwarded(): boolean {
  return context.getStore()?.forwarded === true
}

/** Runs `fn` with chunk homes chosen among `members` (the cluster of a warm-up). */
export function runWithMembers<T>(members: string[], fn: () => Promise<T>): Promise<T> {
  return context.run({ ...context.getStore(), members }, fn)
}

/**
 * Chunks are homed by segment (a layer's compressed range cut into SEGMENT-byte pieces), not one by one: a home
 * then reads runs of adjacent chunks, which the registry source coalesces into few Range requests.
 */
const SEGMENT = 1 << 20

export function homeKey(chunk: ChunkRef): string {
  return `${chunk.layer}/${Math.floor(chunk.offset / SEGMENT)}`
}

/** The member that is home of `key`: rendezvous (highest random weight) hashing, so all agree without talking. */
export function homeOf(key: string, members: string[]): string | undefined {
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

const PROVIDER_TTL_MS = 15_000
const NO_PROVIDER_TTL_MS = 2_000
const LOOKUP_TIMEOUT_MS = 5_000
/** How long a read waits for a layer's DHT lookup before asking the connected peers (the lookup goes on). */
const LOOKUP_PATIENCE_MS = 250
const MAX_PROVIDERS = 8
const MAX_TRIES = 3
/** Peers asked `have` for one layer's chunks in all: its known holders first, then other connected peers. */
const MAX_PROBES = 8
/** Layers whose holders are remembered (the oldest is forgotten first). */
const MAX_HOLDER_LAYERS = 10_000
/** Chunks per `get` request to a holder, and per `fetch` request to a home (which may have to go to the registry). */
const BATCH = 256
const FETCH_BATCH = 64

/**
 * The `peer` ChunkSource. For a chunk: the peers known to hold its layer (those that said so, and its DHT
 * providers), then the other connected peers, best measured first, asked which chunks they hold: a node that
 * has just warmed an image serves it before the DHT has spread its announcements. Then providers of the chunk
 * itself; then the chunk's home node (rendezvous over the cluster), which fetches it once for everyone. Returns
 * bytes unverified: the fetcher checks them and calls reportBad.
 */
export class PeerSource implements ChunkSource {
  readonly name = 'peer'
  private readonly limits: ProtocolLimits
  private readonly providers = new Map<string, { peers: Promise<string[]>; expires: number }>()
  /** Which peer sent a digest last, so reportBad can blame it. Bounded. */
  private readonly origin = new Map<string, string>()
  /** Per layer, the peers that answered `have` with some of its chunks. Bounded. */
  private readonly holders = new Map<string, Set<string>>()

  constructor(private readonly components: PeerSourceComponents) {
    this.limits = components.limits ?? DEFAULT_LIMITS
  }

  async get(chunk: ChunkRef, options?: AbortOptions): Promise<Uint8Array | undefined> {
    const getOne = (peer: string, signal: AbortSignal) => this.ask(peer, { op: 'get', digests: [chunk.digest] }, signal)
    const { found, asked } = await this.locate(chunk.layer, [chunk.digest], options)
    let got = await this.firstOf([...found.keys()], getOne, options)
    if (got !== undefined) return got
    // A home node serving a forwarded request asks no more: it is the one to go to the registry.
    if (context.getStore()?.forwarded !== true) {
      const providers = await this.providersOf(chunk.digest, options)
      const peers = this.components.book.rank(providers).filter((p) => !asked.has(p))
      got = await this.firstOf(peers.slice(0, MAX_TRIES), getOne, options)
      if (got !== undefined) return got
    }
    // The home is asked even when it lacked the chunk: it fetches it once for the cluster.
    const home = this.home(chunk)
    if (home === undefined) return undefined
    const request = { op: 'fetch' as const, chunks: [chunk], ...this.refOf(chunk.layer) }
    return this.firstOf([home], (peer, signal) => this.ask(peer, request, signal), options)
  }

  async *getMany(chunks: ChunkRef[], options?: AbortOptions): AsyncIterable<{ chunk: ChunkRef; bytes: Uint8Array }> {
    const left = new Map<string, ChunkRef[]>()
    for (const c of chunks) left.set(c.digest, [...(left.get(c.digest) ?? []), c])
    // Ask who holds what (the layer's known holders, then the connected peers), then get each chunk from the best
    // peer holding it. Only what no peer holds goes to its home below: never a colder node than a holder.
    const assigned = new Map<string, string[]>()
    for (const layer of new Set(chunks.map((c) => c.layer))) {
      const wanted = [...new Set(chunks.filter((c) => c.layer === layer).map((c) => c.digest))]
      const { found } = await this.locate(layer, wanted, options)
      for (const [peer, digests] of found) assigned.set(peer, [...(assigned.get(peer) ?? []), ...digests])
    }
    const fromHolders = [...assigned].map(([peer, digests]) => this.stream(peer, 'get', digests, left, options))
    for await (const got of merge(fromHolders)) yield* this.deliver(got, left)
    // What no holder sent: ask each chunk's home node to fetch it once for the cluster.
    // One stream per (home, image): a forwarded request names the image its chunks come from.
    const homes = new Map<string, { peer: string; refs: ChunkRef[] }>()
    for (const refs of left.values()) {
      const peer = this.home(refs[0]!)
      if (peer === undefined) continue
      const key = `${peer} ${this.refOf(refs[0]!.layer).ref ?? ''}`
      const group = homes.get(key) ?? { peer, refs: [] }
      group.refs.push(refs[0]!)
      homes.set(key, group)
    }
    const fromHomes = [...homes.values()].map((g) => this.stream(g.peer, 'fetch', g.refs, left, options))
    for await (const got of merge(fromHomes)) yield* this.deliver(got, left)
  }

  reportBad(chunk: ChunkRef, reason: string): void {
    const peer = this.origin.get(chunk.digest)
    if (peer === undefined) return
    this.components.book.bad(peer)
    this.components.onBad?.(peer, chunk, reason)
    // Whatever that peer announced or said it holds is suspect: look holders up afresh.
    this.providers.delete(chunk.layer)
    this.providers.delete(chunk.digest)
    this.holders.delete(chunk.layer)
  }

  /**
   * Which peers hold which of `digests` (chunks of `layer`), each digest given to the best-ranked peer holding
   * it. Asked with `have`, all of a round at once: first the layer's known holders and DHT providers (up to
   * MAX_TRIES), then, for what they lack, other connected peers best-ranked first (up to MAX_PROBES in all): the
   * DHT may not have heard of a holder yet. Peers that hold some are remembered as holders of the layer.
   */
  private async locate(
    layer: string,
    digests: string[],
    options?: AbortOptions
  ): Promise<{ found: Map<string, string[]>; asked: Set<string> }> {
    const { book } = this.components
    const known = book
      .rank([...(this.holders.get(layer) ?? []), ...(await this.providersSoon(layer, options))])
      .filter((p) => p !== this.components.self)
      .slice(0, MAX_TRIES)
    const others = book
      .rank(this.components.members())
      .filter((p) => p !== this.components.self && !known.includes(p))
      .slice(0, MAX_PROBES - known.length)
    const found = new Map<string, string[]>()
    const asked = new Set<string>()
    let left = digests
    for (const round of [known, others]) {
      if (left.length === 0) break
      const answers = await Promise.all(round.map((peer) => this.askHave(peer, left, options)))
      const taken = new Set<string>()
      for (const [k, peer] of round.entries()) {
        asked.add(peer)
        const have = answers[k]
        if (have === undefined) {
          this.holders.get(layer)?.delete(peer)
          continue
        }
        const mine = left.filter((d, j) => have[j] === true && !taken.has(d))
        if (have.some((h) => h)) this.holdsLayer(layer, peer)
        if (mine.length === 0) continue
        for (const d of mine) taken.add(d)
        found.set(peer, mine)
      }
      left = left.filter((d) => !taken.has(d))
    }
    return { found, asked }
  }

  private holdsLayer(layer: string, peer: string): void {
    const set = this.holders.get(layer) ?? new Set<string>()
    set.add(peer)
    this.holders.delete(layer)
    this.holders.set(layer, set)
    if (this.holders.size > MAX_HOLDER_LAYERS) this.holders.delete(this.holders.keys().next().value as string)
  }

  private refOf(layer: string): { ref?: string } {
    const ref = this.components.imageOf?.(layer)
    return ref !== undefined ? { ref } : {}
  }

  /** The chunk's home among the cluster, unless it is this node or we are serving a forwarded request. */
  home(chunk: ChunkRef): string | undefined {
    const ctx = context.getStore()
    if (ctx?.forwarded === true) return undefined
    const members = (ctx?.members ?? [this.components.self, ...this.components.members()]).filter(
      (m) => m === this.components.self || !this.components.book.isBanned(m)
    )
    const home = homeOf(homeKey(chunk), members)
    return home === this.components.self ? undefined : home
  }

  private providersOf(key: string, options?: AbortOptions): Promise<string[]> {
    const cached = this.providers.get(key)
    if (cached !== undefined && cached.expires > Date.now()) return cached.peers
    const entry = { peers: this.lookup(key, options), expires: Date.now() + PROVIDER_TTL_MS }
    this.providers.set(key, entry)
    void entry.peers.then((peers) => {
      if (peers.length === 0) entry.expires = Date.now() + NO_PROVIDER_TTL_MS
    })
    return entry.peers
  }

  /** The key's providers as far as known within LOOKUP_PATIENCE_MS; none when the lookup takes longer. */
  private async providersSoon(key: string, options?: AbortOptions): Promise<string[]> {
    let timer: NodeJS.Timeout | undefined
    const patience = new Promise<string[]>((resolve) => {
      timer = setTimeout(() => resolve([]), LOOKUP_PATIENCE_MS)
    })
    try {
      return await Promise.race([this.providersOf(key, options), patience])
    } finally {
      clearTimeout(timer)
    }
  }

  private async lookup(key: string, options?: AbortOptions): Promise<string[]> {
    const signals = [AbortSignal.timeout(LOOKUP_TIMEOUT_MS)]
    if (options?.signal !== undefined) signals.push(options.signal)
    const found = new Set<string>()
    try {
      for await (const peer of this.components.findProviders(key, { signal: AbortSignal.any(signals) })) {
        if (peer !== this.components.self) found.add(peer)
        if (found.size >= MAX_PROVIDERS) break
      }
    } catch {
      // A lookup that timed out still returns the providers found so far.
    }
    return [...found]
  }

  private remember(digest: string, peer: string): void {
    this.origin.delete(digest)
    this.origin.set(digest, peer)
    if (this.origin.size > 100_000) this.origin.delete(this.origin.keys().next().value as string)
  }

  /** One request for one chunk; undefined when the peer lacks it or fails (the failure is recorded). */
  private async ask(
    peer: string,
    request: { op: 'get'; digests: string[] } | { op: 'fetch'; chunks: ChunkRef[]; ref?: string },
    signal: AbortSignal
  ): Promise<Uint8Array | undefined> {
    const started = Date.now()
    try {
      const stream = await this.components.openStream(peer, { signal })
      for await (const answer of requestChunks(stream, peer, request, this.limits, { signal })) {
        if (answer.bytes === undefined) return undefined
        this.components.book.success(peer, Date.now() - started, answer.bytes.byteLength)
        this.components.onFetched?.(peer, answer.bytes.byteLength)
        const digest = request.op === 'get' ? request.digests[0]! : request.chunks[0]!.digest
        this.remember(digest, peer)
        return answer.bytes
      }
      return undefined
    } catch {
      if (!signal.aborted) this.components.book.failure(peer)
      return undefined
    }
  }

  /** Which of `digests` the peer holds (in requests of at most maxDigestsPerRequest); undefined when it failed. */
  private async askHave(peer: string, digests: string[], options?: AbortOptions): Promise<boolean[] | undefined> {
    const out: boolean[] = []
    try {
      for (let i = 0; i < digests.length; i += this.limits.maxDigestsPerRequest) {
        const stream = await this.components.openStream(peer, options)
        const batch = digests.slice(i, i + this.limits.maxDigestsPerRequest)
        out.push(...(await requestHave(stream, peer, batch, this.limits, options)))
      }
      return out
    } catch {
      if (options?.signal?.aborted !== true) this.components.book.failure(peer)
      return undefined
    }
  }

  /** Asks `peers` in order, hedging: the next starts when one lacks the chunk or is slower than expected. */
  private firstOf(
    peers: string[],
    ask: (peer: string, signal: AbortSignal) => Promise<Uint8Array | undefined>,
    options?: AbortOptions
  ): Promise<Uint8Array | undefined> {
    if (peers.length === 0) return Promise.resolve(undefined)
    const controller = new AbortController()
    const signal =
      options?.signal !== undefined ? AbortSignal.any([options.signal, controller.signal]) : controller.signal
    return new Promise((resolve) => {
      let next = 0
      let running = 0
      let done = false
      const finish = (bytes: Uint8Array | undefined) => {
        done = true
        controller.abort()
        resolve(bytes)
      }
      const start = () => {
        if (done) return
        if (next >= peers.length || signal.aborted) {
          if (running === 0) finish(undefined)
          return
        }
        const peer = peers[next++]!
        running++
        const hedge = setTimeout(start, Math.max(50, 3 * this.components.book.latency(peer)))
        void ask(peer, signal).then((bytes) => {
          clearTimeout(hedge)
          running--
          if (done) return
          if (bytes !== undefined) finish(bytes)
          else start()
        })
      }
      start()
    })
  }

  /** Streams chunks from one peer in batches; stops at the first failure (what is left goes elsewhere). */
  private async *stream(
    peer: string,
    op: 'get' | 'fetch',
    items: string[] | ChunkRef[],
    left: Map<string, ChunkRef[]>,
    options?: AbortOptions
  ): AsyncGenerator<{ peer: string; digest: string; bytes: Uint8Array }> {
    const size = op === 'get' ? BATCH : FETCH_BATCH
    for (let i = 0; i < items.length; i += size) {
      const batch = items.slice(i, i + size)
      const digests = batch.map((x) => (typeof x === 'string' ? x : x.digest))
      const refs = batch.filter((x): x is ChunkRef => typeof x !== 'string')
      const request = op === 'get' ? { op, digests } : { op, chunks: refs, ...this.refOf(refs[0]!.layer) }
      const started = Date.now()
      let bytes = 0
      try {
        const stream = await this.components.openStream(peer, options)
        for await (const answer of requestChunks(stream, peer, request, this.limits, options)) {
          const digest = digests[answer.index]!
          if (answer.bytes === undefined || !left.has(digest)) continue
          bytes += answer.bytes.byteLength
          this.components.onFetched?.(peer, answer.bytes.byteLength)
          this.remember(digest, peer)
          yield { peer, digest, bytes: answer.bytes }
        }
        this.components.book.success(peer, Date.now() - started, bytes)
      } catch {
        if (options?.signal?.aborted !== true) this.components.book.failure(peer)
        return
      }
    }
  }

  private *deliver(
    got: { digest: string; bytes: Uint8Array },
    left: Map<string, ChunkRef[]>
  ): Generator<{ chunk: ChunkRef; bytes: Uint8Array }> {
    const refs = left.get(got.digest)
    if (refs === undefined) return
    left.delete(got.digest)
    for (const chunk of refs) yield { chunk, bytes: got.bytes }
  }
}

/** Yields from all sources as each produces. */
async function* merge<T>(sources: AsyncIterable<T>[]): AsyncGenerator<T> {
  const iterators = sources.map((s) => s[Symbol.asyncIterator]())
  const next = (i: number) => iterators[i]!.next().then((result) => ({ i, result }))
  const pending = new Map(iterators.map((_, i) => [i, next(i)]))
  try {
    while (pending.size > 0) {
      const { i, result } = await Promise.race(pending.values())
      if (result.done === true) {
        pending.delete(i)
        continue
      }
      pending.set(i, next(i))
      yield result.value
    }
  } finally {
    await Promise.all(iterators.map((it) => it.return?.()))
  }
}
