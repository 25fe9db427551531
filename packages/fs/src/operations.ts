import { constants } from 'node:fs'
import type { AbortOptions, Chunk, Entry } from '@strata/stargz'
import { FsError } from './errors.js'
import { createLibraryPrefetch } from './libraries.js'
import type { Node, NodeType, Tree } from './tree.js'

/**
 * Reads `length` bytes at `offset` of a regular file's content (fewer only at its end), verified.
 * In production this is the fetcher's readFile for the layer with this index.
 */
export type ReadFile = (
  layer: number,
  entry: Entry,
  offset: number,
  length: number,
  options?: AbortOptions
) => Promise<Uint8Array>

/**
 * Copies the bytes at `offset` of a file's content into `into` (all of it: the caller keeps within the file)
 * straight from local storage, or says undefined when some of them are not there. In production this is the
 * fetcher's readStored: the fast path of a chunk already in the store, with no chunk buffered in memory.
 */
export type ReadStored = (
  layer: number,
  entry: Entry,
  offset: number,
  into: Uint8Array,
  options?: AbortOptions
) => Promise<number | undefined>

/** What stat(2) shows for a node. `mode` includes the file-type bits. */
export interface Stat {
  ino: number
  mode: number
  nlink: number
  uid: number
  gid: number
  /** Device number for char/block devices (glibc encoding), else 0. */
  rdev: number
  size: number
  blksize: number
  /** 512-byte blocks. */
  blocks: number
  mtimeMs: number
}

export interface StatFs {
  bsize: number
  frsize: number
  blocks: number
  bfree: number
  bavail: number
  files: number
  ffree: number
  favail: number
  namemax: number
}

/** A read a reader saw as EIO, and why. */
export interface ReadFailure {
  path: string
  layer: number
  offset: number
  length: number
  error: Error
}

export interface OperationsInit {
  /** Called for every read that fails (the reader gets EIO): log `failure.error` here. */
  onError?: (failure: ReadFailure) => void
  /** Called before every read with the path it reads (the read recorder listens here). */
  onRead?: (path: string) => void
  /** The fast path for chunks in local storage; without it every read goes through whole chunks in memory. */
  readStored?: ReadStored
  /**
   * The path of a local file holding exactly the bytes of a file of one chunk (its chunk file in the store),
   * verified against its digest, or undefined: what FUSE passthrough hands the kernel. The fetcher's storedFile.
   */
  storedFile?: (layer: number, entry: Entry, options?: AbortOptions) => Promise<string | undefined>
  /**
   * Memory for whole chunks being read or recently read (default 32 MiB, see CHUNK_BUFFER_BYTES). The kernel
   * reads at most 1 MiB at a time; a chunk is usually MiBs, and without this every piece would fetch (and copy)
   * the whole chunk again. Chunks no read touched for `chunkBufferIdleMs` (default 10 s) are let go: an idle or
   * ended mount holds none.
   */
  chunkBufferBytes?: number
  chunkBufferIdleMs?: number
  /**
   * When a program or shared library is first read, read the libraries its dynamic section names at once, in
   * the background, instead of one round trip after another as the loader opens them (default true).
   */
  prefetchLibraries?: boolean
}

/** The FUSE operations as plain functions. They throw FsError, whose `errno` the FUSE layer returns. */
export interface Operations {
  getattr(path: string): Stat
  readdir(path: string): string[]
  /** Checks that `path` can be opened with `flags` (open(2) flags): read-only opens of files only. */
  open(path: string, flags: number): void
  /** Fills `into` with the bytes at `offset` of a regular file; the count (less than asked at its end). */
  read(path: string, offset: number, into: Uint8Array, options?: AbortOptions): Promise<number>
  readlink(path: string): string
  getxattr(path: string, name: string): Uint8Array
  listxattr(path: string): string[]
  statfs(): StatFs
  access(path: string, mode: number): void
  /** Every operation that would change the file system: always EROFS. */
  modify(path: string): never
  /**
   * A path of the node with this inode number: a FUSE session served again by a new process (after a p2pd
   * restart) gets node ids the kernel learnt from the old one, which never looked them up here.
   */
  pathOf?(ino: number): string | undefined
  /**
   * For an open of a regular file held whole in one verified local file (a single-chunk file whose chunk is in
   * the store), that file's path: the kernel may read it directly (FUSE passthrough). Undefined at once (no
   * promise) for a file that could never have one (not a file of one chunk).
   */
  backingFile?(path: string, options?: AbortOptions): Promise<string | undefined> | undefined
  /** A file was opened with passthrough: its reads will not come here, so this counts as its read. */
  passedThrough?(path: string): void
}

