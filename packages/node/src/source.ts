import type { Stream } from '@libp2p/interface'
import type { AbortOptions } from '@strata/base'
import type { ChunkRef, ChunkSource, Route, SourceOptions } from '@strata/fetcher'
import type { PeerRefusedError } from './errors.js'
import { HOME_WALK_AT, type HomeSets, homeKey, homeOf } from './homes.js'
import type { PeerBook } from './peers.js'
import { DEFAULT_LIMITS, type ProtocolLimits, requestChunks, requestHave } from './protocol.js'
import { merge, sleep } from './streams.js'

export interface PeerSourceComponents {
  /** This node's peer id. */
  self: string
  book: PeerBook
  /** Peers that announced a DHT key (a `sha256:` digest), as they are found. */
  findProviders(digest: string, options?: AbortOptions): AsyncIterable<string>
  /** A new chunk-protocol stream to `peer`. */
  openStream(peer: string, options?: AbortOptions): Promise<Stream>
  /**
   * Connected peers that speak the chunk protocol: the cluster as this node sees it. (Peers that answered in the
   * last minute count too, while their connection is dialled again: see PeerSource.cluster.)
   */
  members(): string[]
  /**
   * The image a layer was opened from, sent as the `ref` of forwarded requests: each chunk carries its repository
   * now (LayerRef), so this is for older home nodes, which read the registry only for images they opened, and
   * for the home node to open the image too (see chunk-wire.ts).
   */
  imageOf?(layer: string): string | undefined
  /**
   * The home sets of a large cluster (homes.ts): a layer's homes are chosen among its set, not among the connected
   * peers, once this node sees HOME_WALK_AT strata peers and a walk has shown the cluster past HOME_SET_SIZE.
   */
  homeSets?: Pick<HomeSets, 'of' | 'soon'>
  limits?: ProtocolLimits
  /** Told about each chunk a peer sent (before verification), and the route of the fetch it was for. */
  onFetched?(peer: string, bytes: number, route: Route | undefined): void
  /** Told when a peer's chunk failed verification. */
  onBad?(peer: string, chunk: ChunkRef, reason: string): void
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
 * A peer that answered this recently is still a member of the cluster while its connection is down: asking it
 * dials it again. (A reset connection drops the peer from the connected peers until something dials it.)
 */
const MEMBER_GRACE_MS = 60_000
/** Rounds of asking holders in one getMany: the first, then again for peers whose request failed. */
const PASSES = 3
/** The wait before asking again a peer whose request failed; four times that before the round after. */
const AGAIN_WAIT_MS = 200
/** Times a request refused as busy is asked again of the same peer, after BUSY_WAIT_MS, then twice that. */
const BUSY_RETRIES = 2
const BUSY_WAIT_MS = 200

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

  async get(chunk: ChunkRef, options?: SourceOptions): Promise<Uint8Array | undefined> {
    const route = options?.route
    const getOne = (peer: string, signal: AbortSignal) =>
      this.ask(peer, { op: 'get', digests: [chunk.digest] }, signal, route)
    const { found, asked } = await this.locate(chunk.layer.digest, [chunk.digest], options)
    let got = await this.firstOf([...found.keys()], getOne, options)
    if (got !== undefined) return got
    // A home node serving a forwarded request asks no more: it is the one to go to the registry.
    if (route?.forwarded !== true) {
      const providers = await this.providersOf(chunk.digest, options)
      const peers = this.components.book.rank(providers).filter((p) => !asked.has(p))
      got = await this.firstOf(peers.slice(0, MAX_TRIES), getOne, options)
      if (got !== undefined) return got
    }
    // The home is asked even when it lacked the chunk: it fetches it once for the cluster.
    const home = this.home(chunk, route)
    if (home === undefined) return undefined
    const request = { op: 'fetch' as const, chunks: [chunk], ...this.refOf(chunk.layer.digest) }
    return this.firstOf([home], (peer, signal) => this.ask(peer, request, signal, route), options)
  }

