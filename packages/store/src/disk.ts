import { execFile } from 'node:child_process'
import { randomBytes, webcrypto } from 'node:crypto'
import {
  type FileHandle,
  mkdir,
  open,
  readdir,
  readFile,
  rename,
  rm,
  statfs,
  unlink,
  writeFile
} from 'node:fs/promises'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { type AbortOptions, sha256Hex } from '@strata/base'
import { Level } from 'level'
import { StoreClosedError, StoreFullError, StoreIOError, StoreLockedError } from './errors.js'
import { assertDigest, assertOffset, type ChunkRecord, Ledger } from './ledger.js'
import type {
  CorruptEventDetail,
  DiskChunkStore,
  DiskStoreInit,
  EvictEventDetail,
  GcOptions,
  GcResult,
  PutEventDetail,
  PutOptions,
  RepairReport,
  StoreErrorEventDetail,
  StoreStats
} from './types.js'

/*
 * Layout of a store directory:
 *   chunks/ab/<hex>         chunk bytes, named by the hex of their sha256; 256 fan-out directories (one level,
 *                           as cvmfs: the repair pass lists them all on open, 65536 two-level ones cost more)
 *   chunks/ab/.tmp-<hex>-*  a put in progress: written here, then renamed over <hex>
 *   index/                  LevelDB: c!<digest> -> {s,a,l,g} (size, last access, layers, generation),
 *                           p!<name>\0<digest> -> '' (pins), m!<key> -> bytes (metadata),
 *                           s!synced -> the last generation made durable
 * A chunk file is complete under its real name or absent as long as the kernel survives; the index follows
 * the files, and the repair pass makes them agree after a crash.
 *
 * Durability by checkpoints (group commit), not per put: a put writes and renames its file without fsync and
 * records the current generation with it. A checkpoint (every checkpointMs, every CHECKPOINT_BYTES, and on close)
 * starts a new generation, syncs the files of the old one and their directories, then writes s!synced with a
 * synchronous LevelDB write. After a power loss, chunk files of generations above s!synced may be missing,
 * short or garbage: the repair pass on open reads and hashes exactly those before anything is served.
 */

const FANOUT = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, '0'))
const TMP = '.tmp-'
const HEX = /^[0-9a-f]{64}$/
const CHUNK = 'c!'
const PIN = 'p!'
const META = 'm!'
const SYNCED = 's!synced'
/** Last-access times are written in batches at this interval (and on close), never on the get path. */
const ATIME_FLUSH_MS = 1000
/** Bytes put since the last checkpoint that start the next one at once. */
const CHECKPOINT_BYTES = 64 * 1024 * 1024
/** Chunk files `read` keeps open: a few mounts reading a few files each, sequentially. */
const OPEN_FILES = 32
/** Bytes put since the last checkpoint past which puts wait for one (bounds the repair work after a power loss). */
const MAX_UNSYNCED_BYTES = 4 * CHECKPOINT_BYTES
/** Files fsynced at once by a checkpoint or the repair pass when they are synced one by one. */
const SYNCS_IN_FLIGHT = 16
/** Longest a sync of the whole file system may take before the files are fsynced one by one instead. */
const SYNC_TIMEOUT_MS = 120_000
/**
 * Most of its file system the store leaves free by default (DiskStoreInit.headroomBytes), and the share of a
 * small one: LevelDB needs room for its log, for turning it into a table (it does so on every open), and for
 * compactions; a few MiB covers that for millions of chunks.
 */
const MAX_HEADROOM_BYTES = 8 * 1024 * 1024
const HEADROOM_SHARE = 1 / 8
/** Free space is asked of the file system again after this long (others write to it too), or when it runs low. */
const STATFS_MS = 1000

type Op = { type: 'put'; key: string; value: Uint8Array } | { type: 'del'; key: string }
type Db = Level<string, Uint8Array>

const execFileAsync = promisify(execFile)
const encoder = new TextEncoder()
const decoder = new TextDecoder()
const EMPTY = new Uint8Array(0)

function recordOp(digest: string, r: ChunkRecord): Op {
  const value = encoder.encode(JSON.stringify({ s: r.size, a: r.atime, l: r.layers, g: r.gen ?? 0 }))
  return { type: 'put', key: CHUNK + digest, value }
}

/** Records without a generation were written by a store that fsynced every put: durable. */
function decodeRecord(value: Uint8Array): ChunkRecord {
  const v = JSON.parse(decoder.decode(value)) as { s: number; a: number; l?: string[]; g?: number }
  return { size: v.s, atime: v.a, layers: v.l ?? [], gen: v.g ?? 0, verified: false }
}

/** Bytes free on the file system holding `dir` for this user, and its size. */
async function diskSpace(dir: string): Promise<{ free: number; size: number; block: number }> {
  const s = await statfs(dir)
  return { free: s.bavail * s.bsize, size: s.blocks * s.bsize, block: s.bsize }
}

function syncedOp(gen: number): Op {
  return { type: 'put', key: SYNCED, value: encoder.encode(String(gen)) }
}

/** A plain Uint8Array view of a Buffer, so callers comparing bytes see the type the contract names. */
function plain(bytes: Uint8Array): Uint8Array {
  return new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength)
}

