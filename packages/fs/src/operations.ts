import { constants } from 'node:fs'
import type { AbortOptions } from '@strata/base'
import type { Entry } from '@strata/stargz'
import { FsError } from './errors.js'
import { createLibraryPrefetch } from './libraries.js'
import type { Node, NodeType, Tree } from './tree.js'

/**
 * Copies the bytes at `offset` of a regular file's content into `into` (all of it: the caller keeps within the
 * file), verified; the count. In production this is the fetcher's readRange for the layer with this index, which
 * owns what a read of a file needs below the tree: its chunks, the store's in-place fast path, the chunk buffer
 * and read-ahead.
 */
export type ReadRange = (
  layer: number,
  entry: Entry,
  offset: number,
  into: Uint8Array,
  options?: AbortOptions
) => Promise<number>

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
  /**
   * The path of a local file holding exactly the bytes of a file of one chunk (its chunk file in the store),
   * verified against its digest, or undefined: what FUSE passthrough hands the kernel. The fetcher's storedFile.
   */
  storedFile?: (layer: number, entry: Entry, options?: AbortOptions) => Promise<string | undefined>
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
const WRITE_FLAGS = constants.O_WRONLY | constants.O_RDWR | constants.O_TRUNC | constants.O_CREAT | constants.O_APPEND

export function createOperations(tree: Tree, read: ReadRange, init: OperationsInit = {}): Operations {
  /** Fills `into` from `offset` of a regular file (within its size) through the layer's reader. */
  const readNode = async (node: Node, offset: number, into: Uint8Array, options?: AbortOptions): Promise<number> => {
    const { layer, entry } = node.source!
    return read(layer, entry, offset, into, options)
  }
  const libraries =
    init.prefetchLibraries === false
      ? undefined
      : createLibraryPrefetch(tree, async (node, offset, length) => {
          const into = new Uint8Array(Math.max(0, Math.min(length, node.size - offset)))
          return into.subarray(0, await readNode(node, offset, into))
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
        return await readNode(node, offset, into.subarray(0, n), options)
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

/** glibc's makedev: the dev_t the kernel expects in st_rdev. */
function makedev(major: number, minor: number): number {
  return (major & 0xfff) * 0x100 + (minor & 0xff) + (minor & 0xfff00) * 0x1000
}
