/**
 * A p2pd node, as a composition: the libp2p host (host.ts) and the cluster as this node sees it (membership.ts);
 * the peer and registry chunk sources and the fetcher over them; the chunk server, which also serves the chunks
 * peers forward to this node as their home (fetchForPeer); the blob mirror; the image catalog (catalog.ts); the
 * warm-up service (warm-service.ts); and announcements (announcer.ts). Wired, started and stopped here, and
 * their counters gathered into status().
 */
import type { Libp2p, PeerId, Stream } from '@libp2p/interface'
import type { KadDHT } from '@libp2p/kad-dht'
import { peerIdFromString } from '@libp2p/peer-id'
import { type AbortOptions, META } from '@strata/base'
import type { ChunkRef, ChunkSource, Fetcher, FetcherInit, Image, Route } from '@strata/fetcher'
import { createFetcher, createRegistrySource } from '@strata/fetcher'
import { createRegistryClient, type RegistryClient } from '@strata/registry'
import type { ChunkStore, StoreStats } from '@strata/store'
import { Announcer, type AnnounceStats } from './announcer.js'
import { type Catalog, type CatalogInit, catalog, type ImageRecord, type OpenImageOptions } from './catalog.js'
import { countedSource } from './counted.js'
import { HomeSets, homeOf } from './homes.js'
import { createHost, type HostInit } from './host.js'
import { digestToCid } from './keys.js'
import { type Membership, type MembershipInit, membership } from './membership.js'
import { BLOB_PROTOCOL, Mirror, type MirrorStats } from './mirror.js'
import { PeerBook, type PeerScore } from './peers.js'
import { ByteBudget, CHUNK_PROTOCOL, ChunkServer, DEFAULT_LIMITS, type ProtocolLimits } from './protocol.js'
import { PeerSource } from './source.js'
import type { WarmProgress, WarmResult } from './warm.js'
import { type ClusterWarmProgress, type ClusterWarmResult, type WarmService, warmService } from './warm-service.js'

/**
 * The node's configuration: with the host's (listen, mdns, pskFile, and for simulations of many nodes in one
 * process, bench/sim.ts, libp2p's transports and datastore) and the catalog's (maxReferences, maxOpenedFiles,
 * registries).
 */
export interface NodeInit extends Omit<HostInit, 'requestTimeoutMs'>, MembershipInit, CatalogInit {
  /** The chunk store this node owns (serves from it, announces what it holds). */
  store: ChunkStore & { gc?(options?: AbortOptions): Promise<unknown> }
  /** Holds the identity key (`peer.key`, 0600) and the node's own metadata. */
  dataDir: string
  /** Told what an operator should know of (p2pd logs it): a peer caught sending a wrong blob, say. */
  log?: (message: string) => void
  /**
   * The registry client (from @strata/registry). The node opens images with it and reads from the registry
   * what no peer has; without one the node serves and fetches from peers only.
   */
  registry?: RegistryClient
  /**
   * Tuning of the node's fetcher (peers first, then the registry). Default hedge delay 8 s of silence: a home
   * node asked for chunks may itself be waiting on a busy registry, and every hedge costs registry egress. (A
   * dead peer costs no wait: its connection fails and the registry is asked at once.)
   */
  fetcher?: Omit<FetcherInit, 'store' | 'sources'>
  /** Limits of the chunk protocol. */
  limits?: Partial<ProtocolLimits>
  /** DHT provides running at once and started per second (background chunk announcements). */
  announce?: { concurrency?: number; ratePerSecond?: number; reannounceMs?: number }
  /** Penalties: failures that ban a peer and for how long. */
  bans?: { banAfter?: number; banMs?: number }
}

export interface PeerStatus extends Partial<PeerScore> {
  peer: string
  addrs: string[]
  /** Speaks the chunk protocol (a strata node, not only a DHT peer). */
  strata: boolean
}