function errorCode(err: unknown): string | undefined {
  return (err as { code?: string } | undefined)?.code
}

/** ENOSPC/EDQUOT from node:fs, or LevelDB's IO error text when the index write hit the full disk. */
function isDiskFull(err: unknown): boolean {
  const code = errorCode(err)
  if (code === 'ENOSPC' || code === 'EDQUOT') return true
  const e = err as Error | undefined
  return /No space left on device|Disk quota exceeded/.test(`${e?.message} ${(e?.cause as Error)?.message}`)
}

/**
 * Group commit: index operations queued while a batch is being written go into the next batch, so many puts
 * share one LevelDB write. A batch is written synchronously (LevelDB fsyncs its log) when any of its writes
 * asked for it; LevelDB's log is ordered, so that also makes every earlier batch durable.
 */
class IndexWriter {
  private readonly db: Db
  private queue: Op[] = []
  private sync = false
  private waiters: Array<{ resolve: () => void; reject: (err: unknown) => void }> = []
  private running: Promise<void> | undefined

  constructor(db: Db) {
    this.db = db
  }

  write(ops: Op[], sync = false): Promise<void> {
    this.queue.push(...ops)
    this.sync ||= sync
    return new Promise((resolve, reject) => {
      this.waiters.push({ resolve, reject })
      this.running ??= this.drain()
    })
  }

  /** Resolves when everything queued so far is written. */
  async idle(): Promise<void> {
    while (this.running !== undefined) await this.running
  }

  private async drain(): Promise<void> {
    while (this.waiters.length > 0) {
      const ops = this.queue
      const sync = this.sync
      const waiters = this.waiters
      this.queue = []
      this.sync = false
      this.waiters = []
      try {
        if (ops.length > 0) await this.db.batch(ops, { sync })
        for (const w of waiters) w.resolve()
      } catch (err) {
        for (const w of waiters) w.reject(err)
      }
    }
    this.running = undefined
  }
}

/**
 * The hot path: open, one read of the size the index knows, close (no stat). It asks for one byte more, so a
 * file that grew shows too (a short read of a regular file means its end). Undefined when the size is wrong.
 */
async function readExactly(path: string, size: number): Promise<Uint8Array | undefined> {
  const fh = await open(path, 'r')
  try {
    // Not zero-filled first (4 MiB of memset per chunk on the event loop; the read overwrites what is returned),
    // and not from the shared pool: the chunk owns its whole ArrayBuffer.
    const buf = Buffer.allocUnsafeSlow(size + 1)
    const { bytesRead } = await fh.read(buf, 0, size + 1, 0)
    return bytesRead === size ? plain(buf.subarray(0, size)) : undefined
  } finally {
    await fh.close()
  }
}

/**
 * The hex sha256 of `bytes`, hashed on one of libuv's threads (WebCrypto), not on the event loop: 4 MiB take
 * 2.3-3 ms, which the loop spends serving other reads meanwhile (a first read through FUSE measured 0.33x the
 * unchecked read this way, 0.26x with the hash on the loop).
 */
async function sha256HexOffLoop(bytes: Uint8Array): Promise<string> {
  return Buffer.from(await webcrypto.subtle.digest('SHA-256', bytes)).toString('hex')
}

/**
 * Chunk files kept open for `read`, most recently used last: a mount reads a chunk in pieces of up to 1 MiB,
 * and an open and a close per piece would cost more than the read. A file removed while open stays readable (its
 * bytes do not change) until closed.
 */
class OpenFiles {
  private readonly handles = new Map<string, Promise<FileHandle>>()
  private readonly max: number
  private readonly pathOf: (digest: string) => string
  private closed = false

  constructor(max: number, pathOf: (digest: string) => string) {
    this.max = max
    this.pathOf = pathOf
  }

  /** The open handle of `digest`'s file; rejects as open(2) does (ENOENT when it is gone). */
  get(digest: string): Promise<FileHandle> {
    let handle = this.handles.get(digest)
    if (handle !== undefined) {
      this.handles.delete(digest)
      this.handles.set(digest, handle)
      return handle
    }
    if (this.closed) return Promise.reject(new Error(`not opening ${digest}: the store is closing`))
    handle = open(this.pathOf(digest), 'r')
    this.handles.set(digest, handle)
    const opened = handle
    opened.catch(() => {
      if (this.handles.get(digest) === opened) this.handles.delete(digest)
    })
    for (const oldest of this.handles.keys()) {
      if (this.handles.size <= this.max) break
      this.close(oldest)
    }
    return handle
  }

  /** Closes `digest`'s file, if open, once the reads already started on it are done. */
  close(digest: string): Promise<void> {
    const handle = this.handles.get(digest)
    if (handle === undefined) return Promise.resolve()
    this.handles.delete(digest)
    // FileHandle.close() waits for the operations in flight on it.
    return handle.then(
      (fh) => fh.close(),
      () => {}
    )
  }

  closeAll(): Promise<void> {
    this.closed = true
    return Promise.all([...this.handles.keys()].map((d) => this.close(d))).then(() => {})
  }
}

