import type { IdentifyResult, Libp2p, PeerId } from '@libp2p/interface'
import type { KadDHT } from '@libp2p/kad-dht'
import { multiaddr } from '@multiformats/multiaddr'
import { CHUNK_PROTOCOL } from './protocol.js'

/**
 * The cluster as this node sees it: the connected peers that speak the chunk protocol (strata nodes, not only
 * DHT peers). The node joins through its bootstrap addresses, again whenever it has no strata peer, and walks the
 * DHT towards its own id soon after a strata peer joins.
 */

export interface MembershipInit {
  /**
   * Multiaddrs of nodes to join through; `/p2p/<id>` is optional (a DNS name of every node, e.g. a headless
   * Service, works). Dialled at start and again whenever the node has no strata peer.
   */
  bootstrap?: readonly string[]
}

export interface MembershipComponents {
  network: Pick<Libp2p<{ dht: KadDHT }>, 'addEventListener' | 'removeEventListener' | 'dial' | 'peerId' | 'services'>
  /** Told when a strata peer joins (announcements that did not land may now). */
  onJoin?(peer: string): void
}

export interface Membership {
  /** The strata peers connected now. */
  peers(): string[]
  has(peer: string): boolean
  /** Starts following peers as they connect (before the node's protocols are handled: none is missed). */
  start(): void
  /** Dials the bootstrap addresses now, and again every REJOIN_MS while no strata peer is connected. */
  join(): void
  stop(): void
}

const REJOIN_MS = 10_000
/** How long after a strata peer joins the walk towards our own id starts (at most one walk per this time). */
const DISCOVER_DELAY_MS = 2_000

/** The cluster membership, built like a libp2p service: `membership(init)(components)`. */
export function membership(init: MembershipInit = {}): (components: MembershipComponents) => Membership {
  return (components) => new StrataPeers(components, init)
}

class StrataPeers implements Membership {
  private readonly strata = new Set<string>()
  private rejoin: NodeJS.Timeout | undefined
  private discovering: NodeJS.Timeout | undefined

  constructor(
    private readonly components: MembershipComponents,
    private readonly init: MembershipInit
  ) {}

  private readonly onIdentify = (e: CustomEvent<IdentifyResult>): void => {
    const peer = e.detail.peerId.toString()
    if (!e.detail.protocols.includes(CHUNK_PROTOCOL) || this.strata.has(peer)) return
    this.strata.add(peer)
    this.components.onJoin?.(peer)
    this.discover()
  }

  private readonly onDisconnect = (e: CustomEvent<PeerId>): void => {
    this.strata.delete(e.detail.toString())
  }

  peers(): string[] {
    return [...this.strata]
  }

  has(peer: string): boolean {
    return this.strata.has(peer)
  }

  start(): void {
    this.components.network.addEventListener('peer:identify', this.onIdentify)
    this.components.network.addEventListener('peer:disconnect', this.onDisconnect)
  }

  join(): void {
    this.dialBootstrap()
    this.rejoin ??= setInterval(() => {
      if (this.strata.size === 0) this.dialBootstrap()
    }, REJOIN_MS)
    this.rejoin.unref()
  }

  stop(): void {
    clearInterval(this.rejoin)
    clearTimeout(this.discovering)
    this.components.network.removeEventListener('peer:identify', this.onIdentify)
    this.components.network.removeEventListener('peer:disconnect', this.onDisconnect)
  }

  /** Dials the bootstrap addresses; failures are retried by the rejoin timer. */
  private dialBootstrap(): void {
    for (const addr of this.init.bootstrap ?? []) {
      void this.components.network.dial(multiaddr(addr), { signal: AbortSignal.timeout(10_000) }).catch(() => {})
    }
  }

  /**
   * A walk towards our own id, soon after a strata peer joins: it connects us to the nodes near us, so every node
   * sees the same cluster (chunk homes are chosen among the connected nodes).
   */
  private discover(): void {
    if (this.discovering !== undefined) return
    this.discovering = setTimeout(() => {
      const { network } = this.components
      const walk = async () => {
        const self = network.peerId.toMultihash().bytes
        for await (const _ of network.services.dht.getClosestPeers(self, { signal: AbortSignal.timeout(10_000) })) {
          // Dialling the peers found is the point; the events themselves are not needed.
        }
      }
      void walk()
        .catch(() => {})
        .finally(() => {
          this.discovering = undefined
        })
    }, DISCOVER_DELAY_MS)
    this.discovering.unref()
  }
}
