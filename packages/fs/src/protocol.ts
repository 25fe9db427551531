// The FUSE kernel protocol (linux/fuse.h), the part a read-only file system speaks: message layouts and the
// answers to each request, over the plain-function Operations. No I/O here: fuse.ts moves the bytes.
import { randomInt } from 'node:crypto'
import { constants } from 'node:os'
import { FsError } from './errors.js'
import type { Operations, Stat } from './operations.js'

export const Op = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  READLINK: 5,
  SYMLINK: 6,
  MKNOD: 8,
  MKDIR: 9,
  UNLINK: 10,
  RMDIR: 11,
  RENAME: 12,
  LINK: 13,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  SETXATTR: 21,
  GETXATTR: 22,
  LISTXATTR: 23,
  REMOVEXATTR: 24,
  FLUSH: 25,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
  RELEASEDIR: 29,
  FSYNCDIR: 30,
  ACCESS: 34,
  CREATE: 35,
  INTERRUPT: 36,
  DESTROY: 38,
  BATCH_FORGET: 42,
  FALLOCATE: 43,
  RENAME2: 45,
  COPY_FILE_RANGE: 47,
  TMPFILE: 51
} as const

/** Requests that would change the file system: EROFS (the kernel stops most of them at the `ro` mount). */
const MODIFYING = new Set<number>([
  Op.SETATTR,
  Op.SYMLINK,
  Op.MKNOD,
  Op.MKDIR,
  Op.UNLINK,
  Op.RMDIR,
  Op.RENAME,
  Op.LINK,
  Op.WRITE,
  Op.SETXATTR,
  Op.REMOVEXATTR,
  Op.CREATE,
  Op.FALLOCATE,
  Op.RENAME2,
  Op.COPY_FILE_RANGE,
  Op.TMPFILE
])

/** Requests the kernel sends no answer for. */
const UNANSWERED = new Set<number>([Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT])

const KERNEL_MAJOR = 7
/** The protocol minor this implementation speaks (max_pages came with 7.28, passthrough and resend with 7.40). */
const OUR_MINOR = 40
const MIN_MINOR = 28

const Init = {
  ASYNC_READ: 1 << 0,
  PARALLEL_DIROPS: 1 << 18,
  MAX_PAGES: 1 << 22,
  CACHE_SYMLINKS: 1 << 23,
  /** flags2 follows in the INIT request and reply. */
  INIT_EXT: 1 << 30
}
/** Flags of INIT's flags2 (bits 32 and up of the kernel's 64-bit flags). */
const Init2 = {
  PASSTHROUGH: 1 << (37 - 32),
  HAS_RESEND: 1 << (39 - 32)
}
const FOPEN_KEEP_CACHE = 1 << 1
/** Reads (and mmap) of this open file go to its backing file, in the kernel: no request reaches the server. */
const FOPEN_PASSTHROUGH = 1 << 7
const FOPEN_CACHE_DIR = 1 << 3

export const IN_HEADER = 40
export const OUT_HEADER = 16
const ATTR = 88
const PAGE = 4096

/** One request from the kernel, its header decoded; `body` is what follows the header. */
export interface Request {
  opcode: number
  unique: bigint
  nodeid: number
  body: Uint8Array
}

export interface SessionInit {
  /** Seconds the kernel may cache entries, attributes and misses. */
  cacheTimeout: number
  /** Largest read the kernel may ask for (sets max_pages). */
  maxRead: number
  /** Ask for FUSE_PASSTHROUGH when the kernel offers it (the server can register backing files). */
  passthrough?: boolean
}

/** Decodes the header of a message the kernel wrote, or throws when it is too short or lies about its length. */
export function parseRequest(bytes: Uint8Array): Request {
  if (bytes.length < IN_HEADER) throw new Error(`FUSE request of ${bytes.length} bytes: shorter than its header`)
  const v = view(bytes)
  const len = v.getUint32(0, true)
  if (len !== bytes.length) throw new Error(`FUSE request says ${len} bytes but has ${bytes.length}`)
  return {
    opcode: v.getUint32(4, true),
    unique: v.getBigUint64(8, true),
    nodeid: Number(v.getBigUint64(16, true)),
    body: bytes.subarray(IN_HEADER)
  }
}