export interface NodeStatus {
  peerId: string
  addrs: string[]
  peers: number
  bytes: {
    /** Chunk bytes this node sent to peers. */
    served: number
    /** Chunk bytes fetched for this node's own reads, per source (`peer`, `registry`, `store` hits). */
    fetched: Record<string, number>
    /**
     * Chunk bytes fetched as the home of peers' chunks (to serve their forwarded requests), per source: the rest
     * of this node's registry egress. They are served to those peers (and kept), so they count in `served` too.
     */
    fetchedForPeers: Record<string, number>
  }
  /** Peers' requests: answered, failed, and chunk bytes held for answers not yet taken by their readers. */
  requests: { served: number; errors: number; queuedBytes: number }
  store: StoreStats
  announce: AnnounceStats
  /** The pull-through mirror's blobs (see mirror.ts): bytes served to runtimes and where they came from. */
  mirror: MirrorStats
}

/** A running p2pd node. */
export interface StrataNode {
  readonly peerId: string
  readonly fetcher: Fetcher
  /** The `peer` ChunkSource (what the fetcher asks before the registry). */
  readonly source: ChunkSource
  /** Whole blobs for the pull-through mirror (startMirrorServer serves them over HTTP). */
  readonly mirror: Mirror
  /**
   * Opens an image (manifest, verified TOCs) and lets the fetcher read its layers from the registry. The image
   * is the one `ref` names now: its manifest is asked for every time (a tag moves), and an image already
   * opened (by manifest digest) is not opened again. When the registry cannot be reached (an outage, not a
   * refusal), a reference opened before on this node gives the image it named then, and `onStale` hears why.
   */
  openImage(ref: string, options?: OpenImageOptions): Promise<Image>
  addrs(): string[]
  peers(): PeerStatus[]
  /** Peers the DHT names as holding `digest` (a layer, TOC, chunk or blob), as found within the signal's time. */
  providers(digest: string, options?: AbortOptions): Promise<string[]>
  status(options?: AbortOptions): Promise<NodeStatus>
  images(options?: AbortOptions): Promise<ImageRecord[]>
  /** Fills the local store with every chunk of the image. */
  warm(ref: string, options?: AbortOptions & { onProgress?: (p: WarmProgress) => void }): Promise<WarmResult>
  /** Every reachable node fetches its share of the image, then the rest from the others. */
  warmCluster(
    ref: string,
    options?: AbortOptions & { onProgress?: (p: ClusterWarmProgress) => void }
  ): Promise<ClusterWarmResult>
  gc(options?: AbortOptions): Promise<unknown>
  /** Resolves when the announcement backlog is empty. */
  announced(): Promise<void>
  /** Stops accepting requests, lets in-flight ones finish (up to `graceMs`), stops libp2p. The store stays open. */
  stop(options?: { graceMs?: number }): Promise<void>
}

class Node implements StrataNode {
  readonly peerId: string
  readonly fetcher: Fetcher
  readonly source: PeerSource
  readonly mirror: Mirror
  private readonly server: ChunkServer
  /** Bytes of answers to peers not yet read by them, over the chunk and blob protocols (limits.maxQueuedBytes). */
  private readonly queued: ByteBudget
  private readonly announcer: Announcer
  private readonly catalog: Catalog
  private readonly warming: WarmService
  private readonly book: PeerBook
  /** The strata peers connected: the cluster as this node sees it. */
  private readonly cluster: Membership
  private readonly homeSets: HomeSets
  private readonly coarse = new Set<string>()
  private served = 0
  private requestsServed = 0
  private requestErrors = 0
  private readonly inflight = new Set<Promise<void>>()
  private readonly onPut: (e: Event) => void
  private readonly onEvict: (e: Event) => void
  /** Bytes received while serving forwarded requests, per source (see NodeStatus.bytes.fetchedForPeers). */
  private readonly forPeers: Record<string, number> = { peer: 0, registry: 0 }
  /**
   * The registry, for every image: each chunk's LayerRef names its repository. For a forwarded request only a
   * registry a peer may name (mayOpenForPeer): a repository in a peer's chunk ref must not widen that set.
   */
  private readonly registrySource = createRegistrySource({
    clientFor: () => this.init.registry,
    mayRead: (layer, options) => options.route?.forwarded !== true || this.catalog.mayOpenForPeer(layer.repository)
  })

