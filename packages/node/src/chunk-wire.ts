import { isSha256Digest } from '@strata/base'
import type { ChunkRef } from '@strata/fetcher'
import { parseReference, parseRepository, repositoryOf } from '@strata/registry'

/**
 * A ChunkRef as it travels in a forwarded `fetch` request. A fleet upgrades node by node, so this stays what
 * older p2pd versions send and accept: `layer` is the layer digest, as before LayerRef, and the repository
 * travels beside it as `repository`, a field older nodes ignore. A request from an older node has none: its
 * chunks take the repository from the request's `ref` (the image the asker opened), or none when it sent no
 * `ref` either (then no registry is read for it: the node's registry source does not have such a chunk).
 */
export interface WireChunk extends Omit<ChunkRef, 'layer'> {
  layer: string
  repository?: string
}

export function chunkToWire(chunk: ChunkRef): WireChunk {
  const { layer, ...rest } = chunk
  return { ...rest, layer: layer.digest, repository: layer.repository }
}

/** The repository the chunks of a request from an older node come from: its `ref`'s, when it names one. */
export function repositoryOfRequest(ref: string | undefined): string {
  if (ref === undefined) return ''
  try {
    return repositoryOf(parseReference(ref))
  } catch {
    return ''
  }
}

/**
 * The ChunkRef a peer sent, or undefined when it is malformed. Peer input: every number a safe non-negative
 * integer, digests sha256, and a repository a well-formed `host[:port]/name` of bounded length (parseRepository),
 * so that what a registry source is asked to read is at worst a blob the peer could name anyway. Whether the node
 * may read from that registry for a peer is the node's check, not the wire's (see RegistrySourceInit.mayRead).
 */
export function chunkFromWire(c: unknown, fallbackRepository: string): ChunkRef | undefined {
  const r = c as Partial<WireChunk> | null
  const whole = (n: unknown) => typeof n === 'number' && Number.isSafeInteger(n) && n >= 0
  const valid =
    typeof r === 'object' &&
    r !== null &&
    isSha256Digest(r.digest) &&
    isSha256Digest(r.layer) &&
    (r.compression === 'gzip' || r.compression === 'zstd' || r.compression === 'none') &&
    whole(r.fileOffset) &&
    whole(r.size) &&
    whole(r.offset) &&
    whole(r.end) &&
    whole(r.innerOffset) &&
    (r.end as number) >= (r.offset as number) &&
    (r.indexed === undefined || r.indexed === true) &&
    (r.repository === undefined || (typeof r.repository === 'string' && parseRepository(r.repository) !== undefined))
  if (!valid) return undefined
  const chunk: ChunkRef = {
    digest: r.digest!,
    layer: { digest: r.layer!, repository: r.repository ?? fallbackRepository },
    compression: r.compression!,
    fileOffset: r.fileOffset!,
    size: r.size!,
    offset: r.offset!,
    end: r.end!,
    innerOffset: r.innerOffset!
  }
  if (r.indexed === true) chunk.indexed = true
  return chunk
}