/** Writes the reply header in front of `message` (whose first OUT_HEADER bytes are reserved for it). */
export function frame(message: Uint8Array, unique: bigint, error: number): Uint8Array {
  const v = view(message)
  v.setUint32(0, message.length, true)
  v.setInt32(4, -error, true)
  v.setBigUint64(8, unique, true)
  return message
}

export function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength)
}

export function message(size: number): { bytes: Uint8Array; v: DataView } {
  const bytes = new Uint8Array(OUT_HEADER + size)
  return { bytes, v: view(bytes) }
}

export function cString(b: Uint8Array, at = 0): string {
  const end = b.indexOf(0, at)
  return Buffer.from(b.buffer, b.byteOffset + at, (end < 0 ? b.length : end) - at).toString()
}

/** The errno a failure answers with: an FsError's own, else EIO. */
function errnoOf(err: unknown): number {
  return err instanceof FsError ? err.errno : constants.errno.EIO
}

interface DirEntry {
  name: Buffer
  ino: number
  type: number
}

/**
 * The file system side of one FUSE connection. `answer` turns a request into its reply message (header
 * included), or undefined for requests that get none. Node ids are the tree's inode numbers (the root's is 1,
 * as FUSE wants); a node id is remembered with a path it was looked up by, for the path-based Operations.
 */
export class Session {
  readonly #ops: Operations
  readonly #init: SessionInit
  readonly #paths = new Map<number, string>([[1, '/']])
  /** Open directories' listings by handle, with the node each is of. */
  readonly #dirs = new Map<bigint, { nodeid: number; entries: DirEntry[] }>()
  /**
   * Directory handles start anywhere: a connection served again by a new process (p2pd restarted) still has
   * handles of the old one open, and a listing is checked against the node it is of.
   */
  #nextHandle = BigInt(randomInt(1, 2 ** 47)) << 16n
  /** The protocol minor agreed in INIT; 0 before. */
  minor = 0
  /** Whether INIT agreed FUSE_PASSTHROUGH (undefined: this process did not see the INIT). */
  passthrough: boolean | undefined
  /** Whether the kernel said it can resend unanswered requests (FUSE_HAS_RESEND). */
  resend: boolean | undefined

  constructor(ops: Operations, init: SessionInit) {
    this.#ops = ops
    this.#init = init
  }