const TYPE_BITS: Record<NodeType, number> = {
  dir: constants.S_IFDIR,
  reg: constants.S_IFREG,
  symlink: constants.S_IFLNK,
  char: constants.S_IFCHR,
  block: constants.S_IFBLK,
  fifo: constants.S_IFIFO
}

const BLOCK = 4096
/**
 * The chunk buffer's bound. A sequential reader needs the chunk it is in (without the store's fast path, the two read
 * ahead too: 12 MiB of the usual 4 MiB chunks); pieces of a chunk that fell out are read from the store in place. 64
 * MiB, mostly chunks of files already read to their end, was a third of what p2pd kept after reading a 250 MB image
 * through a mount.
 */
const CHUNK_BUFFER_BYTES = 32 * 1024 * 1024
const CHUNK_BUFFER_IDLE_MS = 10_000
/** Chunks larger than this (a whole-file chunk of a legacy layer) are read piecewise, not buffered. */
const MAX_BUFFERED_CHUNK = 16 * 1024 * 1024
const WRITE_FLAGS = constants.O_WRONLY | constants.O_RDWR | constants.O_TRUNC | constants.O_CREAT | constants.O_APPEND

export function createOperations(tree: Tree, read: ReadFile, init: OperationsInit = {}): Operations {
  const buffer = new ChunkBuffer(
    init.chunkBufferBytes ?? CHUNK_BUFFER_BYTES,
    init.chunkBufferIdleMs ?? CHUNK_BUFFER_IDLE_MS
  )

  /**
   * Fills `into` from `offset` of a regular file (within its size): from chunks in memory; else straight from
   * local storage; else by loading whole chunks into memory (the kernel reads a chunk in pieces of up to 1 MiB).
   */
  const readNode = async (node: Node, offset: number, into: Uint8Array, options?: AbortOptions): Promise<void> => {
    const { layer, entry } = node.source!
    const [first, last] = chunkRange(entry, offset, into.length)
    const touched = entry.chunks.slice(first, last)
    if (init.readStored !== undefined && !touched.every((c) => buffer.has(c))) {
      if ((await init.readStored(layer, entry, offset, into, options)) === into.length) return
    }
    if (touched.length === 0 || touched.some((c) => c.size > MAX_BUFFERED_CHUNK)) {
      into.set(await read(layer, entry, offset, into.length, options))
      return
    }
    const load = (c: Chunk) => buffer.get(c, () => read(layer, entry, c.fileOffset, c.size, options))
    const parts = await Promise.all(touched.map(load))
    // A reader in the second half of a chunk most likely wants the next ones: have two ready. Not with the store's
    // fast path: the fetcher reads ahead into the store, and the next chunks are read from there in place (loaded
    // here, each would cost its bytes in memory, read whole from the store when it has them).
    const end = touched[touched.length - 1]!
    if (init.readStored === undefined && offset + into.length > end.fileOffset + end.size / 2) {
      for (const next of entry.chunks.slice(last, last + 2))
        if (next.size <= MAX_BUFFERED_CHUNK) load(next).catch(() => {})
    }
    parts.forEach((bytes, i) => {
      const c = touched[i]!
      const from = Math.max(offset, c.fileOffset)
      const to = Math.min(offset + into.length, c.fileOffset + c.size)
      into.set(bytes.subarray(from - c.fileOffset, to - c.fileOffset), from - offset)
      // Read to its end, a chunk is let go where the store can serve it: a sequential reader is done with it, and
      // another reader reads it from the store in place.
      if (init.readStored !== undefined && to === c.fileOffset + c.size) buffer.drop(c)
    })
  }
  const libraries =
    init.prefetchLibraries === false
      ? undefined
      : createLibraryPrefetch(tree, async (node, offset, length) => {
          const into = new Uint8Array(Math.max(0, Math.min(length, node.size - offset)))
          await readNode(node, offset, into)
          return into
        })
  const resolve = (path: string): Node => {
    const node = tree.lookup(path)
    if (node !== undefined) return node
    // ENOTDIR when a leading component is not a directory, as the kernel would say.
    const parts = path.split('/').filter((p) => p !== '')
    for (let i = 1; i < parts.length; i++) {
      const up = tree.lookup(parts.slice(0, i).join('/'))
      if (up === undefined) break
      if (up.type !== 'dir') throw new FsError('ENOTDIR', `${parts.slice(0, i).join('/')} is not a directory`)
    }
    throw new FsError('ENOENT', `no such file or directory: ${path}`)
  }

  return {
    getattr(path) {
      const node = resolve(path)
      return {
        ino: node.ino,
        mode: TYPE_BITS[node.type] | (node.mode & 0o7777),
        nlink: node.nlink,
        uid: node.uid,
        gid: node.gid,
        rdev: node.type === 'char' || node.type === 'block' ? makedev(node.devMajor, node.devMinor) : 0,
        size: node.size,
        blksize: BLOCK,
        blocks: Math.ceil(node.size / BLOCK) * (BLOCK / 512),
        mtimeMs: node.mtimeMs
      }
    },

    readdir(path) {
      const node = resolve(path)
      if (node.names === undefined) throw new FsError('ENOTDIR', `not a directory: ${path}`)
      return node.names
    },

    open(path, flags) {
      const node = resolve(path)
      if ((flags & WRITE_FLAGS) !== 0) throw new FsError('EROFS', `read-only image: cannot open ${path} for writing`)
      if (node.type === 'dir' && (flags & constants.O_DIRECTORY) === 0) {
        throw new FsError('EISDIR', `is a directory: ${path}`)
      }
    },

    async read(path, offset, into, options) {
      const node = resolve(path)
      if (node.type === 'dir') throw new FsError('EISDIR', `is a directory: ${path}`)
      if (node.source === undefined) throw new FsError('EINVAL', `not a regular file: ${path}`)
      const n = Math.max(0, Math.min(into.length, node.size - offset))
      if (n === 0) return 0
      init.onRead?.(path)
      libraries?.touched(path, node)
      try {
        await readNode(node, offset, into.subarray(0, n), options)
        return n
      } catch (err) {
        const error = err instanceof Error ? err : new Error(String(err))
        init.onError?.({ path, layer: node.source.layer, offset, length: n, error })
        throw new FsError('EIO', `reading ${path} at ${offset}+${n} failed: ${error.message}`, { cause: err })
      }
    },

    readlink(path) {
      const node = resolve(path)
      if (node.linkName === undefined) throw new FsError('EINVAL', `not a symlink: ${path}`)
      return node.linkName
    },

    getxattr(path, name) {
      const value = resolve(path).xattrs[name]
      if (value === undefined) throw new FsError('ENODATA', `no attribute ${name} on ${path}`)
      return value
    },

    listxattr(path) {
      return Object.keys(resolve(path).xattrs)
    },

    statfs() {
      const blocks = Math.ceil(tree.bytes / BLOCK)
      return {
        bsize: BLOCK,
        frsize: BLOCK,
        blocks,
        bfree: 0,
        bavail: 0,
        files: tree.inodes,
        ffree: 0,
        favail: 0,
        namemax: 255
      }
    },

    access(path, mode) {
      resolve(path)
      if ((mode & constants.W_OK) !== 0) throw new FsError('EROFS', `read-only image: ${path} is not writable`)
    },

    modify(path) {
      throw new FsError('EROFS', `read-only image: cannot change ${path}`)
    },

    pathOf(ino) {
      return tree.pathOf(ino)
    },

    ...(init.storedFile !== undefined && {
      backingFile(path: string, options?: AbortOptions) {
        const node = tree.lookup(path)
        const entry = node?.source?.entry
        const chunk = entry?.chunks.length === 1 ? entry.chunks[0] : undefined
        if (node === undefined || chunk === undefined || chunk.fileOffset !== 0 || chunk.size !== node.size) {
          return undefined
        }
        return init.storedFile!(node.source!.layer, entry!, options)
      },

      passedThrough(path: string) {
        const node = tree.lookup(path)
        if (node === undefined || node.size === 0) return
        init.onRead?.(path)
        libraries?.touched(path, node)
      }
    })
  }
}

