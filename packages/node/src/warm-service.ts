import type { Libp2p, PeerId, Stream } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import type { AbortOptions } from '@strata/base'
import type { ChunkRef, Fetcher, Image, Route } from '@strata/fetcher'
import type { Catalog } from './catalog.js'
import { ProtocolError, RegistryNotAllowedError, WarmError } from './errors.js'
import { encodeFrame, readFrames } from './frames.js'
import type { ProtocolLimits } from './protocol.js'
import { type WarmProgress, type WarmResult, warmImage } from './warm.js'

/**
 * The warm-up service: this node's warm-ups, alone or as one member of a cluster warm-up, and the
 * `/strata/warm/1.0.0` protocol by which a node asks its peers to take part in one.
 *
 * Wire format: the asker sends one JSON frame `{"image":REF,"members":[PEER_ID]}` and closes its writing side;
 * the answer is JSON frames `{"type":"progress",...WarmProgress}`, then `{"type":"done","result":WarmResult}`
 * or `{"type":"error","message":...}`.
 */
export const WARM_PROTOCOL = '/strata/warm/1.0.0'

export interface ClusterWarmProgress {
  /** Progress per peer id. */
  nodes: Record<string, WarmProgress & { done: boolean; error?: string }>
}

export interface ClusterWarmResult {
  nodes: Record<string, { ok: boolean; result?: WarmResult; error?: string }>
}

type Progressing = AbortOptions & { onProgress?: (p: WarmProgress) => void }

export interface WarmServiceInit {
  /** The request's bounds (size, timeout); also the largest frame of a peer's answer. */
  limits: Pick<ProtocolLimits, 'maxRequestBytes' | 'requestTimeoutMs'>
}

export interface WarmServiceComponents {
  /** This node's peer id. */
  peerId: string
  /** libp2p, as far as the protocol goes: its handler, and streams to the peers of a cluster warm-up. */
  network: Pick<Libp2p, 'handle' | 'unhandle' | 'dialProtocol'>
  fetcher: Fetcher
  /** Opens the image to warm (for a peer, only from a registry a peer may name), and keeps the record of it. */
  catalog: Pick<Catalog, 'open' | 'record'>
  /** The other strata nodes now: with this node, the cluster a cluster warm-up spans. */
  members(): string[]
  /** The node that is home of a chunk on a warm-up's route (its members): undefined for this node. */
  homeOf(chunk: ChunkRef, route: Route): string | undefined
  /** Announces a layer's or TOC's key now: an image warmed here is findable by them at once. */
  announceCoarse(key: string): void
}

export interface WarmService {
  /** Fills the local store with every chunk of the image. */
  warm(ref: string, options?: Progressing): Promise<WarmResult>
  /** Every reachable node fetches its share of the image, then the rest from the others. */
  warmCluster(
    ref: string,
    options?: AbortOptions & { onProgress?: (p: ClusterWarmProgress) => void }
  ): Promise<ClusterWarmResult>
  /** Answers peers' warm-up requests. */
  start(): Promise<void>
  stop(): Promise<void>
}

/** The warm-up service, built like a libp2p service: `warmService(init)(components)`. */
export function warmService(init: WarmServiceInit): (components: WarmServiceComponents) => WarmService {
  return (components) => new Warming(components, init)
}

class Warming implements WarmService {
  constructor(
    private readonly components: WarmServiceComponents,
    private readonly init: WarmServiceInit
  ) {}

  async start(): Promise<void> {
    await this.components.network.handle(
      WARM_PROTOCOL,
      (stream, connection) => this.serve(stream, connection.remotePeer),
      { maxInboundStreams: 4, maxOutboundStreams: 64 }
    )
  }

  async stop(): Promise<void> {
    await this.components.network.unhandle(WARM_PROTOCOL)
  }

  warm(ref: string, options: Progressing = {}): Promise<WarmResult> {
    return this.warmFor('local', ref, options)
  }

  private async warmFor(
    caller: 'local' | 'peer',
    ref: string,
    options: Progressing & { members?: string[] }
  ): Promise<WarmResult> {
    let image: Image
    let stale: string | undefined
    const opening = {
      ...options,
      onStale: (message: string) => {
        stale = message
      }
    }
    try {
      image = await this.components.catalog.open(ref, caller, opening)
    } catch (err) {
      // A peer naming a registry this node does not read from for it is told so, as such.
      if (err instanceof RegistryNotAllowedError) throw err
      throw new WarmError(`cannot open image ${ref}: ${(err as Error).message}`, { cause: err })
    }
    for (const layer of image.layers) {
      this.components.announceCoarse(layer.digest)
      this.components.announceCoarse(layer.tocDigest)
    }
    let result: WarmResult
    try {
      result = await warmImage(this.components.fetcher, image, {
        ...options,
        homeOf: (c, route) => this.components.homeOf(c, route)
      })
      if (stale !== undefined) result.stale = stale
    } catch (err) {
      throw new WarmError(`warming ${ref} failed: ${(err as Error).message}`, { cause: err })
    }
    await this.components.catalog.record(
      {
        ref,
        digest: image.digest,
        layers: image.layers.map((l) => l.digest),
        chunks: result.totalChunks,
        bytes: result.totalBytes,
        warmedAt: new Date().toISOString()
      },
      options
    )
    return result
  }

