import { execFile } from 'node:child_process'
import { webcrypto } from 'node:crypto'
import { type FileHandle, open } from 'node:fs/promises'
import { join } from 'node:path'
import { promisify } from 'node:util'

// File I/O of the disk store: reading chunk files, hashing them, the open-file cache, syncing them to disk, and
// the per-digest order of the operations on them.

/** Files fsynced at once by a checkpoint or the repair pass when they are synced one by one. */
const SYNCS_IN_FLIGHT = 16
/** Longest a sync of the whole file system may take before the files are fsynced one by one instead. */
const SYNC_TIMEOUT_MS = 120_000

const execFileAsync = promisify(execFile)

/** A plain Uint8Array view of a Buffer, so callers comparing bytes see the type the contract names. */
export function plain(bytes: Uint8Array): Uint8Array {
  return new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength)
}

export function errorCode(err: unknown): string | undefined {
  return (err as { code?: string } | undefined)?.code
}

/** ENOSPC/EDQUOT from node:fs, or LevelDB's IO error text when the index write hit the full disk. */
export function isDiskFull(err: unknown): boolean {
  const code = errorCode(err)
  if (code === 'ENOSPC' || code === 'EDQUOT') return true
  const e = err as Error | undefined
  return /No space left on device|Disk quota exceeded/.test(`${e?.message} ${(e?.cause as Error)?.message}`)
}

/**
 * The hot path: open, one read of the size the index knows, close (no stat). It asks for one byte more, so a
 * file that grew shows too (a short read of a regular file means its end). Undefined when the size is wrong.
 */
export async function readExactly(path: string, size: number): Promise<Uint8Array | undefined> {
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
export async function sha256HexOffLoop(bytes: Uint8Array): Promise<string> {
  return Buffer.from(await webcrypto.subtle.digest('SHA-256', bytes)).toString('hex')
}

/**
 * Chunk files kept open for `read`, most recently used last: a mount reads a chunk in pieces of up to 1 MiB,
 * and an open and a close per piece would cost more than the read. A file removed while open stays readable (its
 * bytes do not change) until closed.
 */
export class OpenFiles {
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
export async function syncChunks(dir: string, paths: string[]): Promise<void> {
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

/** File operations on chunks (put, delete, evict), one at a time per digest. */
export class Serial {
  /** digest -> the tail of the file operations on it (put, delete, evict run one at a time per digest). */
  readonly busy = new Map<string, Promise<void>>()

  /** Runs fn after every earlier file operation on the same digest. */
  run<T>(digest: string, fn: () => Promise<T>): Promise<T> {
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
}
