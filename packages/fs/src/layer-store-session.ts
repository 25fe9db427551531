// The layer store's FUSE side (see layer-store.ts): its own session, not protocol.ts's, answering the kernel's
// requests from the store's file system (layer-store-fs.ts); requests through fuse.ts's relay, replies to /dev/fuse.
import { close, write } from 'node:fs'
import { constants } from 'node:os'
import { FsError, UnmountError } from './errors.js'
import { isMounted, lazyUnmount, MAX_READ } from './fuse-mount.js'
import { Relay } from './fuse-relay.js'
import type { StoreFs } from './layer-store-fs.js'
import type { StoreLayer } from './layer-store-types.js'
import type { Stat } from './operations.js'
// The reply encoders are protocol.ts's: this session answers other requests, in the same wire format.
import {
  cString,
  frame,
  message,
  Op,
  OUT_HEADER,
  parseRequest,
  type Request,
  sized,
  view,
  writeAttr
} from './protocol.js'

const ATTR = 88
const Init = { ASYNC_READ: 1 << 0, PARALLEL_DIROPS: 1 << 18, MAX_PAGES: 1 << 22, CACHE_SYMLINKS: 1 << 23 }
const FOPEN_KEEP_CACHE = 1 << 1
const UNANSWERED = new Set<number>([Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT])

/** Answers the kernel's requests for one store. Every answer may wait (a lookup opens an image). */
class StoreSession<L extends StoreLayer> {
  readonly #fs: StoreFs<L>
  readonly #dirs = new Map<bigint, { name: Buffer; id: number; type: number }[]>()
  #nextHandle = 1n
  minor = 0

  constructor(fs: StoreFs<L>) {
    this.#fs = fs
  }