/** fsyncs a file or directory; one removed meanwhile (an evicted chunk) needs no sync. */
async function syncPath(path: string): Promise<void> {
  let fh: FileHandle
  try {
    fh = await open(path, 'r')
  } catch (err) {
    if (errorCode(err) === 'ENOENT') return
    throw err
  }
  try {
    await fh.sync()
  } finally {
    await fh.close()
  }
}

/**
 * Makes chunk files of the store in `dir` and their directory entries durable. First choice: one syncfs(2) of
 * the store's file system by `sync -f` (one journal commit for thousands of files, and no time on Node's
 * four I/O threads, which an fsync per file would hold from reads and inflates). Where that command is
 * missing or fails: an fsync of each file, then of each directory that names one.
 */
async function syncChunks(dir: string, paths: string[]): Promise<void> {
  if (paths.length === 0) return
  try {
    await execFileAsync('sync', ['-f', dir], { timeout: SYNC_TIMEOUT_MS })
    return
  } catch {
    // Per-file fsyncs below still report the write errors of their own files.
  }
  const dirs = new Set(paths.map((path) => join(path, '..')))
  let next = 0
  const worker = async () => {
    while (next < paths.length) await syncPath(paths[next++]!)
  }
  await Promise.all(Array.from({ length: Math.min(SYNCS_IN_FLIGHT, paths.length) }, worker))
  await Promise.all([...dirs].map(syncPath))
}

class DiskStore extends EventTarget implements DiskChunkStore {
  readonly dir: string
  readonly repair: RepairReport
  private readonly chunksDir: string
  private readonly ledger: Ledger
  private readonly db: Db
  private readonly writer: IndexWriter
  private readonly fsync: boolean
  private readonly verifyReads: boolean
  /** digest -> the first read of its file, hashing it (single flight: concurrent first reads share it). */
  private readonly verifying = new Map<string, Promise<Uint8Array | undefined>>()
  /** Chunks read since the last flush of last-access times. */
  private dirty = new Set<string>()
  private readonly timer: NodeJS.Timeout
  private readonly checkpointTimer: NodeJS.Timeout
  /** digest -> the tail of the file operations on it (put, delete, evict run one at a time per digest). */
  private readonly busy = new Map<string, Promise<void>>()
  private readonly tempFiles = new Set<string>()
  private readonly openFiles = new OpenFiles(OPEN_FILES, (digest) => this.chunkPath(digest))
  private closing: Promise<void> | undefined
  /** The generation puts record now; every generation up to the one before it is durable or being made so. */
  private gen: number
  /** Chunk files put in this generation: the next checkpoint syncs them. */
  private unsynced = new Set<string>()
  private unsyncedBytes = 0
  /** The checkpoint running or queued (undefined when none). */
  private checkpoints: Promise<void> | undefined
  /** A checkpoint failed: what it covered may not be on disk, so no later one may claim durability. */
  private syncFailed = false
  /** Bytes of the file system left free for the index (0: none). */
  private readonly headroom: number
  /**
   * Free space as the file system last said, less what puts reserved since (an estimate that errs low), and when
   * it was asked; chunk files being written count in `writing` until they are.
   */
  private space: { free: number; at: number; block: number }
  private writing = 0
  private spaceCheck: Promise<void> | undefined

  constructor(
    dir: string,
    db: Db,
    ledger: Ledger,
    repair: RepairReport,
    init: {
      fsync: boolean
      gen: number
      checkpointMs: number
      verifyReads: boolean
      headroom: number
      space: { free: number; block: number }
    }
  ) {
    super()
    this.dir = dir
    this.chunksDir = join(dir, 'chunks')
    this.db = db
    this.ledger = ledger
    this.repair = repair
    this.fsync = init.fsync
    this.verifyReads = init.verifyReads
    this.headroom = init.headroom
    this.space = { ...init.space, at: performance.now() }
    this.writer = new IndexWriter(db)
    this.gen = init.gen
    this.timer = setInterval(() => this.flushAtimes(), ATIME_FLUSH_MS)
    this.timer.unref()
    this.checkpointTimer = setInterval(() => {
      if (this.checkpoints === undefined && this.unsynced.size > 0) void this.checkpoint()
    }, init.checkpointMs)
    this.checkpointTimer.unref()
  }

  async get(digest: string, options?: AbortOptions): Promise<Uint8Array | undefined> {
    this.check(options, digest)
    const record = this.ledger.chunks.get(digest)
    if (record === undefined) {
      this.ledger.misses++
      return undefined
    }
    let bytes: Uint8Array | undefined
    if (this.verifyReads && !record.verified) {
      const first = this.verifying.get(digest)
      bytes = await (first ?? this.verifyFile(digest, record))
      // Joined another first read: its bytes are that caller's to keep.
      if (first !== undefined && bytes !== undefined) bytes = bytes.slice()
    } else {
      bytes = await this.readChunkFile(digest, record)
    }
    if (bytes === undefined) {
      this.ledger.misses++
      return undefined
    }
    if (this.ledger.chunks.get(digest) === record) {
      this.ledger.touch(digest, record)
      this.dirty.add(digest)
    }
    this.ledger.hits++
    return bytes
  }