/** Indexes [first, last) of the chunks of `entry` that hold [offset, offset + length), by binary search. */
function chunkRange(entry: Entry, offset: number, length: number): [number, number] {
  const chunks = entry.chunks
  let lo = 0
  let hi = chunks.length - 1
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1
    if (chunks[mid]!.fileOffset <= offset) lo = mid
    else hi = mid - 1
  }
  let last = lo
  while (last < chunks.length && chunks[last]!.fileOffset < offset + length) last++
  return [lo, last]
}

/**
 * Whole chunks recently read, by digest (content-addressed, so one copy serves every file that has it),
 * least recently used first out, all of them once none was asked for in `idleMs`. A read in flight is shared; a
 * failed one is forgotten, so the next read tries again.
 */
class ChunkBuffer {
  private readonly chunks = new Map<string, { bytes: Promise<Uint8Array>; size: number }>()
  private bytes = 0
  private usedAt = 0
  private idle: NodeJS.Timeout | undefined

  constructor(
    private readonly maxBytes: number,
    private readonly idleMs: number
  ) {}

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

/** glibc's makedev: the dev_t the kernel expects in st_rdev. */
function makedev(major: number, minor: number): number {
  return (major & 0xfff) * 0x100 + (minor & 0xff) + (minor & 0xfff00) * 0x1000
}