  async answer(req: Request, signal: AbortSignal): Promise<Uint8Array | undefined> {
    if (UNANSWERED.has(req.opcode)) return undefined
    try {
      return frame(await this.#answer(req, signal), req.unique, 0)
    } catch (err) {
      const errno = err instanceof FsError ? err.errno : constants.errno.EIO
      return frame(new Uint8Array(OUT_HEADER), req.unique, errno)
    }
  }

  async #answer(req: Request, signal: AbortSignal): Promise<Uint8Array> {
    const { body, nodeid } = req
    const fs = this.#fs
    switch (req.opcode) {
      case Op.INIT:
        return this.#handshake(body)
      case Op.LOOKUP: {
        const id = await fs.lookup(nodeid, cString(body), signal)
        if (id === undefined) throw new FsError('ENOENT', 'no such entry')
        const t = fs.entryTimeout(id)
        const { bytes, v } = message(40 + ATTR)
        v.setBigUint64(OUT_HEADER, BigInt(id), true)
        v.setBigUint64(OUT_HEADER + 16, BigInt(t), true)
        v.setBigUint64(OUT_HEADER + 24, BigInt(t), true)
        writeAttr(v, OUT_HEADER + 40, fs.attr(id))
        return bytes
      }
      case Op.GETATTR: {
        const { bytes, v } = message(16 + ATTR)
        v.setBigUint64(OUT_HEADER, BigInt(fs.entryTimeout(nodeid)), true)
        writeAttr(v, OUT_HEADER + 16, fs.attr(nodeid))
        return bytes
      }
      case Op.READLINK: {
        const target = Buffer.from(fs.readlink(nodeid))
        const { bytes } = message(target.length)
        bytes.set(target, OUT_HEADER)
        return bytes
      }
      case Op.OPEN: {
        fs.open(nodeid, view(body).getUint32(0, true))
        const { bytes, v } = message(16)
        v.setUint32(OUT_HEADER + 8, FOPEN_KEEP_CACHE, true)
        return bytes
      }
      case Op.READ: {
        const v = view(body)
        const offset = Number(v.getBigUint64(8, true))
        const size = Math.min(v.getUint32(16, true), MAX_READ)
        const out = new Uint8Array(OUT_HEADER + size)
        const n = await fs.read(nodeid, offset, out.subarray(OUT_HEADER), signal)
        return out.subarray(0, OUT_HEADER + n)
      }
      case Op.OPENDIR: {
        const self = fs.attr(nodeid)
        const parent = fs.attr(fs.parentOf(nodeid))
        const type = (s: Stat) => (s.mode >>> 12) & 0xf
        const entries = [
          { name: Buffer.from('.'), id: nodeid, type: type(self) },
          { name: Buffer.from('..'), id: parent.ino, type: type(parent) },
          ...fs.list(nodeid).map((e) => ({ name: Buffer.from(e.name), id: e.id, type: type(fs.attr(e.id)) }))
        ]
        const handle = this.#nextHandle++
        this.#dirs.set(handle, entries)
        const { bytes, v } = message(16)
        v.setBigUint64(OUT_HEADER, handle, true)
        return bytes
      }
      case Op.READDIR:
        return this.#readdir(body)
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
        const { bytes, v } = message(80)
        v.setUint32(OUT_HEADER + 40, 4096, true) // bsize
        v.setUint32(OUT_HEADER + 44, 255, true) // namelen
        v.setUint32(OUT_HEADER + 48, 4096, true) // frsize
        return bytes
      }
      case Op.GETXATTR:
        return sized(fs.getxattr(nodeid, cString(body, 8)), view(body).getUint32(0, true))
      case Op.LISTXATTR: {
        const names = Buffer.from(
          fs
            .listxattr(nodeid)
            .map((n) => `${n}\0`)
            .join('')
        )
        return sized(names, view(body).getUint32(0, true))
      }
      case Op.ACCESS:
        fs.access(nodeid, view(body).getUint32(0, true))
        return message(0).bytes
      case Op.CREATE:
        // fuse_create_in is 16 bytes, then the name.
        return fs.create(nodeid, cString(body, 16))
      case Op.UNLINK:
        fs.unlink(nodeid, cString(body))
        return message(0).bytes
      case Op.RMDIR:
        return fs.rmdir(nodeid, cString(body))
      case Op.SETATTR:
      case Op.SYMLINK:
      case Op.MKNOD:
      case Op.MKDIR:
      case Op.RENAME:
      case Op.RENAME2:
      case Op.LINK:
      case Op.WRITE:
      case Op.SETXATTR:
      case Op.REMOVEXATTR:
      case Op.FALLOCATE:
      case Op.COPY_FILE_RANGE:
      case Op.TMPFILE:
        throw new FsError('EROFS', 'the layer store is read-only')
      default:
        throw new FsError('ENOSYS', `request ${req.opcode} is not implemented`)
    }
  }

  #handshake(body: Uint8Array): Uint8Array {
    const v = view(body)
    const major = v.getUint32(0, true)
    const minor = v.getUint32(4, true)
    if (major !== 7 || minor < 28) throw new FsError('EPROTO', `the kernel speaks FUSE ${major}.${minor}`)
    this.minor = Math.min(minor, 31)
    const wanted = Init.ASYNC_READ | Init.PARALLEL_DIROPS | Init.MAX_PAGES | Init.CACHE_SYMLINKS
    const { bytes, v: out } = message(64)
    const at = OUT_HEADER
    out.setUint32(at, 7, true)
    out.setUint32(at + 4, this.minor, true)
    out.setUint32(at + 8, v.getUint32(8, true), true) // max_readahead: what the kernel offers
    out.setUint32(at + 12, (v.getUint32(12, true) & wanted) >>> 0, true)
    out.setUint16(at + 16, 64, true) // max_background
    out.setUint16(at + 18, 48, true) // congestion_threshold
    out.setUint32(at + 20, 128 * 1024, true) // max_write (nothing is written)
    out.setUint32(at + 24, 1, true) // time_gran
    out.setUint16(at + 28, MAX_READ / 4096, true) // max_pages
    return bytes
  }

  #readdir(body: Uint8Array): Uint8Array {
    const v = view(body)
    const entries = this.#dirs.get(v.getBigUint64(0, true))
    if (entries === undefined) throw new FsError('EBADF', 'unknown directory handle')
    const start = Number(v.getBigUint64(8, true))
    const size = v.getUint32(16, true)
    const direntSize = (e: { name: Buffer }) => (24 + e.name.length + 7) & ~7
    let used = 0
    let end = start
    while (end < entries.length && used + direntSize(entries[end]!) <= size) used += direntSize(entries[end++]!)
    const { bytes, v: out } = message(used)
    let at = OUT_HEADER
    for (let i = start; i < end; i++) {
      const e = entries[i]!
      out.setBigUint64(at, BigInt(e.id), true)
      out.setBigUint64(at + 8, BigInt(i + 1), true)
      out.setUint32(at + 16, e.name.length, true)
      out.setUint32(at + 20, e.type, true)
      bytes.set(e.name, at + 24)
      at += direntSize(e)
    }
    return bytes
  }
}