  constructor(
    private readonly libp2p: Libp2p<{ dht: KadDHT }>,
    private readonly init: NodeInit,
    limits: ProtocolLimits
  ) {
    this.peerId = libp2p.peerId.toString()
    this.queued = new ByteBudget(limits.maxQueuedBytes)
    this.catalog = catalog(init)({ store: init.store, ...(init.registry !== undefined && { registry: init.registry }) })
    this.book = new PeerBook(init.bans)
    this.cluster = membership(init)({ network: libp2p, onJoin: () => this.announcer.retryNow() })
    this.homeSets = new HomeSets({
      self: this.peerId,
      closestPeers: (key, options) => this.closestPeers(key, options),
      clusterSize: () => this.cluster.peers().length
    })
    this.source = new PeerSource({
      self: this.peerId,
      book: this.book,
      limits,
      findProviders: (digest, options) => this.findProviders(digest, options),
      // Only the signal goes to libp2p: it calls an `onProgress` in the options with its own dial events.
      openStream: (peer, options) =>
        this.libp2p.dialProtocol(peerIdFromString(peer), CHUNK_PROTOCOL, { signal: options?.signal }),
      members: () => this.cluster.peers(),
      homeSets: this.homeSets,
      imageOf: (layer) => this.catalog.imageOf(layer),
      onFetched: (_peer, bytes, route) => this.countForPeers('peer', bytes, route)
    })
    this.fetcher = createFetcher({
      hedgeDelayMs: 8_000,
      ...init.fetcher,
      store: init.store,
      sources: [
        this.source,
        countedSource(this.registrySource, (bytes, route) => this.countForPeers('registry', bytes, route))
      ]
    })
    this.server = new ChunkServer(
      {
        store: init.store,
        queued: this.queued,
        fetch: async (chunks, ref, options) => {
          if (
            ref !== undefined &&
            chunks.some((c) => this.catalog.imageOf(c.layer.digest) === undefined) &&
            this.catalog.mayOpenForPeer(ref)
          ) {
            await this.catalog.open(ref, 'peer', options).catch(() => undefined)
          }
          return this.fetchForPeer(chunks, options)
        },
        onServed: (_peer, bytes) => {
          this.served += bytes
          this.requestsServed++
        },
        onError: () => {
          this.requestErrors++
        }
      },
      limits
    )
    this.mirror = new Mirror({
      store: init.store,
      queued: this.queued,
      registry: init.registry ?? createRegistryClient({}),
      holders: async (digest, options) => {
        const found = await firstWithin(this.findProviders(digest, options), PROVIDER_PATIENCE_MS)
        const peers = [...new Set([...found, ...this.book.rank(this.cluster.peers())])]
        return peers.filter((p) => p !== this.peerId && !this.book.isBanned(p))
      },
      home: (digest) => {
        const home = homeOf(digest, this.source.homesFor(digest))
        return home === this.peerId ? undefined : home
      },
      openStream: (peer, protocol, options) =>
        this.libp2p.dialProtocol(peerIdFromString(peer), protocol, { signal: options?.signal }),
      onBadPeer: (peer) => this.book.bad(peer),
      onPeerFailure: (peer) => this.book.failure(peer),
      mayReadForPeer: (ref) => this.catalog.mayOpenForPeer(ref),
      allowRegistry: (registry) => this.catalog.allowRegistry(registry),
      ...(init.log !== undefined && { log: init.log })
    })
    this.announcer = new Announcer({
      ...init.announce,
      provide: (digest, options) => this.provide(digest, options),
      withdraw: (digest) => void this.libp2p.contentRouting.cancelReprovide(digestToCid(digest)).catch(() => {})
    })
    this.warming = warmService({ limits })({
      peerId: this.peerId,
      network: libp2p,
      fetcher: this.fetcher,
      catalog: this.catalog,
      members: () => this.cluster.peers(),
      homeOf: (chunk, route) => this.source.home(chunk, route),
      announceCoarse: (key) => this.announceCoarse(key)
    })
    this.onPut = (e) => {
      const detail = (e as CustomEvent<{ digest: string; layer?: string }>).detail
      if (detail.layer !== undefined) this.announceCoarse(detail.layer)
      this.announcer.announce(detail.digest)
    }
    this.onEvict = (e) => this.announcer.withdraw((e as CustomEvent<{ digests: string[] }>).detail.digests)
  }