  async read(digest: string, offset: number, into: Uint8Array, options?: AbortOptions): Promise<number | undefined> {
    this.check(options, digest)
    assertOffset(offset)
    const record = this.ledger.chunks.get(digest)
    if (record === undefined) return undefined
    const length = Math.max(0, Math.min(into.length, record.size - offset))
    if (this.verifyReads && !record.verified) {
      // The first read in this process hashes the whole file; this piece comes from the bytes it hashed.
      const bytes = await (this.verifying.get(digest) ?? this.verifyFile(digest, record))
      if (bytes === undefined) return undefined
      into.set(bytes.subarray(offset, offset + length))
      if (this.ledger.chunks.get(digest) === record) {
        this.ledger.touch(digest, record)
        this.dirty.add(digest)
      }
      if (offset === 0) this.ledger.hits++
      return length
    }
    let bytesRead = 0
    try {
      const fh = await this.openFiles.get(digest)
      if (length > 0) ({ bytesRead } = await fh.read(into, 0, length, offset))
    } catch (err) {
      if (this.closing !== undefined) throw new StoreClosedError(`at ${this.dir}`)
      if (errorCode(err) !== 'ENOENT') throw this.fileError(err, 'read', this.chunkPath(digest))
      bytesRead = -1
    }
    if (bytesRead !== length) {
      // Gone (a miss) or cut short behind our back (damaged: dropped and counted).
      if (bytesRead < 0) await this.forgetIfSame(digest, record)
      else await this.dropCorrupt(digest, record, `a file shorter than ${offset + length} bytes`)
      return undefined
    }
    if (this.ledger.chunks.get(digest) === record) {
      this.ledger.touch(digest, record)
      this.dirty.add(digest)
    }
    if (offset === 0) this.ledger.hits++
    return length
  }

  async has(digest: string, options?: AbortOptions): Promise<boolean> {
    this.check(options, digest)
    return this.ledger.chunks.has(digest)
  }

  async verify(digest: string, options?: AbortOptions): Promise<boolean> {
    this.check(options, digest)
    const record = this.ledger.chunks.get(digest)
    if (record === undefined) return false
    if (!this.verifyReads || record.verified) return true
    return (await (this.verifying.get(digest) ?? this.verifyFile(digest, record))) !== undefined
  }

  async verifiedPath(digest: string, options?: AbortOptions): Promise<string | undefined> {
    if (!(await this.verify(digest, options))) return undefined
    const record = this.ledger.chunks.get(digest)
    if (record === undefined) return undefined
    this.ledger.touch(digest, record)
    this.dirty.add(digest)
    this.ledger.hits++
    return this.chunkPath(digest)
  }

  async put(digest: string, bytes: Uint8Array, options?: PutOptions): Promise<void> {
    this.check(options, digest)
    const stored = await this.serial(digest, () => this.store(digest, bytes, options)).catch((err: unknown) => {
      throw this.failed('put', err, digest)
    })
    if (!stored) return
    const layer = options?.layer
    const detail: PutEventDetail = { digest, size: bytes.length, ...(layer === undefined ? {} : { layer }) }
    this.dispatchEvent(new CustomEvent('put', { detail }))
    // Concurrent puts reserve room at once: what they could not free before writing is freed as they land
    // (outside serial(): two landed puts may each evict the other's chunk).
    await this.dropEvicted(this.ledger.shrinkTo(this.ledger.maxBytes)).catch((err: unknown) => {
      throw this.failed('evict', err)
    })
  }

  async delete(digest: string, options?: AbortOptions): Promise<boolean> {
    this.check(options, digest)
    if (this.ledger.remove(digest) === undefined) return false
    this.dirty.delete(digest)
    try {
      await this.serial(digest, () => this.unlinkChunk(digest))
      await this.writer.write([{ type: 'del', key: CHUNK + digest }])
    } catch (err) {
      throw this.failed('delete', err)
    }
    return true
  }

  async *keys(options?: AbortOptions): AsyncIterable<string> {
    this.check(options)
    for (const digest of [...this.ledger.chunks.keys()]) {
      options?.signal?.throwIfAborted()
      yield digest
    }
  }

  async stats(options?: AbortOptions): Promise<StoreStats> {
    this.check(options)
    return this.ledger.stats()
  }

  async pin(name: string, digests: Iterable<string>, options?: AbortOptions): Promise<void> {
    this.check(options)
    const list = [...digests]
    for (const digest of list) assertDigest(digest)
    const added = this.ledger.pin(name, list)
    await this.writer
      .write(added.map((d) => ({ type: 'put', key: `${PIN}${name}\0${d}`, value: EMPTY })))
      .catch((err: unknown) => {
        throw this.failed('pin', err)
      })
  }

  async unpin(name: string, options?: AbortOptions): Promise<void> {
    this.check(options)
    const removed = this.ledger.unpin(name)
    await this.writer.write(removed.map((d) => ({ type: 'del', key: `${PIN}${name}\0${d}` }))).catch((err: unknown) => {
      throw this.failed('unpin', err)
    })
  }

  async getMeta(key: string, options?: AbortOptions): Promise<Uint8Array | undefined> {
    this.check(options)
    const value = await this.db.get(META + key)
    return value === undefined ? undefined : plain(value)
  }

  async putMeta(key: string, value: Uint8Array, options?: AbortOptions): Promise<void> {
    this.check(options)
    await this.writer.write([{ type: 'put', key: META + key, value: value.slice() }]).catch((err: unknown) => {
      throw this.failed('putMeta', err)
    })
  }

