import type { AbortOptions } from '@strata/base'
import { type ChunkRef, chunkRef, type Fetcher, type Image, type Route } from '@strata/fetcher'

export interface WarmProgress {
  chunks: number
  totalChunks: number
  bytes: number
  totalBytes: number
}

export interface WarmResult extends WarmProgress {
  image: string
  digest: string
  layers: number
  ms: number
  /** The registry could not be reached: the image warmed is what the reference named when last opened here. */
  stale?: string
  /**
   * Whether the store holds every chunk of the image once the warm-up is done: not when it could not keep them (a
   * full disk, a cap smaller than the image). `held` says how much of it stayed.
   */
  complete: boolean
  held: { chunks: number; bytes: number }
}

export interface WarmOptions extends AbortOptions {
  /** The cluster this warm-up is part of (chunk homes are chosen among these peer ids). */
  members?: readonly string[]
  /** The node that is home of a chunk on `route` (this warm-up's): undefined for this node. */
  homeOf?: (chunk: ChunkRef, route: Route) => string | undefined
  onProgress?: (progress: WarmProgress) => void
}

/** Every chunk of every layer of an image, once per digest, in blob order (adjacent reads coalesce). */
export function imageChunks(image: Image): ChunkRef[] {
  const seen = new Set<string>()
  const out: ChunkRef[] = []
  for (const layer of image.layers) {
    for (const entry of layer.toc.entries.values()) {
      for (const chunk of entry.chunks) {
        if (seen.has(chunk.digest)) continue
        seen.add(chunk.digest)
        out.push(chunkRef(layer, chunk))
      }
    }
  }
  const layerIndex = new Map(image.layers.map((l, i) => [l.digest, i]))
  return out.sort((a, b) => layerIndex.get(a.layer.digest)! - layerIndex.get(b.layer.digest)! || a.offset - b.offset)
}

const BATCH = 64
/**
 * Batches in flight per warm-up. A batch waits on its home's registry fetch, so a warm-up is latency-bound:
 * on 10 p2pd sharing 2 cores, python3's image (7k chunks) warmed in 325 s with 4, 183 s with 8, 142 s with 16;
 * but with 16 the homes answered too slowly, readers hedged to the registry, and egress rose from 1.09x the
 * image to 1.56x. Egress about once is what a cluster warm-up is for.
 */
const PARALLEL_BATCHES = 8

/**
 * A warm-up waits this long on its peers (a home fetching a segment for everyone) before it asks the registry
 * too: no reader is waiting, and egress about once is what a cluster warm-up is for.
 */
const WARM_HEDGE_DELAY_MS = 30_000

/**
 * Fills the local store with every chunk of `image` through the fetcher (store, peers, registry; verified).
 * Batches never mix homes: a batch of this node's own share goes to the registry without waiting on peers, so
 * a peer whose forwarded request joins it is never stuck behind this node's requests to that peer.
 */
export async function warmImage(fetcher: Fetcher, image: Image, options: WarmOptions = {}): Promise<WarmResult> {
  const started = Date.now()
  // Chunk homes are chosen among the cluster warming the image, by the peer source too (the route tells it).
  const route: Route = options.members !== undefined ? { members: options.members } : {}
  const chunks = imageChunks(image)
  const groups = new Map<string | undefined, ChunkRef[]>()
  for (const c of chunks) {
    const home = options.homeOf?.(c, route)
    groups.set(home, [...(groups.get(home) ?? []), c])
  }
  // This node's share first, then the others' shares interleaved.
  const own = toBatches(groups.get(undefined) ?? [])
  const foreign = [...groups].filter(([home]) => home !== undefined).map(([, list]) => toBatches(list))
  const batches = [...own]
  for (let i = 0; foreign.some((f) => i < f.length); i++) {
    for (const f of foreign) if (i < f.length) batches.push(f[i]!)
  }
  const progress: WarmProgress = {
    chunks: 0,
    totalChunks: chunks.length,
    bytes: 0,
    totalBytes: chunks.reduce((n, c) => n + c.size, 0)
  }
  options.onProgress?.({ ...progress })
  // The first batch that fails stops the others, and what they have in flight that no reader shares is given
  // up: a failed warm-up must not go on filling the store.
  const stop = new AbortController()
  const signal = options.signal === undefined ? stop.signal : AbortSignal.any([options.signal, stop.signal])
  let next = 0
  const worker = async () => {
    while (next < batches.length) {
      signal.throwIfAborted()
      const batch = batches[next++]!
      await fetcher.getMany(batch, { signal, route, hedgeDelayMs: WARM_HEDGE_DELAY_MS, cancelOnAbort: true })
      progress.chunks += batch.length
      progress.bytes += batch.reduce((n, c) => n + c.size, 0)
      options.onProgress?.({ ...progress })
    }
  }
  await Promise.all(
    Array.from({ length: PARALLEL_BATCHES }, () =>
      worker().catch((err: unknown) => {
        stop.abort(err)
        throw err
      })
    )
  )
  // What stayed: every chunk was fetched, but a full disk or a cap smaller than the image keeps some out.
  const missing = await fetcher.missing(chunks, { signal: options.signal })
  const held = {
    chunks: progress.totalChunks - missing.length,
    bytes: progress.totalBytes - missing.reduce((n, c) => n + c.size, 0)
  }
  return {
    image: image.ref,
    digest: image.digest,
    layers: image.layers.length,
    ...progress,
    complete: missing.length === 0,
    held,
    ms: Date.now() - started
  }
}

function toBatches(chunks: ChunkRef[]): ChunkRef[][] {
  const out: ChunkRef[][] = []
  for (let i = 0; i < chunks.length; i += BATCH) out.push(chunks.slice(i, i + BATCH))
  return out
}