  /** Counts bytes a source sent as fetched for peers when the fetch was a forwarded request's (see fetchForPeer). */
  private countForPeers(source: 'peer' | 'registry', bytes: number, route: Route | undefined): void {
    if (route?.forwarded === true) this.forPeers[source] = (this.forPeers[source] ?? 0) + bytes
  }

  async start(): Promise<void> {
    this.cluster.start()
    const streamLimits = { maxInboundStreams: 256, maxOutboundStreams: 256 }
    await this.libp2p.handle(
      CHUNK_PROTOCOL,
      (stream, connection) => this.track(stream, connection.remotePeer),
      streamLimits
    )
    await this.libp2p.handle(BLOB_PROTOCOL, (stream, connection) => this.mirror.serve(stream, connection.remotePeer), {
      maxInboundStreams: 64,
      maxOutboundStreams: 64
    })
    await this.warming.start()
    this.init.store.addEventListener('put', this.onPut)
    this.init.store.addEventListener('evict', this.onEvict)
    this.announcer.start()
    this.cluster.join()
    // A restart announces again what the store still holds: coarse keys first, then every chunk.
    const saved = await this.init.store.getMeta(META.nodeCoarse)
    if (saved !== undefined)
      for (const key of JSON.parse(new TextDecoder().decode(saved)) as string[]) this.announceCoarse(key)
    for await (const digest of this.init.store.keys()) this.announcer.announce(digest)
  }

  /**
   * Fetches chunks a peer asked this node (their home) for into the store, as one batch so adjacent ranges
   * coalesce; each chunk's promise settles as soon as that chunk lands in the store, not when the whole batch is
   * done (true), or when it could not be got (false). The route marks the fetch as a forwarded request's: the
   * peer source forwards it no further, and what the sources send counts as fetched for peers.
   */
  private fetchForPeer(chunks: ChunkRef[], options?: AbortOptions): Array<Promise<boolean>> {
    const route: Route = { forwarded: true }
    const signal = options?.signal
    return this.fetcher.getEach(chunks, { signal, route }).map((got, i) =>
      got.then(
        () => true,
        // A chunk the batch could not get is asked once more on its own before the peer hears it is missing
        // (it joins a fetch of it still in flight), as when a failed batch was followed by one get per chunk.
        () =>
          this.fetcher.get(chunks[i]!, { signal, route }).then(
            () => true,
            () => false
          )
      )
    )
  }

  private track(stream: Stream, peer: PeerId): void {
    const p = this.server.handle(stream, peer.toString()).finally(() => this.inflight.delete(p))
    this.inflight.add(p)
  }

  private announceCoarse(key: string): void {
    this.announcer.announceNow(key)
    if (this.coarse.has(key)) return
    this.coarse.add(key)
    void this.init.store
      .putMeta(META.nodeCoarse, new TextEncoder().encode(JSON.stringify([...this.coarse])))
      .catch(() => {})
  }

  private async provide(digest: string, options?: AbortOptions): Promise<boolean> {
    let landed = false
    for await (const event of this.libp2p.services.dht.provide(digestToCid(digest), options)) {
      if (event.name === 'PEER_RESPONSE' && event.messageName === 'ADD_PROVIDER') landed = true
    }
    return landed
  }

  /** The peers a DHT walk towards `key` meets: those that answered, those named closer, and the final closest. */
  private async *closestPeers(key: Uint8Array, options?: AbortOptions): AsyncIterable<string> {
    for await (const event of this.libp2p.services.dht.getClosestPeers(key, options)) {
      if (event.name === 'FINAL_PEER') yield event.peer.id.toString()
      else if (event.name === 'PEER_RESPONSE') {
        yield event.from.toString()
        for (const p of event.closer) yield p.id.toString()
      }
    }
  }

  private async *findProviders(digest: string, options?: AbortOptions): AsyncIterable<string> {
    for await (const provider of this.libp2p.contentRouting.findProviders(digestToCid(digest), options)) {
      yield provider.id.toString()
    }
  }

  /** A local caller's open (control API, mounts): its registry becomes one peers may name too. */
  openImage(ref: string, options?: OpenImageOptions): Promise<Image> {
    return this.catalog.open(ref, 'local', options)
  }