  async warmCluster(
    ref: string,
    options: AbortOptions & { onProgress?: (p: ClusterWarmProgress) => void } = {}
  ): Promise<ClusterWarmResult> {
    const self = this.components.peerId
    const members = [self, ...this.components.members()].sort()
    const progress: ClusterWarmProgress = { nodes: {} }
    const result: ClusterWarmResult = { nodes: {} }
    const empty = { chunks: 0, totalChunks: 0, bytes: 0, totalBytes: 0, done: false }
    for (const m of members) progress.nodes[m] = { ...empty }
    const report = (peer: string, p: Partial<ClusterWarmProgress['nodes'][string]>) => {
      progress.nodes[peer] = { ...progress.nodes[peer]!, ...p }
      options.onProgress?.(progress)
    }
    await Promise.all(
      members.map(async (peer) => {
        try {
          const r =
            peer === self
              ? await this.warmFor('local', ref, { ...options, members, onProgress: (p) => report(peer, p) })
              : await this.warmRemote(peer, ref, members, (p) => report(peer, p), options)
          report(peer, { ...r, done: true })
          result.nodes[peer] = { ok: true, result: r }
        } catch (err) {
          report(peer, { done: true, error: (err as Error).message })
          result.nodes[peer] = { ok: false, error: (err as Error).message }
        }
      })
    )
    return result
  }

  private async warmRemote(
    peer: string,
    ref: string,
    members: string[],
    onProgress: (p: WarmProgress) => void,
    options: AbortOptions
  ): Promise<WarmResult> {
    // Only the signal: libp2p would call the caller's `onProgress` with its own dial events.
    const signal = options.signal
    const stream = await this.components.network.dialProtocol(peerIdFromString(peer), WARM_PROTOCOL, { signal })
    stream.send(encodeFrame(new TextEncoder().encode(JSON.stringify({ image: ref, members }))))
    await stream.close({ signal })
    for await (const frame of readFrames(stream, this.init.limits.maxRequestBytes)) {
      const msg = JSON.parse(new TextDecoder().decode(frame)) as
        | ({ type: 'progress' } & WarmProgress)
        | { type: 'done'; result: WarmResult }
        | { type: 'error'; message: string }
      if (msg.type === 'progress') onProgress(msg)
      else if (msg.type === 'done') return msg.result
      else throw new WarmError(`peer ${peer}: ${msg.message}`)
    }
    throw new ProtocolError(`peer ${peer} closed the warm-up stream without a result`)
  }

  /**
   * A peer's warm-up request (see WARM_PROTOCOL). The warm-up is this node's own work once asked: it goes on to
   * the end even if the asker went away (its progress is then dropped), and progress never waits on the asker,
   * nor throws.
   */
  private async serve(stream: Stream, from: PeerId): Promise<void> {
    const send = (msg: unknown) => stream.send(encodeFrame(new TextEncoder().encode(JSON.stringify(msg))))
    try {
      const request = await readWarmRequest(stream, from.toString(), this.init.limits)
      const members = request?.members
      if (
        typeof request?.image !== 'string' ||
        !Array.isArray(members) ||
        !members.every((m) => typeof m === 'string')
      ) {
        throw new ProtocolError(`bad warm-up request from ${from.toString()}`)
      }
      let last = 0
      const result = await this.warmFor('peer', request.image, {
        members: members as string[],
        onProgress: (p) => {
          // At most four a second, and none while the last one is still queued (the next says more): a slow
          // asker's progress does not pile up in the stream's buffer. A dead stream takes none.
          if (Date.now() - last < 250 && p.chunks < p.totalChunks) return
          if (stream.writeStatus !== 'writable' || stream.writeBufferLength > 0) return
          last = Date.now()
          send({ type: 'progress', ...p })
        }
      })
      send({ type: 'done', result })
      await stream.close()
    } catch (err) {
      try {
        send({ type: 'error', message: (err as Error).message })
        await stream.close()
      } catch {
        stream.abort(err as Error)
      }
    }
  }
}

/** A warm-up request: exactly one frame before the asker closes its writing side, within the request timeout. */
async function readWarmRequest(
  stream: Stream,
  from: string,
  limits: WarmServiceInit['limits']
): Promise<{ image?: unknown; members?: unknown } | undefined> {
  const signal = AbortSignal.timeout(limits.requestTimeoutMs)
  const onAbort = () =>
    stream.abort(new ProtocolError(`no warm-up request from ${from} in ${limits.requestTimeoutMs} ms`))
  signal.addEventListener('abort', onAbort, { once: true })
  try {
    let request: { image?: unknown; members?: unknown } | undefined
    let frames = 0
    for await (const frame of readFrames(stream, limits.maxRequestBytes)) {
      if (++frames > 1) throw new ProtocolError(`more than one warm-up request from ${from} on one stream`)
      try {
        request = JSON.parse(new TextDecoder().decode(frame)) as typeof request
      } catch {
        throw new ProtocolError(`bad warm-up request from ${from}: not JSON`)
      }
    }
    return request
  } finally {
    signal.removeEventListener('abort', onAbort)
  }
}