  async gc(options?: GcOptions): Promise<GcResult> {
    this.check(options)
    const victims = this.ledger.shrinkTo(options?.targetBytes ?? this.ledger.maxBytes)
    await this.dropEvicted(victims)
    let orphansRemoved = 0
    for (const fan of FANOUT) {
      options?.signal?.throwIfAborted()
      const sub = join(this.chunksDir, fan)
      for (const name of await readdir(sub)) {
        const path = join(sub, name)
        if (name.startsWith(TMP)) {
          if (this.tempFiles.has(path)) continue
          await rm(path, { force: true, recursive: true })
          orphansRemoved++
          continue
        }
        const digest = `sha256:${name}`
        if (this.ledger.chunks.has(digest)) continue
        // Decided again inside serial(): a put of this digest in flight finishes (and records it) first.
        const removed = await this.serial(digest, async () => {
          if (this.ledger.chunks.has(digest)) return false
          await rm(path, { force: true, recursive: true })
          return true
        })
        if (removed) orphansRemoved++
      }
    }
    return { evicted: victims.length, freedBytes: victims.reduce((n, [, r]) => n + r.size, 0), orphansRemoved }
  }

  close(): Promise<void> {
    this.closing ??= this.shutdown()
    return this.closing
  }

  private async shutdown(): Promise<void> {
    clearInterval(this.timer)
    clearInterval(this.checkpointTimer)
    while (this.busy.size > 0 || this.verifying.size > 0)
      await Promise.allSettled([...this.busy.values(), ...this.verifying.values()])
    await this.openFiles.closeAll()
    this.flushAtimes()
    await this.checkpoint()
    await this.writer.idle()
    await this.db.close()
  }

  /** Writes a chunk unless it is there already. Runs inside serial(digest). Returns whether it stored it. */
  private async store(digest: string, bytes: Uint8Array, options?: PutOptions): Promise<boolean> {
    const layer = options?.layer
    const existing = this.ledger.chunks.get(digest)
    if (existing !== undefined) {
      this.ledger.touch(digest, existing)
      if (layer === undefined || existing.layers.includes(layer)) {
        this.dirty.add(digest)
      } else {
        existing.layers.push(layer)
        await this.writer.write([recordOp(digest, existing)])
      }
      return false
    }
    const size = bytes.length
    while (this.unsyncedBytes >= MAX_UNSYNCED_BYTES) await this.checkpoint()
    const victims = this.ledger.reserve(digest, size)
    const path = this.chunkPath(digest)
    let room = 0
    try {
      await this.dropEvicted(victims)
      room = await this.takeRoom(digest, size)
      await this.writeChunk(digest, path, bytes, options?.signal)
    } finally {
      this.ledger.release(size)
      this.writing -= room
    }
    const record: ChunkRecord = {
      size,
      atime: this.ledger.now(),
      layers: layer === undefined ? [] : [layer],
      gen: this.gen,
      // The caller verified the bytes, and this process wrote them.
      verified: true
    }
    this.ledger.add(digest, record)
    this.unsynced.add(path)
    this.unsyncedBytes += size
    if (this.unsyncedBytes >= CHECKPOINT_BYTES && this.checkpoints === undefined) void this.checkpoint()
    try {
      await this.writer.write([recordOp(digest, record)])
    } catch (err) {
      this.ledger.remove(digest)
      await rm(path, { force: true })
      throw this.fileError(err, 'index write', join(this.dir, 'index'), digest)
    }
    return true
  }

  /** Temp file in the chunk's own directory, written, renamed: a killed process leaves no half chunk. */
  private async writeChunk(digest: string, path: string, bytes: Uint8Array, signal?: AbortSignal): Promise<void> {
    const temp = join(path, '..', `${TMP}${digest.slice(7)}-${randomBytes(4).toString('hex')}`)
    this.tempFiles.add(temp)
    try {
      await writeFile(temp, bytes, { flag: 'wx' })
      signal?.throwIfAborted()
      await rename(temp, path)
    } catch (err) {
      // If even this fails, the next gc or repair pass removes the temp file.
      await rm(temp, { force: true }).catch(() => {})
      throw this.fileError(err, 'write', temp, digest)
    } finally {
      this.tempFiles.delete(temp)
    }
  }

  /**
   * Makes every chunk put before this call durable: after the checkpoint in progress (if any), starts a new
   * generation, syncs the files put in the old one and their directories, then records the old one as synced
   * with a synchronous index write (which also makes their index records durable). Never rejects: after a
   * failed sync nothing is claimed durable again in this process, so the next open verifies it all.
   */
  private checkpoint(): Promise<void> {
    const next = (this.checkpoints ?? Promise.resolve()).then(async () => {
      if (this.unsynced.size === 0) return
      const files = [...this.unsynced]
      const gen = this.gen++
      this.unsynced = new Set()
      this.unsyncedBytes = 0
      try {
        if (this.fsync) await syncChunks(this.dir, files)
        if (!this.syncFailed) await this.writer.write([syncedOp(gen)], true)
      } catch (err) {
        this.syncFailed = true
        this.failed('checkpoint', err)
      }
    })
    this.checkpoints = next
    void next.then(() => {
      if (this.checkpoints === next) this.checkpoints = undefined
    })
    return next
  }

