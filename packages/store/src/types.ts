/** The chunk store contract: chunks by `sha256:<hex>` digest of their bytes. Both implementations pass one suite. */

import type { AbortOptions } from '@strata/base'

export interface PutOptions extends AbortOptions {
  /** The layer (blob digest) this chunk belongs to: recorded in the index. */
  layer?: string
}

export interface StoreStats {
  chunks: number
  bytes: number
  /** The size cap (Infinity when none). */
  maxBytes: number
  /**
   * Gets that found their chunk, and reads in place of a chunk's first byte (a chunk read in pieces counts
   * once; a read that misses counts nothing: its caller then gets the chunk, which counts).
   */
  hits: number
  /** Gets that did not find their chunk. */
  misses: number
  evictions: number
  pinned: number
  /**
   * Chunks dropped because their file did not hash to their digest (or had the wrong size) when read: damaged
   * behind the store's back. Each was also announced by a `corrupt` event. Always 0 for the memory store.
   */
  corrupt: number
  /**
   * Writes that failed: chunks not stored (a full disk, an I/O error, no room beside the pinned chunks under the
   * cap), metadata, pins and index records not written. Each was also announced by an `error` event.
   */
  writeErrors: number
}

/**
 * Events: `put` (detail: { digest, size, layer? }) after a chunk is stored, `evict` (detail: { digests }) after
 * chunks were removed by the size cap or gc, `corrupt` (detail: { digest, size, path, found }) after a chunk
 * whose file was damaged was dropped (disk store), and `error` (detail: { operation, error }) after a write failed
 * (the caller of a put, putMeta or pin also gets the error; background writes have no other caller).
 */
export interface ChunkStore extends EventTarget {
  /**
   * The bytes, or undefined on a miss. Callers have verified what they put. The disk store hashes each chunk file
   * on its first read in the process (get or read) and drops a damaged one (a miss, and a `corrupt` event), so
   * neither get nor read ever gives bytes that do not hash to the digest they were asked for.
   */
  get(digest: string, options?: AbortOptions): Promise<Uint8Array | undefined>
  /**
   * Copies the chunk's bytes from `offset` into `into` (up to its length, and to the chunk's end) without
   * allocating: how a mount reads a stored chunk in small pieces. The count copied, or undefined on a miss.
   */
  read(digest: string, offset: number, into: Uint8Array, options?: AbortOptions): Promise<number | undefined>
  has(digest: string, options?: AbortOptions): Promise<boolean>
  /**
   * Optional: checks the stored chunk now, so that its next read need not (the disk store hashes each chunk file
   * on its first read in a process: this runs that hash ahead, e.g. for the chunk a sequential reader reads
   * next). Whether the chunk is stored and sound; a damaged one is dropped as on a read.
   */
  verify?(digest: string, options?: AbortOptions): Promise<boolean>
  /**
   * Optional (the disk store): the path of the chunk's file, once checked as `verify` does, or undefined when
   * the chunk is not stored or was damaged (then dropped). For handing the file itself to another reader (FUSE
   * passthrough: the kernel reads it). Counts as a hit, and as an access for eviction order. The file may be
   * evicted afterwards: a descriptor opened on it keeps reading the same bytes until closed.
   */
  verifiedPath?(digest: string, options?: AbortOptions): Promise<string | undefined>
  /** Stores bytes the caller has verified against `digest`. Idempotent. May evict others to stay under the cap. */
  put(digest: string, bytes: Uint8Array, options?: PutOptions): Promise<void>
  delete(digest: string, options?: AbortOptions): Promise<boolean>
  /** Every stored digest. */
  keys(options?: AbortOptions): AsyncIterable<string>
  stats(options?: AbortOptions): Promise<StoreStats>
  /** Pinned chunks are never evicted. `name` is the pin's owner (e.g. an image digest or a mount). */
  pin(name: string, digests: Iterable<string>, options?: AbortOptions): Promise<void>
  unpin(name: string, options?: AbortOptions): Promise<void>
  /** Small metadata by key (cached TOCs, manifests, layer indexes). */
  getMeta(key: string, options?: AbortOptions): Promise<Uint8Array | undefined>
  putMeta(key: string, value: Uint8Array, options?: AbortOptions): Promise<void>
  close(): Promise<void>
}