  async *getMany(chunks: ChunkRef[], options?: SourceOptions): AsyncIterable<{ chunk: ChunkRef; bytes: Uint8Array }> {
    const left = new Map<string, ChunkRef[]>()
    for (const c of chunks) left.set(c.digest, [...(left.get(c.digest) ?? []), c])
    // Starts the walks for the layers' home sets, if this is a large cluster and they are not known yet.
    for (const refs of left.values()) this.homeSet(refs[0]!.layer.digest)
    // Ask who holds what (the layer's known holders, then the connected peers), then get each chunk from the best
    // peer holding it. Only what no peer holds goes to its home below: never a colder node than a holder.
    // A peer whose request failed (its connection was reset, say) is asked again over a new stream, after a
    // moment (a connection that just died takes that long to be seen as closed, and is not dialled anew before):
    // what it held would otherwise go to the registry. Only a peer that answered lately, and is not banned by
    // now: a provider the DHT names that never answered (a node long gone) costs no wait.
    let again: string[] = []
    for (let pass = 0; pass < PASSES && left.size > 0; pass++) {
      if (pass > 0) {
        try {
          await sleep(AGAIN_WAIT_MS * 4 ** (pass - 1), options?.signal)
        } catch {
          return
        }
      }
      const failed = new Set<string>()
      const assigned = new Map<string, string[]>()
      const pending = [...left.values()].map((refs) => refs[0]!)
      for (const layer of new Set(pending.map((c) => c.layer.digest))) {
        const wanted = pending.filter((c) => c.layer.digest === layer).map((c) => c.digest)
        const located = await this.locate(layer, wanted, options, again)
        for (const peer of located.failed) failed.add(peer)
        for (const [peer, digests] of located.found) assigned.set(peer, [...(assigned.get(peer) ?? []), ...digests])
      }
      const fromHolders = [...assigned].map(([peer, digests]) =>
        this.stream(peer, 'get', digests, left, options, () => failed.add(peer))
      )
      for await (const got of merge(fromHolders)) yield* this.deliver(got, left)
      if (options?.signal?.aborted === true) return
      const alive = new Set(this.components.book.answeredWithin(MEMBER_GRACE_MS))
      again = [...failed].filter((p) => alive.has(p))
      if (again.length === 0) break
    }
    // What no holder sent: ask each chunk's home node to fetch it once for the cluster.
    // One stream per (home, image): a forwarded request names the image its chunks come from.
    // In a large cluster, a layer's home set may still be walked for (a cold start): wait for it a moment, else
    // home by the connected peers as a small cluster does.
    if (left.size > 0 && options?.route?.members === undefined && options?.route?.forwarded !== true) {
      const layers = new Set([...left.values()].map((refs) => refs[0]!.layer.digest))
      await Promise.all([...layers].map((layer) => this.homeSetSoon(layer)))
    }
    const homes = new Map<string, { peer: string; refs: ChunkRef[] }>()
    for (const refs of left.values()) {
      const peer = this.home(refs[0]!, options?.route)
      if (peer === undefined) continue
      const key = `${peer} ${this.refOf(refs[0]!.layer.digest).ref ?? ''}`
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
    this.providers.delete(chunk.layer.digest)
    this.providers.delete(chunk.digest)
    this.holders.delete(chunk.layer.digest)
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
    options?: AbortOptions,
    also: string[] = []
  ): Promise<{ found: Map<string, string[]>; asked: Set<string>; failed: Set<string> }> {
    const { book } = this.components
    // Peers that held these chunks a moment ago (their request failed) first: a provider the DHT names may be a
    // node long gone, and one never asked ranks ahead of one that just failed.
    const again = book.rank(also).filter((p) => p !== this.components.self)
    const known = [
      ...again,
      ...book
        .rank([...(this.holders.get(layer) ?? []), ...(await this.providersSoon(layer, options))])
        .filter((p) => p !== this.components.self && !again.includes(p))
    ].slice(0, Math.max(MAX_TRIES, again.length))
    const others = book
      .rank(this.cluster())
      .filter((p) => p !== this.components.self && !known.includes(p))
      .slice(0, Math.max(0, MAX_PROBES - known.length))
    const found = new Map<string, string[]>()
    const asked = new Set<string>()
    const failed = new Set<string>()
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
          failed.add(peer)
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
    return { found, asked, failed }
  }

  /**
   * The cluster as this node sees it: the connected strata peers, and those that answered within MEMBER_GRACE_MS
   * (asking one whose connection was reset dials it again), banned peers left out by the callers' ranking.
   */
  private cluster(): string[] {
    return [...new Set([...this.components.members(), ...this.components.book.answeredWithin(MEMBER_GRACE_MS)])]
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

  /**
   * The chunk's home among the route's members (a cluster warm-up) or else the cluster, unless it is this node or
   * the route is a forwarded request's (not forwarded again: no loops between nodes that see the cluster
   * differently).
   */
  home(chunk: ChunkRef, route?: Route): string | undefined {
    if (route?.forwarded === true) return undefined
    const home = homeOf(homeKey(chunk), this.homesFor(chunk.layer.digest, route))
    return home === this.components.self ? undefined : home
  }

  /**
   * The members homes are chosen among for `key` (a layer's digest): the route's (a cluster warm-up), else the
   * key's home set in a large cluster, else this node and the connected cluster; banned peers left out.
   */
  homesFor(key: string, route?: Route): string[] {
    const members = route?.members ?? this.homeSet(key) ?? [this.components.self, ...this.cluster()]
    return members.filter((m) => m === this.components.self || !this.components.book.isBanned(m))
  }

  /** The key's home set when this is a large cluster and it is known (a walk for it starts if not). */
  private homeSet(key: string): string[] | undefined {
    if (this.components.homeSets === undefined || this.cluster().length < HOME_WALK_AT) return undefined
    return this.components.homeSets.of(key)
  }

  /** As homeSet, waiting at most LOOKUP_PATIENCE_MS for a walk under way. */
  private async homeSetSoon(key: string): Promise<string[] | undefined> {
    if (this.components.homeSets === undefined || this.cluster().length < HOME_WALK_AT) return undefined
    return this.components.homeSets.soon(key, LOOKUP_PATIENCE_MS)
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
    signal: AbortSignal,
    route: Route | undefined
  ): Promise<Uint8Array | undefined> {
    const started = Date.now()
    try {
      const stream = await this.components.openStream(peer, { signal })
      for await (const answer of requestChunks(stream, peer, request, this.limits, { signal })) {
        if (answer.bytes === undefined) return undefined
        this.components.book.success(peer, Date.now() - started, answer.bytes.byteLength)
        this.components.onFetched?.(peer, answer.bytes.byteLength, route)
        const digest = request.op === 'get' ? request.digests[0]! : request.chunks[0]!.digest
        this.remember(digest, peer)
        return answer.bytes
      }
      return undefined
    } catch (err) {
      // A single chunk is latency-bound: a busy peer is not waited for, the next one is asked.
      if (!signal.aborted) this.penalise(peer, err, started)
      return undefined
    }
  }

  /** Records a failed request of `peer` that began at `started`: a busy refusal is not a failure. */
  private penalise(peer: string, err: unknown, started: number): void {
    if (isBusy(err)) this.components.book.busy(peer)
    else this.components.book.failure(peer, started)
  }

  /**
   * Runs one request of `peer`, asking again (at most BUSY_RETRIES times, after a wait that doubles) while the peer
   * refuses it as busy: it is alive and says so, and what it holds would otherwise go to the registry.
   */
  private async unlessBusy<T>(peer: string, request: () => Promise<T>, options?: AbortOptions): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await request()
      } catch (err) {
        if (!isBusy(err) || attempt >= BUSY_RETRIES || options?.signal?.aborted === true) throw err
        this.components.book.busy(peer)
        await sleep(BUSY_WAIT_MS * 2 ** attempt * (0.5 + Math.random()), options?.signal)
      }
    }
  }

  /** Which of `digests` the peer holds (in requests of at most maxDigestsPerRequest); undefined when it failed. */
  private async askHave(peer: string, digests: string[], options?: AbortOptions): Promise<boolean[] | undefined> {
    const out: boolean[] = []
    let started = Date.now()
    try {
      for (let i = 0; i < digests.length; i += this.limits.maxDigestsPerRequest) {
        const batch = digests.slice(i, i + this.limits.maxDigestsPerRequest)
        const have = await this.unlessBusy(
          peer,
          async () => {
            started = Date.now()
            const stream = await this.components.openStream(peer, options)
            return requestHave(stream, peer, batch, this.limits, options)
          },
          options
        )
        out.push(...have)
      }
      this.components.book.success(peer, Date.now() - started, 0)
      return out
    } catch (err) {
      if (options?.signal?.aborted !== true) this.penalise(peer, err, started)
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

  /**
   * Streams chunks from one peer in batches; stops at the first failure (what is left goes elsewhere, and
   * `onFailure` hears of it). A batch refused as busy is asked again after a wait (see unlessBusy).
   */
  private async *stream(
    peer: string,
    op: 'get' | 'fetch',
    items: string[] | ChunkRef[],
    left: Map<string, ChunkRef[]>,
    options?: SourceOptions,
    onFailure?: () => void
  ): AsyncGenerator<{ peer: string; digest: string; bytes: Uint8Array }> {
    const size = op === 'get' ? BATCH : FETCH_BATCH
    for (let i = 0; i < items.length; i += size) {
      const batch = items.slice(i, i + size)
      const digests = batch.map((x) => (typeof x === 'string' ? x : x.digest))
      const refs = batch.filter((x): x is ChunkRef => typeof x !== 'string')
      for (let attempt = 0; ; attempt++) {
        // What an earlier attempt delivered is not asked again.
        const wanted = digests.filter((d) => left.has(d))
        if (wanted.length === 0) break
        const request =
          op === 'get'
            ? { op, digests: wanted }
            : { op, chunks: refs.filter((r) => left.has(r.digest)), ...this.refOf(refs[0]!.layer.digest) }
        const started = Date.now()
        let bytes = 0
        try {
          const stream = await this.components.openStream(peer, options)
          for await (const answer of requestChunks(stream, peer, request, this.limits, options)) {
            const digest = wanted[answer.index]!
            this.components.book.heard(peer)
            if (answer.bytes === undefined || !left.has(digest)) continue
            bytes += answer.bytes.byteLength
            this.components.onFetched?.(peer, answer.bytes.byteLength, options?.route)
            this.remember(digest, peer)
            yield { peer, digest, bytes: answer.bytes }
          }
          this.components.book.success(peer, Date.now() - started, bytes)
          break
        } catch (err) {
          if (options?.signal?.aborted === true) return
          if (isBusy(err) && attempt < BUSY_RETRIES) {
            this.components.book.busy(peer)
            try {
              await sleep(BUSY_WAIT_MS * 2 ** attempt * (0.5 + Math.random()), options?.signal)
            } catch {
              return
            }
            continue
          }
          this.penalise(peer, err, started)
          onFailure?.()
          return
        }
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

function isBusy(err: unknown): boolean {
  return (err as Error | undefined)?.name === 'PeerRefusedError' && (err as PeerRefusedError).reason === 'busy'
}