  /** Deletes the files and index entries of chunks the ledger evicted, then tells listeners. */
  private async dropEvicted(victims: Array<[string, ChunkRecord]>): Promise<void> {
    if (victims.length === 0) return
    const digests = victims.map(([d]) => d)
    for (const digest of digests) this.dirty.delete(digest)
    await Promise.all(digests.map((d) => this.serial(d, () => this.unlinkChunk(d))))
    await this.writer.write(digests.map((d) => ({ type: 'del', key: CHUNK + d })))
    const detail: EvictEventDetail = { digests }
    this.dispatchEvent(new CustomEvent('evict', { detail }))
  }

  /**
   * The hot path of get: open, one read of the size the index knows, close. A file gone is a miss; one of the
   * wrong size is damaged (dropped and counted).
   */
  private async readChunkFile(digest: string, record: ChunkRecord): Promise<Uint8Array | undefined> {
    const path = this.chunkPath(digest)
    let bytes: Uint8Array | undefined
    try {
      bytes = await readExactly(path, record.size)
    } catch (err) {
      if (errorCode(err) !== 'ENOENT') throw this.fileError(err, 'read', path)
      // Evicted or deleted while we read, or removed behind our back: a miss either way.
      await this.forgetIfSame(digest, record)
      return undefined
    }
    if (bytes === undefined) await this.dropCorrupt(digest, record, 'a file of another size')
    return bytes
  }

  /**
   * The first read of a chunk file in this process: the whole file, hashed against its digest. The bytes when
   * they match (the chunk then counts as verified until it leaves the store); else undefined, and a damaged file
   * is dropped. Concurrent first reads of a digest share one (callers look in `verifying` first).
   */
  private verifyFile(digest: string, record: ChunkRecord): Promise<Uint8Array | undefined> {
    const check = async () => {
      const bytes = await this.readChunkFile(digest, record)
      if (bytes === undefined) return undefined
      const hex = await sha256HexOffLoop(bytes)
      if (hex !== digest.slice(7)) {
        await this.dropCorrupt(digest, record, `sha256:${hex}`)
        return undefined
      }
      record.verified = true
      return bytes
    }
    const running = check().finally(() => {
      if (this.verifying.get(digest) === running) this.verifying.delete(digest)
    })
    this.verifying.set(digest, running)
    return running
  }

  /**
   * Drops a chunk whose file no longer holds its bytes (damaged behind the store's back: a disk error, another
   * program), counts it and tells listeners; the fetcher then gets it again from its sources. Nothing when the
   * chunk was evicted or deleted meanwhile.
   */
  private async dropCorrupt(digest: string, record: ChunkRecord, found: string): Promise<void> {
    if (this.ledger.chunks.get(digest) !== record) return
    this.ledger.corrupt++
    await this.forget(digest)
    const detail: CorruptEventDetail = { digest, size: record.size, path: this.chunkPath(digest), found }
    this.dispatchEvent(new CustomEvent('corrupt', { detail }))
  }

  private async forgetIfSame(digest: string, record: ChunkRecord): Promise<void> {
    if (this.ledger.chunks.get(digest) === record) await this.forget(digest)
  }

  /** Drops a chunk whose file is gone or damaged. */
  private async forget(digest: string): Promise<void> {
    this.ledger.remove(digest)
    this.dirty.delete(digest)
    await this.serial(digest, () => this.unlinkChunk(digest))
    await this.writer.write([{ type: 'del', key: CHUNK + digest }])
  }

  private async unlinkChunk(digest: string): Promise<void> {
    const path = this.chunkPath(digest)
    void this.openFiles.close(digest)
    try {
      await unlink(path)
    } catch (err) {
      if (errorCode(err) !== 'ENOENT') throw this.fileError(err, 'delete', path)
    }
  }

  private flushAtimes(): void {
    if (this.dirty.size === 0) return
    const digests = this.dirty
    this.dirty = new Set()
    const ops: Op[] = []
    for (const digest of digests) {
      const record = this.ledger.chunks.get(digest)
      if (record !== undefined) ops.push(recordOp(digest, record))
    }
    // Last-access times are a hint for eviction order: on failure they are retried at the next flush.
    this.writer.write(ops).catch((err: unknown) => {
      this.failed('atimes', err)
      for (const digest of digests) this.dirty.add(digest)
    })
  }

  /** Runs fn after every earlier file operation on the same digest. */
  private serial<T>(digest: string, fn: () => Promise<T>): Promise<T> {
    const previous = this.busy.get(digest)
    const result = previous === undefined ? fn() : previous.then(fn)
    const tail = result.then(
      () => {},
      () => {}
    )
    this.busy.set(digest, tail)
    void tail.then(() => {
      if (this.busy.get(digest) === tail) this.busy.delete(digest)
    })
    return result
  }

