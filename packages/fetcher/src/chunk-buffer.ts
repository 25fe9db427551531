import type { Chunk } from '@strata/stargz'

/**
 * Whole chunks recently read, by digest (content-addressed, so one copy serves every file that has it),
 * least recently used first out, all of them once none was asked for in `idleMs`. A read in flight is shared; a
 * failed one is forgotten, so the next read tries again.
 */
export class ChunkBuffer {
  private readonly chunks = new Map<string, { bytes: Promise<Uint8Array>; size: number }>()
  private bytes = 0
  private usedAt = 0
  private idle: NodeJS.Timeout | undefined
  private readonly maxBytes: number
  private readonly idleMs: number

  constructor(maxBytes: number, idleMs: number) {
    this.maxBytes = maxBytes
    this.idleMs = idleMs
  }

  /** Whether the chunk is here or being loaded. */
  has(chunk: Chunk): boolean {
    return this.chunks.has(chunk.digest)
  }

  get(chunk: Chunk, load: () => Promise<Uint8Array>): Promise<Uint8Array> {
    this.usedAt = performance.now()
    this.idle ??= setTimeout(() => this.letGoIfIdle(), this.idleMs).unref()
    const hit = this.chunks.get(chunk.digest)
    if (hit !== undefined) {
      this.chunks.delete(chunk.digest)
      this.chunks.set(chunk.digest, hit)
      return hit.bytes
    }
    const slot = { bytes: load(), size: chunk.size }
    this.chunks.set(chunk.digest, slot)
    this.bytes += slot.size
    slot.bytes.catch(() => this.forget(chunk.digest, slot))
    for (const [digest, old] of this.chunks) {
      if (this.bytes <= this.maxBytes || old === slot) break
      this.forget(digest, old)
    }
    return slot.bytes
  }

  /** Lets the chunk go (its readers already have it). */
  drop(chunk: Chunk): void {
    const slot = this.chunks.get(chunk.digest)
    if (slot !== undefined) this.forget(chunk.digest, slot)
  }

  /** Drops every chunk once none was asked for in idleMs (those being read go on for their readers). */
  private letGoIfIdle(): void {
    const quiet = performance.now() - this.usedAt
    if (quiet < this.idleMs) {
      this.idle = setTimeout(() => this.letGoIfIdle(), this.idleMs - quiet).unref()
      return
    }
    this.idle = undefined
    this.chunks.clear()
    this.bytes = 0
  }

  private forget(digest: string, slot: { size: number }): void {
    if (this.chunks.get(digest) !== slot) return
    this.chunks.delete(digest)
    this.bytes -= slot.size
  }
}