// Additions of the store package itself (additive: nothing above changed).

/** Detail of the `put` event. */
export interface PutEventDetail {
  digest: string
  size: number
  layer?: string
}

/** Detail of the `evict` event. */
export interface EvictEventDetail {
  digests: string[]
}

/** Detail of the `corrupt` event: a chunk file found damaged when read, and dropped (file and index entry). */
export interface CorruptEventDetail {
  digest: string
  /** The size the index knew. */
  size: number
  /** The chunk file. */
  path: string
  /** What the file held instead: `sha256:<hex>` of its bytes, or what was wrong with its size. */
  found: string
}

/** Detail of the `error` event: a write of the store that failed. */
export interface StoreErrorEventDetail {
  /** What was being written: `put`, `putMeta`, `pin`, `unpin`, `delete`, `evict`, `atimes`, `checkpoint`. */
  operation: string
  /** The chunk being put, when the write was a put. */
  digest?: string
  /** StoreFullError, StoreCapError or StoreIOError (each with a `hint`), or what the file system said. */
  error: Error
}

export interface GcOptions extends AbortOptions {
  /** Evict least recently used unpinned chunks until at most this many bytes remain (default: the size cap). */
  targetBytes?: number
}

export interface GcResult {
  /** Chunks evicted to reach the target. */
  evicted: number
  freedBytes: number
  /** Files in the store directory that no index entry referenced (stale temp files, stray files). */
  orphansRemoved: number
}

/** A store this process owns: the contract plus garbage collection (what `p2pctl gc` runs via the daemon). */
export interface LocalChunkStore extends ChunkStore {
  gc(options?: GcOptions): Promise<GcResult>
}

export interface MemoryStoreInit {
  /** Size cap in bytes (default: none). */
  maxBytes?: number
}

export interface DiskStoreInit {
  /** Size cap in bytes (default: none). */
  maxBytes?: number
  /**
   * Checkpoints fsync the chunk files put since the last one, and their directories (default true). False is
   * for throwaway stores (tests, benchmarks): after a power loss such a store may serve damaged chunks.
   */
  fsync?: boolean
  /**
   * Time between checkpoints while chunks are being put (default 1000 ms); one also runs after every 64 MiB
   * put and on close. After a power loss, what was put since the last checkpoint is verified on open.
   */
  checkpointMs?: number
  /**
   * Hash each chunk file against its digest on its first read in this process (default true): a chunk damaged
   * behind the store's back (a disk error, another program) is dropped, not served. Chunks this process put or
   * hashed on open count as checked. False is for benchmarks measuring what the check costs.
   */
  verifyReads?: boolean
  /**
   * Bytes of its file system the store leaves free: a put that would leave less fails with StoreFullError, so
   * the index always has room to write, to compact and to open again after a restart; an open that finds less
   * evicts unpinned chunks until it has it. Default: an eighth of the file system, at most 8 MiB. 0: none (the
   * disk fills up until a write fails with ENOSPC).
   */
  headroomBytes?: number
}

/** What the repair pass on open found and fixed. */
export interface RepairReport {
  /** Temp files of interrupted puts, removed. */
  tempRemoved: number
  /** Index entries whose file was gone, dropped. */
  missingDropped: number
  /** Files without an index entry whose content hashed to their name, indexed again. */
  reindexed: number
  /** Files whose content did not hash to their name, or whose name is not a chunk's, removed. */
  badRemoved: number
  /**
   * Chunks put after the last checkpoint of a store that was not closed (a crash, a power loss), read and
   * hashed before being served; those that did not hash to their name count in `badRemoved`.
   */
  verified: number
  /** The index database was damaged and was rebuilt from the chunk files (pins and metadata were lost). */
  indexRebuilt: boolean
}

export interface DiskChunkStore extends LocalChunkStore {
  readonly dir: string
  readonly repair: RepairReport
  verify(digest: string, options?: AbortOptions): Promise<boolean>
  verifiedPath(digest: string, options?: AbortOptions): Promise<string | undefined>
}