  /**
   * Room on the file system for a chunk file of `size` bytes, leaving the headroom free; the bytes taken, which the
   * caller gives back from `writing` once the file is written. The file system is asked again when its last answer
   * is old or the estimate runs low (one question at a time). Throws StoreFullError when there is no room.
   */
  private async takeRoom(digest: string, size: number): Promise<number> {
    if (this.headroom <= 0) return 0
    const need = Math.ceil(Math.max(size, 1) / this.space.block) * this.space.block
    if (this.space.free - need < 2 * this.headroom || performance.now() - this.space.at > STATFS_MS) {
      this.spaceCheck ??= diskSpace(this.dir)
        .then(({ free, block }) => {
          // Files being written may not show in the answer yet: they count against it.
          this.space = { free: free - this.writing, at: performance.now(), block }
        })
        .catch(() => {
          // Unknown: the write below says whether there is room.
          this.space = { free: Number.POSITIVE_INFINITY, at: performance.now(), block: this.space.block }
        })
        .finally(() => {
          this.spaceCheck = undefined
        })
      await this.spaceCheck
    }
    if (this.space.free - need < this.headroom) {
      throw new StoreFullError(this.dir, digest, { free: Math.max(0, Math.round(this.space.free)) })
    }
    this.space.free -= need
    this.writing += need
    return need
  }

  /** A write that failed: counted, announced (`error` event) and returned to throw. Aborts and close are not failures. */
  private failed(operation: string, err: unknown, digest?: string): unknown {
    const error = err as Error
    if (error?.name === 'AbortError' || error?.name === 'StoreClosedError' || this.closing !== undefined) return err
    this.ledger.writeErrors++
    const detail: StoreErrorEventDetail = {
      operation,
      ...(digest === undefined ? {} : { digest }),
      error: error instanceof Error ? error : new Error(String(err))
    }
    this.dispatchEvent(new CustomEvent('error', { detail }))
    return err
  }

  private chunkPath(digest: string): string {
    return join(this.chunksDir, digest.slice(7, 9), digest.slice(7))
  }

  private fileError(err: unknown, operation: string, path: string, digest?: string): Error {
    if ((err as Error)?.name === 'AbortError') return err as Error
    if (digest !== undefined && isDiskFull(err)) return new StoreFullError(this.dir, digest, { cause: err })
    return new StoreIOError(operation, path, { cause: err })
  }

  private check(options: AbortOptions | undefined, digest?: string): void {
    options?.signal?.throwIfAborted()
    if (this.closing !== undefined) throw new StoreClosedError(`at ${this.dir}`)
    if (digest !== undefined) assertDigest(digest)
  }
}

async function loadIndex(db: Db, ledger: Ledger): Promise<void> {
  const records: Array<[string, ChunkRecord]> = []
  // Many chunks share a layer: keep one copy of each layer digest in memory.
  const layers = new Map<string, string>()
  for await (const [key, value] of db.iterator({ gte: CHUNK, lt: 'c"' })) {
    const record = decodeRecord(value)
    record.layers = record.layers.map((layer) => {
      const known = layers.get(layer)
      if (known !== undefined) return known
      layers.set(layer, layer)
      return layer
    })
    records.push([key.slice(CHUNK.length), record])
  }
  records.sort((a, b) => a[1].atime - b[1].atime)
  for (const [digest, record] of records) ledger.add(digest, record)
  for await (const key of db.keys({ gte: PIN, lt: 'p"' })) {
    const sep = key.lastIndexOf('\0')
    ledger.pin(key.slice(PIN.length, sep), [key.slice(sep + 1)])
  }
}

/** What repairStore found, and the generation every chunk is durable up to once it has finished. */
type Repaired = Omit<RepairReport, 'indexRebuilt'> & { gen: number }

/**
 * Makes files and index agree after whatever happened before this open (a crash, a power loss, a full disk,
 * tampering). Chunks of generations after the last checkpoint (`synced`) and files without an index entry may
 * hold anything a power loss left: they are read and hashed, kept only if they hash to their name, and then
 * fsynced, so that afterwards every chunk counts as durable.
 */