  addrs(): string[] {
    return this.libp2p.getMultiaddrs().map((a) => a.toString())
  }

  async providers(digest: string, options?: AbortOptions): Promise<string[]> {
    const found: string[] = []
    try {
      for await (const p of this.findProviders(digest, options)) found.push(p)
    } catch (err) {
      if (options?.signal?.aborted !== true) throw err
    }
    return found
  }

  peers(): PeerStatus[] {
    const scores = new Map(this.book.snapshot().map((s) => [s.peer, s]))
    return this.libp2p.getPeers().map((id) => {
      const peer = id.toString()
      return {
        ...scores.get(peer),
        peer,
        addrs: this.libp2p.getConnections(id).map((c) => c.remoteAddr.toString()),
        strata: this.cluster.has(peer)
      }
    })
  }

  async status(options?: AbortOptions): Promise<NodeStatus> {
    const fetched: Record<string, number> = { peer: 0, registry: 0 }
    // The fetcher counts every verified chunk; those fetched for peers were counted (as received) here too.
    // (Received bytes that then failed verification could make the difference negative: hence the floor.)
    for (const [name, s] of Object.entries(this.fetcher.metrics().sources))
      fetched[name] = Math.max(0, s.bytes - (this.forPeers[name] ?? 0))
    return {
      peerId: this.peerId,
      addrs: this.addrs(),
      peers: this.libp2p.getPeers().length,
      bytes: { served: this.served, fetched, fetchedForPeers: { ...this.forPeers } },
      requests: { served: this.requestsServed, errors: this.requestErrors, queuedBytes: this.server.queuedBytes() },
      store: await this.init.store.stats(options),
      announce: this.announcer.stats(),
      mirror: structuredClone(this.mirror.stats)
    }
  }

  images(options?: AbortOptions): Promise<ImageRecord[]> {
    return this.catalog.images(options)
  }

  warm(ref: string, options?: AbortOptions & { onProgress?: (p: WarmProgress) => void }): Promise<WarmResult> {
    return this.warming.warm(ref, options)
  }

  warmCluster(
    ref: string,
    options?: AbortOptions & { onProgress?: (p: ClusterWarmProgress) => void }
  ): Promise<ClusterWarmResult> {
    return this.warming.warmCluster(ref, options)
  }

  async gc(options?: AbortOptions): Promise<unknown> {
    if (this.init.store.gc === undefined) throw new Error('this store has no garbage collection')
    return this.init.store.gc(options)
  }

  announced(): Promise<void> {
    return this.announcer.settled()
  }

  async stop(options: { graceMs?: number } = {}): Promise<void> {
    this.cluster.stop()
    this.homeSets.stop()
    await Promise.all([this.libp2p.unhandle([CHUNK_PROTOCOL, BLOB_PROTOCOL]), this.warming.stop()])
    const grace = new Promise((resolve) => setTimeout(resolve, options.graceMs ?? 10_000).unref())
    await Promise.race([Promise.allSettled([...this.inflight]), grace])
    this.server.stop()
    this.announcer.stop()
    this.init.store.removeEventListener('put', this.onPut)
    this.init.store.removeEventListener('evict', this.onEvict)
    await this.libp2p.stop()
  }
}

/** How long a blob's DHT lookup may take before the connected peers are asked without it. */
const PROVIDER_PATIENCE_MS = 250

/** What `source` yields within `ms` (the rest is left to run out). */
async function firstWithin<T>(source: AsyncIterable<T>, ms: number): Promise<T[]> {
  const found: T[] = []
  const drained = (async () => {
    for await (const x of source) found.push(x)
  })().catch(() => {})
  await Promise.race([drained, new Promise((resolve) => setTimeout(resolve, ms).unref())])
  return found
}

/** Starts a p2pd node: libp2p host, DHT, chunk and warm-up protocols, announcements. */
export async function createNode(init: NodeInit): Promise<StrataNode> {
  const limits = { ...DEFAULT_LIMITS, ...init.limits }
  const libp2p = await createHost({ ...init, requestTimeoutMs: limits.requestTimeoutMs })
  const node = new Node(libp2p, init, limits)
  await node.start()
  return node
}
