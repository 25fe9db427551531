import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import type { Libp2p } from '@libp2p/interface'
import { type KadDHT, kadDHT, passthroughMapper } from '@libp2p/kad-dht'
import { mdns } from '@libp2p/mdns'
import { ping } from '@libp2p/ping'
import { preSharedKey } from '@libp2p/pnet'
import { tcp } from '@libp2p/tcp'
import { createLibp2p, type Libp2pOptions } from 'libp2p'
import { loadIdentity, loadPreSharedKey } from './identity.js'

/** The DHT's protocol: a private prefix, so strata nodes form a DHT of their own beside any public one. */
export const DHT_PROTOCOL = '/strata/kad/1.0.0'

export interface HostInit {
  /** Holds the identity key (`peer.key`, 0600). */
  dataDir: string
  /** Multiaddrs to listen on. Default `/ip4/0.0.0.0/tcp/4001`. */
  listen?: string[]
  /** Find peers on the local network by mDNS. Default false. */
  mdns?: boolean
  /** A libp2p swarm key file: only nodes with the same key can connect. */
  pskFile?: string
  /** libp2p's transports (default TCP) and the datastore its DHT keeps provider records in (default in memory). */
  transports?: Libp2pOptions['transports']
  datastore?: Libp2pOptions['datastore']
  /** How long a peer may take to answer a chunk request: a ping is waited for as long (see MIN_PING_TIMEOUT_MS). */
  requestTimeoutMs: number
}

/**
 * How long libp2p's connection monitor waits for a ping before it aborts the connection: as long as a peer may
 * take to answer a chunk request, never less. (libp2p's default, 5 s, aborted busy connections: behind a few MB
 * of chunk data, or with a node's event loop held up on a loaded host, a ping took longer, and the abort failed
 * every request and warm-up on the connection at once; the far side saw its warm-up stream end without a result.)
 * A dead connection is still found, within pingTimeout + its interval (about 70 s).
 */
const MIN_PING_TIMEOUT_MS = 30_000

/** The node's libp2p host: TCP, Noise, yamux, identify, ping and kad-dht; optional pre-shared key and mDNS. */
export async function createHost(init: HostInit): Promise<Libp2p<{ dht: KadDHT }>> {
  const pingTimeout = Math.max(MIN_PING_TIMEOUT_MS, init.requestTimeoutMs)
  const privateKey = await loadIdentity(init.dataDir)
  const psk = init.pskFile !== undefined ? await loadPreSharedKey(init.pskFile) : undefined
  return createLibp2p({
    privateKey,
    addresses: { listen: init.listen ?? ['/ip4/0.0.0.0/tcp/4001'] },
    transports: init.transports ?? [tcp()],
    ...(init.datastore !== undefined && { datastore: init.datastore }),
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    // A ping every pingTimeout + 10 s: a second ping while the first still waits would be over the ping
    // protocol's one outbound stream, and libp2p aborts the connection for that too.
    connectionMonitor: {
      pingInterval: pingTimeout + 10_000,
      pingTimeout: { minTimeout: pingTimeout, maxTimeout: pingTimeout }
    },
    ...(psk !== undefined ? { connectionProtector: preSharedKey({ psk }) } : {}),
    peerDiscovery: init.mdns === true ? [mdns()] : [],
    services: {
      identify: identify(),
      ping: ping(),
      dht: kadDHT({
        protocol: DHT_PROTOCOL,
        clientMode: false,
        // Clusters often run on private networks (and tests on loopback): keep every address.
        peerInfoMapper: passthroughMapper,
        allowQueryWithZeroPeers: true,
        querySelfInterval: 30_000,
        maxInboundStreams: 256,
        maxOutboundStreams: 256
      })
    }
  })
}
