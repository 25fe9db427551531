import { createHash } from 'node:crypto'
import type { ChunkRef } from '@strata/fetcher'

/**
 * Chunk homes: the node of the cluster that fetches a chunk from the registry once for everyone. Every node
 * computes them alike without talking (rendezvous hashing over the members), so the keys and weights here are a
 * contract between p2pd versions in one cluster: changing them splits a fleet that upgrades node by node.
 */

/**
 * Chunks are homed by segment (a layer's compressed range cut into SEGMENT-byte pieces), not one by one: a home
 * then reads runs of adjacent chunks, which the registry source coalesces into few Range requests.
 */
const SEGMENT = 1 << 20

/** `<layer digest>/<segment>`: the key a chunk is homed by. */
export function homeKey(chunk: ChunkRef): string {
  return `${chunk.layer.digest}/${Math.floor(chunk.offset / SEGMENT)}`
}

/** The member that is home of `key`: rendezvous (highest random weight) hashing, so all agree without talking. */
export function homeOf(key: string, members: readonly string[]): string | undefined {
  let best: string | undefined
  let bestWeight = -1n
  for (const m of members) {
    const weight = createHash('sha256').update(m).update(key).digest().readBigUInt64BE(0)
    if (weight > bestWeight || (weight === bestWeight && best !== undefined && m < best)) {
      best = m
      bestWeight = weight
    }
  }
  return best
}