  /**
   * The reply to a request that needs no I/O (all but READ), or undefined when the kernel wants none. `READ` is
   * answered by `read`.
   */
  answer(req: Request): Uint8Array | undefined {
    if (UNANSWERED.has(req.opcode)) return undefined
    try {
      return frame(this.#answer(req), req.unique, 0)
    } catch (err) {
      return frame(new Uint8Array(OUT_HEADER), req.unique, errnoOf(err))
    }
  }

  /** Fills `into` (OUT_HEADER bytes of header room, then up to the size asked) and returns the framed reply. */
  async read(req: Request, into: Uint8Array, signal?: AbortSignal): Promise<Uint8Array> {
    try {
      const v = view(req.body)
      const offset = Number(v.getBigUint64(8, true))
      const size = Math.min(v.getUint32(16, true), into.length - OUT_HEADER)
      const n = await this.#ops.read(this.#path(req.nodeid), offset, into.subarray(OUT_HEADER, OUT_HEADER + size), {
        signal
      })
      return frame(into.subarray(0, OUT_HEADER + n), req.unique, 0)
    } catch (err) {
      return frame(into.subarray(0, OUT_HEADER), req.unique, errnoOf(err))
    }
  }

  /**
   * The reply to an OPEN whose reads pass through to the backing file `backingId` (registered with the
   * connection), or undefined to answer it as usual (`answer`); an error reply when the open is refused.
   */
  openPassthrough(req: Request, backingId: number): Uint8Array {
    try {
      this.#ops.open(this.#path(req.nodeid), view(req.body).getUint32(0, true))
      const reply = openReply(0n, FOPEN_PASSTHROUGH)
      view(reply).setInt32(OUT_HEADER + 12, backingId, true)
      return frame(reply, req.unique, 0)
    } catch (err) {
      return frame(new Uint8Array(OUT_HEADER), req.unique, errnoOf(err))
    }
  }

  /** The path of a node id, or undefined (an unknown node; its OPEN is answered by `answer`). */
  pathOf(nodeid: number): string | undefined {
    try {
      return this.#path(nodeid)
    } catch {
      return undefined
    }
  }

  #path(nodeid: number): string {
    let path = this.#paths.get(nodeid)
    if (path === undefined) {
      // A node id the kernel had from the process that served this connection before (p2pd restarted).
      path = this.#ops.pathOf?.(nodeid)
      if (path === undefined) throw new FsError('ESTALE', `unknown node ${nodeid}`)
      this.#paths.set(nodeid, path)
    }
    return path
  }

  #answer(req: Request): Uint8Array {
    const { opcode, body } = req
    if (MODIFYING.has(opcode)) throw new FsError('EROFS', `read-only image: request ${opcode} refused`)
    switch (opcode) {
      case Op.INIT:
        return this.#handshake(body)
      case Op.LOOKUP:
        return this.#lookup(req.nodeid, cString(body))
      case Op.GETATTR: {
        const { bytes, v } = message(16 + ATTR)
        setSeconds(v, OUT_HEADER, this.#init.cacheTimeout)
        writeAttr(v, OUT_HEADER + 16, this.#ops.getattr(this.#path(req.nodeid)))
        return bytes
      }
      case Op.READLINK: {
        const target = Buffer.from(this.#ops.readlink(this.#path(req.nodeid)))
        const { bytes } = message(target.length)
        bytes.set(target, OUT_HEADER)
        return bytes
      }
      case Op.OPEN: {
        this.#ops.open(this.#path(req.nodeid), view(body).getUint32(0, true))
        return openReply(0n, FOPEN_KEEP_CACHE)
      }
      case Op.OPENDIR: {
        const handle = this.#nextHandle++
        this.#dirs.set(handle, { nodeid: req.nodeid, entries: this.#listing(req.nodeid) })
        return openReply(handle, FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR)
      }
      case Op.READDIR:
        return this.#readdir(req.nodeid, body)
      case Op.RELEASEDIR:
        this.#dirs.delete(view(body).getBigUint64(0, true))
        return message(0).bytes
      case Op.RELEASE:
      case Op.FLUSH:
      case Op.FSYNC:
      case Op.FSYNCDIR:
      case Op.DESTROY:
        return message(0).bytes
      case Op.STATFS: {
        const s = this.#ops.statfs()
        const { bytes, v } = message(80)
        const at = OUT_HEADER
        v.setBigUint64(at, BigInt(s.blocks), true)
        v.setBigUint64(at + 8, BigInt(s.bfree), true)
        v.setBigUint64(at + 16, BigInt(s.bavail), true)
        v.setBigUint64(at + 24, BigInt(s.files), true)
        v.setBigUint64(at + 32, BigInt(s.ffree), true)
        v.setUint32(at + 40, s.bsize, true)
        v.setUint32(at + 44, s.namemax, true)
        v.setUint32(at + 48, s.frsize, true)
        return bytes
      }
      case Op.GETXATTR: {
        const size = view(body).getUint32(0, true)
        return sized(this.#ops.getxattr(this.#path(req.nodeid), cString(body, 8)), size)
      }
      case Op.LISTXATTR: {
        const size = view(body).getUint32(0, true)
        const names = this.#ops.listxattr(this.#path(req.nodeid))
        return sized(Buffer.from(names.map((n) => `${n}\0`).join('')), size)
      }
      case Op.ACCESS:
        this.#ops.access(this.#path(req.nodeid), view(body).getUint32(0, true))
        return message(0).bytes
      default:
        throw new FsError('ENOSYS', `request ${opcode} is not implemented`)
    }
  }

  #handshake(body: Uint8Array): Uint8Array {
    const v = view(body)
    const major = v.getUint32(0, true)
    const minor = v.getUint32(4, true)
    const maxReadahead = v.getUint32(8, true)
    const offered = v.getUint32(12, true)
    if (major !== KERNEL_MAJOR || minor < MIN_MINOR) {
      throw new FsError('EPROTO', `the kernel speaks FUSE ${major}.${minor}; strata needs 7.${MIN_MINOR} or later`)
    }
    this.minor = Math.min(minor, OUR_MINOR)
    // flags2 (7.36+) is there when the kernel says so with INIT_EXT.
    const offered2 = (offered & Init.INIT_EXT) !== 0 && body.length >= 20 ? v.getUint32(16, true) : 0
    const wanted = Init.ASYNC_READ | Init.PARALLEL_DIROPS | Init.MAX_PAGES | Init.CACHE_SYMLINKS | Init.INIT_EXT
    const wanted2 = this.#init.passthrough === true ? Init2.PASSTHROUGH : 0
    const agreed2 = (offered2 & wanted2) >>> 0
    this.passthrough = (agreed2 & Init2.PASSTHROUGH) !== 0
    this.resend = (offered2 & Init2.HAS_RESEND) !== 0
    const { bytes, v: out } = message(64)
    const at = OUT_HEADER
    out.setUint32(at, KERNEL_MAJOR, true)
    out.setUint32(at + 4, this.minor, true)
    out.setUint32(at + 8, maxReadahead, true)
    out.setUint32(at + 12, (offered & wanted) >>> 0, true)
    out.setUint32(at + 32, agreed2, true) // flags2
    // max_stack_depth: backing files live on a file system that stacks on nothing (the store's, e.g. ext4),
    // so that an overlay (a writable mount) can still go on top of this one.
    if (this.passthrough) out.setUint32(at + 36, 1, true)
    out.setUint16(at + 16, 64, true) // max_background: reads the kernel may have outstanding at once
    out.setUint16(at + 18, 48, true) // congestion_threshold
    out.setUint32(at + 20, 128 * 1024, true) // max_write (nothing is written; the kernel wants a value)
    out.setUint32(at + 24, 1, true) // time_gran: nanoseconds
    out.setUint16(at + 28, Math.ceil(this.#init.maxRead / PAGE), true) // max_pages
    return bytes
  }

  #lookup(parent: number, name: string): Uint8Array {
    const dir = this.#path(parent)
    const path = dir === '/' ? `/${name}` : `${dir}/${name}`
    const { bytes, v } = message(40 + ATTR)
    const t = this.#init.cacheTimeout
    let stat: Stat
    try {
      stat = this.#ops.getattr(path)
    } catch (err) {
      if (!(err instanceof FsError && err.code === 'ENOENT')) throw err
      // Node id 0 with a timeout: the kernel remembers the miss for that long (the image never changes).
      setSeconds(v, OUT_HEADER + 16, t)
      return bytes
    }
    this.#paths.set(stat.ino, path)
    v.setBigUint64(OUT_HEADER, BigInt(stat.ino), true)
    setSeconds(v, OUT_HEADER + 16, t) // entry_valid
    v.setBigUint64(OUT_HEADER + 24, BigInt(t), true) // attr_valid
    writeAttr(v, OUT_HEADER + 40, stat)
    return bytes
  }

  /** `.`, `..` and the children of a directory, with their inode numbers and types, fixed at OPENDIR. */
  #listing(nodeid: number): DirEntry[] {
    const path = this.#path(nodeid)
    const names = this.#ops.readdir(path)
    const self = this.#ops.getattr(path)
    const parent = path === '/' ? self : this.#ops.getattr(path.slice(0, path.lastIndexOf('/')) || '/')
    const entries: DirEntry[] = [
      { name: Buffer.from('.'), ino: self.ino, type: direntType(self) },
      { name: Buffer.from('..'), ino: parent.ino, type: direntType(parent) }
    ]
    for (const name of names) {
      const s = this.#ops.getattr(path === '/' ? `/${name}` : `${path}/${name}`)
      entries.push({ name: Buffer.from(name), ino: s.ino, type: direntType(s) })
    }
    return entries
  }

  #readdir(nodeid: number, body: Uint8Array): Uint8Array {
    const v = view(body)
    const handle = v.getBigUint64(0, true)
    let open = this.#dirs.get(handle)
    if (open?.nodeid !== nodeid) {
      // Opened while another process served this connection (p2pd restarted): the image has not changed, so
      // the listing is the one that process had.
      open = { nodeid, entries: this.#listing(nodeid) }
      this.#dirs.set(handle, open)
    }
    const entries = open.entries
    const start = Number(v.getBigUint64(8, true))
    const size = v.getUint32(16, true)
    let used = 0
    let end = start
    while (end < entries.length && used + direntSize(entries[end]!) <= size) used += direntSize(entries[end++]!)
    const { bytes, v: out } = message(used)
    let at = OUT_HEADER
    for (let i = start; i < end; i++) {
      const e = entries[i]!
      out.setBigUint64(at, BigInt(e.ino), true)
      out.setBigUint64(at + 8, BigInt(i + 1), true) // the offset of the next entry
      out.setUint32(at + 16, e.name.length, true)
      out.setUint32(at + 20, e.type, true)
      bytes.set(e.name, at + 24)
      at += direntSize(e)
    }
    return bytes
  }
}

/** DT_* of a dirent: the file-type bits of the mode. */
function direntType(s: Stat): number {
  return (s.mode >>> 12) & 0xf
}

function direntSize(e: DirEntry): number {
  return (24 + e.name.length + 7) & ~7
}

function openReply(handle: bigint, flags: number): Uint8Array {
  const { bytes, v } = message(16)
  v.setBigUint64(OUT_HEADER, handle, true)
  v.setUint32(OUT_HEADER + 8, flags, true)
  return bytes
}

/** GETXATTR/LISTXATTR: with size 0 the kernel asks how large the value is; else it must fit. */
export function sized(value: Uint8Array, size: number): Uint8Array {
  if (size === 0) {
    const { bytes, v } = message(8)
    v.setUint32(OUT_HEADER, value.length, true)
    return bytes
  }
  if (value.length > size) throw new FsError('ERANGE', `the value is ${value.length} bytes, the buffer ${size}`)
  const { bytes } = message(value.length)
  bytes.set(value, OUT_HEADER)
  return bytes
}

function setSeconds(v: DataView, at: number, seconds: number): void {
  v.setBigUint64(at, BigInt(seconds), true)
}

/** struct fuse_attr. Times are signed seconds plus nanoseconds: a time before 1970 stays what it was. */
export function writeAttr(v: DataView, at: number, s: Stat): void {
  const sec = Math.floor(s.mtimeMs / 1000)
  const nsec = Math.round((s.mtimeMs - sec * 1000) * 1e6)
  v.setBigUint64(at, BigInt(s.ino), true)
  v.setBigUint64(at + 8, BigInt(s.size), true)
  v.setBigUint64(at + 16, BigInt(s.blocks), true)
  for (const t of [24, 32, 40]) v.setBigInt64(at + t, BigInt(sec), true)
  for (const t of [48, 52, 56]) v.setUint32(at + t, nsec, true)
  v.setUint32(at + 60, s.mode, true)
  v.setUint32(at + 64, s.nlink, true)
  v.setUint32(at + 68, s.uid, true)
  v.setUint32(at + 72, s.gid, true)
  v.setUint32(at + 76, s.rdev >>> 0, true)
  v.setUint32(at + 80, s.blksize, true)
}