async function repairStore(chunksDir: string, db: Db, ledger: Ledger, fsync: boolean): Promise<Repaired> {
  const report = { tempRemoved: 0, missingDropped: 0, reindexed: 0, badRemoved: 0, verified: 0 }
  const value = await db.get(SYNCED)
  const synced = value === undefined ? 0 : Number(decoder.decode(value))
  let gen = synced
  const ops: Op[] = []
  const seen = new Set<string>()
  /** Files this pass read and kept: made durable before the pass records that. */
  const checked: string[] = []
  /** The size of a file whose content hashes to its name, else undefined. */
  const verifiedSize = async (path: string, name: string): Promise<number | undefined> => {
    const bytes = await readFile(path).catch(() => undefined)
    if (bytes === undefined || sha256Hex(bytes) !== name) return undefined
    return bytes.length
  }
  const present = new Set(await readdir(chunksDir))
  for (const fan of FANOUT) {
    const sub = join(chunksDir, fan)
    if (!present.has(fan)) {
      await mkdir(sub)
      continue
    }
    for (const name of await readdir(sub)) {
      const path = join(sub, name)
      if (name.startsWith(TMP)) {
        await rm(path, { force: true, recursive: true })
        report.tempRemoved++
        continue
      }
      const digest = `sha256:${name}`
      const record = name.startsWith(fan) ? ledger.chunks.get(digest) : undefined
      if (record !== undefined) {
        const recordGen = record.gen ?? 0
        gen = Math.max(gen, recordGen)
        if (recordGen <= synced) {
          seen.add(digest)
          continue
        }
        report.verified++
        if ((await verifiedSize(path, name)) === record.size) {
          record.verified = true
          seen.add(digest)
          checked.push(path)
        } else {
          await rm(path, { force: true, recursive: true })
          ledger.remove(digest)
          ops.push({ type: 'del', key: CHUNK + digest })
          report.badRemoved++
        }
        continue
      }
      const size = HEX.test(name) && name.startsWith(fan) ? await verifiedSize(path, name) : undefined
      if (size !== undefined) {
        const added: ChunkRecord = { size, atime: ledger.now(), layers: [], gen: 0, verified: true }
        ledger.add(digest, added)
        ops.push(recordOp(digest, added))
        seen.add(digest)
        checked.push(path)
        report.reindexed++
      } else {
        await rm(path, { force: true, recursive: true })
        report.badRemoved++
      }
    }
  }
  for (const digest of [...ledger.chunks.keys()]) {
    if (seen.has(digest)) continue
    ledger.remove(digest)
    ops.push({ type: 'del', key: CHUNK + digest })
    report.missingDropped++
  }
  // The cap may have been lowered since the last run.
  for (const [digest] of ledger.shrinkTo(ledger.maxBytes)) {
    await rm(join(chunksDir, digest.slice(7, 9), digest.slice(7)), { force: true })
    ops.push({ type: 'del', key: CHUNK + digest })
  }
  if (fsync) await syncChunks(join(chunksDir, '..'), checked)
  if (gen !== synced) ops.push(syncedOp(gen))
  if (ops.length > 0) await db.batch(ops, { sync: true })
  return { ...report, gen }
}

/**
 * Opens the index. A damaged one is deleted and started afresh: it only caches what the chunk files say, and
 * the repair pass then indexes every file again after verifying it (pins and metadata are lost).
 */
async function openIndex(dir: string, indexDir: string): Promise<{ db: Db; rebuilt: boolean }> {
  for (let rebuilt = false; ; rebuilt = true) {
    const db: Db = new Level<string, Uint8Array>(indexDir, { valueEncoding: 'view' })
    try {
      await db.open()
      return { db, rebuilt }
    } catch (err) {
      const cause = errorCode((err as Error)?.cause)
      if (cause === 'LEVEL_LOCKED') throw new StoreLockedError(dir, { cause: err })
      if (cause !== 'LEVEL_CORRUPTION' || rebuilt) throw new StoreIOError('open', indexDir, { cause: err })
      await rm(indexDir, { recursive: true, force: true })
    }
  }
}

/**
 * Opens (or creates) the chunk store in `dir` and takes its lock: only one process may own a store.
 * Runs the repair pass first (which also evicts down to the cap if it was lowered).
 */
export async function openDiskStore(dir: string, init: DiskStoreInit = {}): Promise<DiskChunkStore> {
  const ledger = new Ledger(init.maxBytes)
  const chunksDir = join(dir, 'chunks')
  const indexDir = join(dir, 'index')
  /** A full disk, said plainly (not as a permissions problem), with what is free. */
  const full = async (err: unknown): Promise<never> => {
    if (!isDiskFull(err) && !isDiskFull((err as Error)?.cause)) throw err
    const free = await diskSpace(dir).then(
      (s) => s.free,
      () => undefined
    )
    throw new StoreFullError(dir, undefined, { cause: err, ...(free === undefined ? {} : { free }) })
  }
  await mkdir(chunksDir, { recursive: true }).catch(full)
  const { db, rebuilt } = await openIndex(dir, indexDir).catch(full)
  try {
    await loadIndex(db, ledger)
    const fsync = init.fsync ?? true
    const { gen, ...found } = await repairStore(chunksDir, db, ledger, fsync).catch(full)
    const unknown = { free: Number.POSITIVE_INFINITY, size: 0, block: 4096 }
    let space = await diskSpace(dir).catch(() => unknown)
    const headroom = init.headroomBytes ?? Math.min(MAX_HEADROOM_BYTES, Math.floor(space.size * HEADROOM_SHARE))
    // A disk that filled up while the store was closed (or before it kept headroom): unpinned chunks, least
    // recently used first, make room (asked again after each round: files take whole blocks, the index writes).
    for (let round = 0; space.free < headroom && round < 8; round++) {
      const victims = ledger.shrinkTo(Math.max(0, ledger.bytes - (headroom - space.free)))
      if (victims.length === 0) break
      for (const [digest] of victims) await rm(join(chunksDir, digest.slice(7, 9), digest.slice(7)), { force: true })
      await db.batch(victims.map(([digest]) => ({ type: 'del' as const, key: CHUNK + digest }))).catch(full)
      space = await diskSpace(dir).catch(() => unknown)
    }
    const checkpointMs = init.checkpointMs ?? 1000
    const verifyReads = init.verifyReads ?? true
    const repair = { ...found, indexRebuilt: rebuilt }
    return new DiskStore(dir, db, ledger, repair, {
      fsync,
      gen: gen + 1,
      checkpointMs,
      verifyReads,
      headroom,
      space: { free: space.free, block: space.block }
    })
  } catch (err) {
    await db.close()
    throw err
  }
}
