import { isSha256Digest } from '@strata/base'
import { InvalidDigestError, StoreCapError } from './errors.js'
import type { StoreStats } from './types.js'

/** What the store knows about one chunk besides its bytes. */
export interface ChunkRecord {
  size: number
  /** Last access, ms since the epoch. */
  atime: number
  /** Layers (blob digests) the chunk was put for. */
  layers: string[]
  /** Disk store: the checkpoint generation the chunk was written in (0: known durable). */
  gen?: number
  /**
   * Disk store: the chunk file's bytes are known to hash to the digest in this process (it wrote them, or hashed
   * them on open or on a first read), so reads use it in place. Kept on the record, so it goes when the chunk does.
   */
  verified?: boolean
}

export function assertDigest(digest: string): void {
  if (!isSha256Digest(digest)) throw new InvalidDigestError(digest)
}

export function assertOffset(offset: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0) throw new RangeError(`not an offset in a chunk: ${offset}`)
}

/**
 * The bookkeeping both stores share: which chunks exist in least-recently-used order, their sizes, the pins,
 * the size cap and the counters. It only decides; the stores move the bytes.
 */
export class Ledger {
  readonly maxBytes: number
  /** Oldest access first: a Map keeps insertion order and touch() re-inserts. */
  readonly chunks = new Map<string, ChunkRecord>()
  bytes = 0
  /** Bytes of puts in flight, counted against the cap before their chunks are recorded. */
  reserved = 0
  hits = 0
  misses = 0
  evictions = 0
  /** Chunks dropped because their file was found damaged when read (disk store). */
  corrupt = 0
  /** Writes that failed (see StoreStats.writeErrors). */
  writeErrors = 0
  private lastAccess = 0
  private readonly pins = new Map<string, Set<string>>()
  /** digest -> how many pin names hold it. */
  private readonly pinCounts = new Map<string, number>()

  constructor(maxBytes = Number.POSITIVE_INFINITY) {
    if (!(maxBytes > 0)) throw new RangeError(`store maxBytes must be a positive number, got ${maxBytes}`)
    this.maxBytes = maxBytes
  }

  add(digest: string, record: ChunkRecord): void {
    this.chunks.set(digest, record)
    this.bytes += record.size
  }

  remove(digest: string): ChunkRecord | undefined {
    const record = this.chunks.get(digest)
    if (record === undefined) return undefined
    this.chunks.delete(digest)
    this.bytes -= record.size
    return record
  }

  /**
   * Now, in ms since the epoch, and later than every earlier call: two accesses in the same millisecond keep
   * their order in the index, so least-recently-used order survives a reopen.
   */
  now(): number {
    this.lastAccess = Math.max(Date.now(), this.lastAccess + 0.001)
    return this.lastAccess
  }

  /** Marks a chunk as just used: it moves to the young end. */
  touch(digest: string, record: ChunkRecord): void {
    this.chunks.delete(digest)
    record.atime = this.now()
    this.chunks.set(digest, record)
  }

  /** Returns the digests newly pinned under `name`. */
  pin(name: string, digests: Iterable<string>): string[] {
    let held = this.pins.get(name)
    if (held === undefined) {
      held = new Set()
      this.pins.set(name, held)
    }
    const added: string[] = []
    for (const digest of digests) {
      if (held.has(digest)) continue
      held.add(digest)
      this.pinCounts.set(digest, (this.pinCounts.get(digest) ?? 0) + 1)
      added.push(digest)
    }
    return added
  }

  /** Returns the digests that were pinned under `name`. */
  unpin(name: string): string[] {
    const held = this.pins.get(name)
    if (held === undefined) return []
    this.pins.delete(name)
    for (const digest of held) {
      const n = this.pinCounts.get(digest) ?? 0
      if (n <= 1) this.pinCounts.delete(digest)
      else this.pinCounts.set(digest, n - 1)
    }
    return [...held]
  }

  /**
   * Makes room for a chunk of `size` bytes: takes the least recently used unpinned chunks out of the ledger
   * and returns them for the caller to delete, and reserves the room until release(). Room still taken by
   * other puts in flight is freed when they land (shrinkTo). When the chunk cannot fit beside the pinned
   * chunks at all it throws StoreCapError and changes nothing.
   */
  reserve(digest: string, size: number): Array<[string, ChunkRecord]> {
    const over = this.bytes + this.reserved + size - this.maxBytes
    const victims = over > 0 ? this.oldestUnpinned(over) : []
    if (over > 0 && victims.reduce((n, [, r]) => n + r.size, 0) < over) {
      const pinned = this.pinnedBytes()
      if (pinned + size > this.maxBytes) throw new StoreCapError(digest, size, this.maxBytes, pinned)
    }
    this.evict(victims)
    this.reserved += size
    return victims
  }

  release(size: number): void {
    this.reserved -= size
  }

  /** Takes least recently used unpinned chunks out until at most `target` bytes remain (or only pins do). */
  shrinkTo(target: number): Array<[string, ChunkRecord]> {
    const victims = this.bytes > target ? this.oldestUnpinned(this.bytes - target) : []
    this.evict(victims)
    return victims
  }

  stats(): StoreStats {
    let pinned = 0
    for (const digest of this.pinCounts.keys()) if (this.chunks.has(digest)) pinned++
    return {
      chunks: this.chunks.size,
      bytes: this.bytes,
      maxBytes: this.maxBytes,
      hits: this.hits,
      misses: this.misses,
      evictions: this.evictions,
      pinned,
      corrupt: this.corrupt,
      writeErrors: this.writeErrors
    }
  }

  private oldestUnpinned(need: number): Array<[string, ChunkRecord]> {
    const victims: Array<[string, ChunkRecord]> = []
    const skipped: Array<[string, ChunkRecord]> = []
    let freed = 0
    for (const entry of this.chunks) {
      if (freed >= need) break
      if (this.pinCounts.has(entry[0])) skipped.push(entry)
      else {
        victims.push(entry)
        freed += entry[1].size
      }
    }
    // Pinned chunks passed over go to the young end (their last access stays), so the next eviction does not
    // walk past the same thousands of pinned chunks again.
    for (const [digest, record] of skipped) {
      this.chunks.delete(digest)
      this.chunks.set(digest, record)
    }
    return victims
  }

  private evict(victims: Array<[string, ChunkRecord]>): void {
    for (const [digest] of victims) this.remove(digest)
    this.evictions += victims.length
  }

  private pinnedBytes(): number {
    let bytes = 0
    for (const digest of this.pinCounts.keys()) bytes += this.chunks.get(digest)?.size ?? 0
    return bytes
  }
}