/** The store's FUSE connection: requests through fuse.ts's relay, replies written to /dev/fuse here. */
export class StoreConnection<L extends StoreLayer> {
  readonly #fd: number
  readonly #relay: Relay
  readonly #session: StoreSession<L>
  readonly #inflight = new AbortController()
  readonly #writes = new Set<Promise<void>>()
  readonly #debug: boolean
  readonly #init = Promise.withResolvers<void>()
  #closed = false
  #ended: Promise<void> | undefined

  constructor(fd: number, fs: StoreFs<L>, debug: boolean) {
    this.#fd = fd
    this.#debug = debug
    this.#session = new StoreSession(fs)
    this.#init.promise.catch(() => {})
    this.#relay = new Relay(fd, (bytes) => this.#dispatch(bytes))
    this.#relay.ended.then((stderr) => {
      this.#init.reject(new Error(`the FUSE connection ended before it started${stderr ? `: ${stderr}` : ''}`))
      return this.#end()
    })
  }

  async started(mountpoint: string, timeoutMs: number): Promise<void> {
    const timer = setTimeout(
      () => this.#init.reject(new Error(`the layer store on ${mountpoint} did not start within ${timeoutMs} ms`)),
      timeoutMs
    )
    try {
      await this.#init.promise
    } finally {
      clearTimeout(timer)
    }
  }

  #dispatch(bytes: Buffer): void {
    // Each message is a buffer of its own (the relay reuses none), so it may wait for a lookup.
    const req = parseRequest(bytes)
    if (this.#debug) process.stderr.write(`layer store: #${req.unique} op ${req.opcode} node ${req.nodeid}\n`)
    void this.#session.answer(req, this.#inflight.signal).then((reply) => {
      if (reply !== undefined) this.#write(reply)
      if (req.opcode === Op.INIT) {
        if (this.#session.minor > 0) this.#init.resolve()
        else this.#init.reject(new Error('the kernel refused the FUSE protocol version'))
      }
    })
  }

  #write(reply: Uint8Array): void {
    if (this.#closed) return
    const done = new Promise<void>((resolve) => write(this.#fd, reply, 0, reply.length, null, () => resolve()))
    this.#writes.add(done)
    done.finally(() => this.#writes.delete(done))
  }

  async close(mountpoint: string): Promise<void> {
    this.#inflight.abort(new Error(`${mountpoint} is being unmounted`))
    const failure = await lazyUnmount(mountpoint)
    this.#relay.kill()
    await this.#end()
    if (failure !== undefined && (await isMounted(mountpoint))) {
      throw new UnmountError(mountpoint, failure, `try 'umount -l ${mountpoint}'`)
    }
  }

  #end(): Promise<void> {
    this.#ended ??= (async () => {
      await this.#relay.ended
      this.#closed = true
      this.#inflight.abort(new Error('the FUSE connection ended'))
      await Promise.allSettled(this.#writes)
      await new Promise<void>((resolve) => close(this.#fd, () => resolve()))
    })()
    return this.#ended
  }
}
