import type { Entry } from '@strata/stargz'
import type { ChunkRef, ImageLayer } from './types.js'

/** A chunk of a file of `layer`, as sources are asked for it. */
export function chunkRef(layer: ImageLayer, chunk: Entry['chunks'][number]): ChunkRef {
  return {
    ...chunk,
    layer: layer.ref,
    compression: layer.compression,
    ...(layer.format === 'indexed' && { indexed: true as const })
  }
}
