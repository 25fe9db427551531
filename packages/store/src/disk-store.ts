import { randomBytes } from 'node:crypto'
import { readdir, rename, rm, unlink, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { AbortOptions } from '@strata/base'
import { Checkpointer } from './disk-checkpoint.js'
import { errorCode, isDiskFull, OpenFiles, plain, readExactly, Serial, sha256HexOffLoop } from './disk-files.js'
import { CHUNK, type Db, FANOUT, IndexWriter, META, type Op, PIN, recordOp, TMP } from './disk-index.js'
import { FreeSpace } from './disk-space.js'
import { StoreClosedError, StoreFullError, StoreIOError } from './errors.js'
import { assertDigest, assertOffset, type ChunkRecord, type Ledger } from './ledger.js'
import type {
  CorruptEventDetail,
  DiskChunkStore,
  EvictEventDetail,
  GcOptions,
  GcResult,
  PutEventDetail,
  PutOptions,
  RepairReport,
  StoreErrorEventDetail,
  StoreStats
} from './types.js'

// The disk store once open (disk.ts opens it): gets, reads and puts of chunk files, pins, metadata, eviction and gc.

/** Last-access times are written in batches at this interval (and on close), never on the get path. */
const ATIME_FLUSH_MS = 1000
/** Chunk files `read` keeps open: a few mounts reading a few files each, sequentially. */
const OPEN_FILES = 32

const EMPTY = new Uint8Array(0)

export class DiskStore extends EventTarget implements DiskChunkStore {
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
  /** Put, delete and evict run one at a time per digest. */
  private readonly serial = new Serial()
  private readonly tempFiles = new Set<string>()
  private readonly openFiles = new OpenFiles(OPEN_FILES, (digest) => this.chunkPath(digest))
  private closing: Promise<void> | undefined
  /** The generation puts record, and the checkpoints that make chunk files durable. */
  private readonly checkpointer: Checkpointer
  private readonly freeSpace: FreeSpace

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
    this.freeSpace = new FreeSpace(dir, init.headroom, init.space)
    this.writer = new IndexWriter(db)
    this.timer = setInterval(() => this.flushAtimes(), ATIME_FLUSH_MS)
    this.timer.unref()
    this.checkpointer = new Checkpointer({
      dir,
      fsync: init.fsync,
      writer: this.writer,
      gen: init.gen,
      checkpointMs: init.checkpointMs,
      failed: (operation, err) => this.failed(operation, err)
    })
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
    const stored = await this.serial
      .run(digest, () => this.store(digest, bytes, options))
      .catch((err: unknown) => {
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
      await this.serial.run(digest, () => this.unlinkChunk(digest))
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
        const removed = await this.serial.run(digest, async () => {
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
    this.checkpointer.stop()
    while (this.serial.busy.size > 0 || this.verifying.size > 0)
      await Promise.allSettled([...this.serial.busy.values(), ...this.verifying.values()])
    await this.openFiles.closeAll()
    this.flushAtimes()
    await this.checkpointer.checkpoint()
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
    while (this.checkpointer.behind) await this.checkpointer.checkpoint()
    const victims = this.ledger.reserve(digest, size)
    const path = this.chunkPath(digest)
    let room = 0
    try {
      await this.dropEvicted(victims)
      room = await this.freeSpace.take(digest, size)
      await this.writeChunk(digest, path, bytes, options?.signal)
    } finally {
      this.ledger.release(size)
      this.freeSpace.give(room)
    }
    const record: ChunkRecord = {
      size,
      atime: this.ledger.now(),
      layers: layer === undefined ? [] : [layer],
      gen: this.checkpointer.gen,
      // The caller verified the bytes, and this process wrote them.
      verified: true
    }
    this.ledger.add(digest, record)
    this.checkpointer.add(path, size)
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

  /** Deletes the files and index entries of chunks the ledger evicted, then tells listeners. */
  private async dropEvicted(victims: Array<[string, ChunkRecord]>): Promise<void> {
    if (victims.length === 0) return
    const digests = victims.map(([d]) => d)
    for (const digest of digests) this.dirty.delete(digest)
    await Promise.all(digests.map((d) => this.serial.run(d, () => this.unlinkChunk(d))))
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
    await this.serial.run(digest, () => this.unlinkChunk(digest))
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
