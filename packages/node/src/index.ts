/**
 * @strata/node: p2pd, the peer-to-peer node. A libp2p host (TCP, Noise, yamux, kad-dht on a private prefix,
 * optional pre-shared key) that announces what its chunk store holds, serves chunks to peers over
 * `/strata/chunk/1.0.0`, gives the fetcher a `peer` ChunkSource, warms images (alone or as a cluster),
 * and answers a control API on a Unix socket and Prometheus scrapes.
 */
export type { AnnounceStats } from './announcer.js'
export {
  type Catalog,
  type CatalogComponents,
  type CatalogInit,
  catalog,
  type ImageRecord,
  type OpenImageOptions
} from './catalog.js'
export type { ControlClient, ControlRequest, ControlServer, RouteHandler } from './control.js'
export { createControlClient, startControlServer } from './control.js'
export {
  type ControlErrorBody,
  ControlRemoteError,
  ControlSocketError,
  ControlUnavailableError,
  IdentityError,
  PeerRefusedError,
  PeerTimeoutError,
  PreSharedKeyError,
  ProtocolError,
  RegistryNotAllowedError,
  WarmError
} from './errors.js'
export { DHT_PROTOCOL } from './host.js'
export { digestToCid } from './keys.js'
export type { MetricsServer } from './metrics.js'
export { startMetricsServer } from './metrics.js'
export {
  BLOB_PROTOCOL,
  BlobUnavailableError,
  type MirrorServer,
  type MirrorStats,
  startMirrorServer
} from './mirror.js'
export type { NodeInit, NodeStatus, PeerStatus, StrataNode } from './node.js'
export { createNode } from './node.js'
export type { PeerScore } from './peers.js'
export type { ProtocolLimits } from './protocol.js'
export { CHUNK_PROTOCOL, DEFAULT_LIMITS } from './protocol.js'
export type { WarmProgress, WarmResult } from './warm.js'
export {
  type ClusterWarmProgress,
  type ClusterWarmResult,
  WARM_PROTOCOL,
  type WarmService,
  type WarmServiceComponents,
  type WarmServiceInit,
  warmService
} from './warm-service.js'
