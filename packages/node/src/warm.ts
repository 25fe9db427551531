import type { ChunkRef, Fetcher, Image } from '@strata/fetcher'
import type { AbortOptions } from '@strata/store'
import { homeOf, runWithMembers } from './source.js'

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
}

export interface WarmOptions extends AbortOptions {
  /** The cluster this warm-up is part of: this node fetches its own share (rendezvous) first, then the rest. */
  members?: string[]
  /** This node's peer id (with `members`). */
  self?: string
  onProgress?: (progress: WarmProgress) => void
}

/** Every chunk of every layer of an image, once per digest. */
export function imageChunks(image: Image): ChunkRef[] {
  const seen = new Set<string>()
  const out: ChunkRef[] = []
  for (const layer of image.layers) {
    for (const entry of layer.toc.entries.values()) {
      for (const chunk of entry.chunks) {
        if (seen.has(chunk.digest)) continue
        seen.add(chunk.digest)
        out.push({ ...chunk, layer: layer.digest, compression: layer.compression })
      }
    }
  }
  return out
}

const BATCH = 256
const PARALLEL_BATCHES = 4

/** Fills the local store with every chunk of `image` through the fetcher (store, peers, registry; verified). */
export async function warmImage(fetcher: Fetcher, image: Image, options: WarmOptions = {}): Promise<WarmResult> {
  const started = Date.now()
  let chunks = imageChunks(image)
  const members = options.members
  if (members !== undefined && options.self !== undefined) {
    const self = options.self
    const mine = chunks.filter((c) => homeOf(c.digest, members) === self)
    const others = chunks.filter((c) => homeOf(c.digest, members) !== self)
    chunks = [...mine, ...others]
  }
  const progress: WarmProgress = {
    chunks: 0,
    totalChunks: chunks.length,
    bytes: 0,
    totalBytes: chunks.reduce((n, c) => n + c.size, 0)
  }
  options.onProgress?.({ ...progress })
  const batches: ChunkRef[][] = []
  for (let i = 0; i < chunks.length; i += BATCH) batches.push(chunks.slice(i, i + BATCH))
  let next = 0
  const worker = async () => {
    while (next < batches.length) {
      options.signal?.throwIfAborted()
      const batch = batches[next++]!
      await fetcher.getMany(batch, options)
      progress.chunks += batch.length
      progress.bytes += batch.reduce((n, c) => n + c.size, 0)
      options.onProgress?.({ ...progress })
    }
  }
  const run = () => Promise.all(Array.from({ length: PARALLEL_BATCHES }, worker))
  if (members !== undefined) await runWithMembers(members, run)
  else await run()
  return { image: image.ref, digest: image.digest, layers: image.layers.length, ...progress, ms: Date.now() - started }
}
