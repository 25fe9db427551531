// The FUSE transport: mounts /dev/fuse with mount(8) and speaks the kernel protocol (protocol.ts) over it.
// No libfuse: its version 2 (all a Node binding offered) caps reads at 128 KiB; the protocol lets us ask for
// 1 MiB. Requests are relayed from /dev/fuse into a pipe by a `dd` child, because a read of /dev/fuse blocks and
// Node can only wait on a pipe without tying up one of its few I/O threads; replies are written to /dev/fuse
// directly. Everything here runs on the event loop: nothing may block (no sync I/O, no execSync).
import { type ChildProcess, execFile, spawn } from 'node:child_process'
import { close, open, write } from 'node:fs'
import { open as openFile, readFile, stat, writeFile } from 'node:fs/promises'
import { resolve } from 'node:path'
import { promisify } from 'node:util'
import type { AbortOptions } from '@strata/base'
import { backingClose, backingOpen } from '@strata/native'
import { MountError, UnmountError } from './errors.js'
import { type HeldDirectory, holdMountpoint } from './mountpoint.js'
import type { Operations } from './operations.js'
import { IN_HEADER, Op, OUT_HEADER, parseRequest, type Request, Session } from './protocol.js'

export interface FuseMountInit {
  /** Let users other than the mounting one read the mount (default: when running as root). */
  allowOther?: boolean
  /** Seconds the kernel may cache attributes, entries and misses (default: a day; the image is immutable). */
  cacheTimeout?: number
  /** How long mounting may take before it is abandoned (default 30 s). */
  timeoutMs?: number
  /** Each FUSE request, one line on stderr. */
  debug?: boolean
  /**
   * Open files held whole in the store with FUSE passthrough, where the kernel offers it (default true): the
   * kernel then reads the chunk file itself.
   */
  passthrough?: boolean
}

/** A live FUSE mount. */
export interface Mount {
  readonly mountpoint: string
  /**
   * How reads of files held whole in the store are served: `passthrough` (the kernel reads the chunk file),
   * `off` (every read is a request), or `unknown` (served again after a restart, before its first such open).
   * `backingFiles`: files registered with the connection now.
   */
  fuse?(): { mode: 'passthrough' | 'off' | 'unknown'; backingFiles: number }
  /** Unmounts (lazily, so a busy mount goes too) and aborts reads in flight. */
  unmount(options?: AbortOptions): Promise<void>
}

const exec = promisify(execFile)

/** Largest read the kernel may ask for at once: 256 pages (the kernel's own limit for max_pages). */
export const MAX_READ = 1 << 20
/** The relay's read buffer: larger than any request the kernel sends a read-only mount (the kernel checks). */
export const RELAY_BUFFER = 1 << 20
/** Kernel read-ahead on the mount, so that a sequential reader gets MAX_READ requests (default 128 KiB). */
const READ_AHEAD_KB = 4096

/**
 * Mounts `ops` at `mountpoint` read-only with FUSE: a directory held open since it was checked (see
 * holdMountpoint), or a path, which must then be a directory (no further checks: strata's own directories). Kernel page cache stays on (FOPEN_KEEP_CACHE) and
 * attributes, entries and misses are cached long: an image never changes under a mount. Needs root.
 */
export async function mountFuse(
  ops: Operations,
  mountpoint: string | HeldDirectory,
  init: FuseMountInit = {},
  options?: AbortOptions
): Promise<Mount> {
  if (typeof mountpoint !== 'string') return mountHeld(ops, mountpoint, init, options)
  const target = await holdMountpoint(mountpoint)
  try {
    return await mountHeld(ops, target, init, options)
  } finally {
    await target.close()
  }
}

async function mountHeld(ops: Operations, target: HeldDirectory, init: FuseMountInit, options?: AbortOptions) {
  const mountpoint = target.path
  await refuseMounted(mountpoint)
  const fd = await mountDevice(mountpoint, target.handle.fd, init.allowOther)
  const connection = new Connection(fd, ops, {
    cacheTimeout: init.cacheTimeout ?? DAY,
    debug: init.debug === true,
    ...(init.passthrough !== undefined && { passthrough: init.passthrough })
  })
  try {
    await connection.responder.started(mountpoint, init.timeoutMs ?? 30_000, options?.signal)
    await setReadAhead(mountpoint)
  } catch (err) {
    await connection.close(mountpoint)
    throw err
  }
  let unmounted: Promise<void> | undefined
  return {
    mountpoint,
    fuse: () => connection.responder.fuse(),
    unmount() {
      unmounted ??= connection.close(mountpoint)
      return unmounted
    }
  }
}

const DAY = 86_400

/** A mount there would hide another (or a dead one, which the user should clean up knowingly). */
export async function refuseMounted(mountpoint: string): Promise<void> {
  if (await isMounted(mountpoint)) {
    throw new MountError(
      mountpoint,
      'something is mounted there already',
      `unmount it first ('p2p-mount --unmount ${mountpoint}' if it is a p2p-mount that died)`
    )
  }
}

/**
 * Opens /dev/fuse and mounts it read-only on the directory open as `dirFd` in this process (`mountpoint` is its
 * name, for messages). Returns the /dev/fuse descriptor of the new connection, whose INIT is still to be read.
 */
export async function mountDevice(mountpoint: string, dirFd: number, allowOther?: boolean): Promise<number> {
  const fd = await new Promise<number>((resolve, reject) =>
    open('/dev/fuse', 'r+', (err, fd) => (err === null ? resolve(fd) : reject(err)))
  ).catch((err: NodeJS.ErrnoException) => {
    const hint = err.code === 'ENOENT' ? 'load the fuse module (modprobe fuse)' : 'mounting needs root: run it as root'
    throw new MountError(mountpoint, `cannot open /dev/fuse (${err.code})`, hint, { cause: err })
  })
  const uid = process.getuid?.() ?? 0
  const data = [
    'ro',
    'nosuid',
    'nodev',
    'fd=3',
    'rootmode=40000',
    `user_id=${uid}`,
    `group_id=${process.getgid?.() ?? 0}`,
    'default_permissions',
    `max_read=${MAX_READ}`
  ]
  if (allowOther ?? uid === 0) data.push('allow_other')
  try {
    // The target is the directory held open since it was checked (fd 4), not its path, which could have changed.
    const args = ['-i', '-n', '-c', '-t', 'fuse.strata', '-o', data.join(','), 'strata', '/proc/self/fd/4']
    await withFds([fd, dirFd], 'mount', args)
  } catch (err) {
    close(fd, () => {})
    throw new MountError(
      mountpoint,
      (err as Error).message,
      uid === 0 ? 'check `dmesg` for FUSE errors' : 'mounting needs root: run it as root',
      { cause: err }
    )
  }
  return fd
}

/**
 * Splits a byte stream into FUSE messages, each of which starts with its length (u32): requests from the relay's
 * pipe, replies and requests on a holder's socket. A message split over reads is put together in a buffer of
 * its size; one whole in a read is passed on as a view of it.
 */
export class MessageStream {
  readonly #min: number
  readonly #max: number
  readonly #onMessage: (message: Buffer) => void
  readonly #head = Buffer.alloc(4)
  #headBytes = 0
  #partial: Buffer | undefined
  #have = 0
  #broken = false
  readonly #scratch: Buffer | undefined

  /**
   * `onBroken` hears of a length outside [min, max]: the stream is not FUSE messages; nothing more is read.
   * `reuse`: messages are put together in one buffer, used again for the next: a message is valid only until
   * `onMessage` returns (the holder, which writes each reply at once, allocates nothing per reply).
   */
  constructor(
    min: number,
    max: number,
    onMessage: (message: Buffer) => void,
    readonly onBroken: () => void,
    reuse = false
  ) {
    this.#min = min
    this.#max = max
    this.#onMessage = onMessage
    if (reuse) this.#scratch = Buffer.allocUnsafeSlow(max)
  }

  #buffer(len: number): Buffer {
    return this.#scratch?.subarray(0, len) ?? Buffer.allocUnsafe(len)
  }

  /** Whether part of a message is waiting for the rest. */
  get midway(): boolean {
    return this.#partial !== undefined || this.#headBytes > 0
  }

  push(data: Buffer): void {
    let at = 0
    while (at < data.length && !this.#broken) {
      if (this.#partial !== undefined) {
        const n = Math.min(this.#partial.length - this.#have, data.length - at)
        data.copy(this.#partial, this.#have, at, at + n)
        this.#have += n
        at += n
        if (this.#have === this.#partial.length) {
          const message = this.#partial
          this.#partial = undefined
          this.#onMessage(message)
        }
        continue
      }
      let len: number
      if (this.#headBytes > 0 || data.length - at < 4) {
        const n = Math.min(4 - this.#headBytes, data.length - at)
        data.copy(this.#head, this.#headBytes, at, at + n)
        this.#headBytes += n
        at += n
        if (this.#headBytes < 4) return
        this.#headBytes = 0
        len = this.#head.readUInt32LE(0)
        if (!this.#check(len)) return
        this.#partial = this.#buffer(len)
        this.#head.copy(this.#partial)
        this.#have = 4
        continue
      }
      len = data.readUInt32LE(at)
      if (!this.#check(len)) return
      if (data.length - at >= len) {
        this.#onMessage(data.subarray(at, at + len))
        at += len
        continue
      }
      this.#partial = this.#buffer(len)
      this.#have = data.copy(this.#partial, 0, at)
      at = data.length
    }
  }

  #check(len: number): boolean {
    if (len >= this.#min && len <= this.#max) return true
    this.#broken = true
    this.onBroken()
    return false
  }
}

/**
 * The `dd` child that reads requests from /dev/fuse into a pipe (a read of /dev/fuse blocks; Node waits on a
 * pipe without tying up one of its I/O threads), and the requests it brings, one message each. `setpriv
 * --pdeathsig` makes it die with this process: a dead server leaves a mount that says "not connected".
 */
export class Relay {
  readonly #child: ChildProcess
  /** When the relay has exited (the connection ended, or it was killed): with what it said on stderr. */
  readonly ended: Promise<string>

  constructor(fd: number, onRequest: (request: Buffer) => void) {
    this.#child = spawn('setpriv', ['--pdeathsig', 'KILL', '--', 'dd', `bs=${RELAY_BUFFER}`, 'status=none'], {
      stdio: [fd, 'pipe', 'pipe']
    })
    let stderr = ''
    this.#child.stderr!.on('data', (d) => {
      stderr += d
    })
    // Not a FUSE request: the stream is broken. Stop rather than guess.
    const requests = new MessageStream(IN_HEADER, RELAY_BUFFER, onRequest, () => this.kill())
    this.#child.stdout!.on('data', (d: Buffer) => requests.push(d))
    // A broken pipe ends the relay, and with it the connection; it must not end the process.
    this.#child.stdout!.on('error', () => this.kill())
    this.#child.stderr!.on('error', () => {})
    this.ended = new Promise((resolve) => {
      this.#child.on('error', (err) => resolve(err.message))
      this.#child.on('close', () => resolve(stderr.trim()))
    })
  }

  kill(): void {
    this.#child.kill('SIGKILL')
  }
}

export interface ResponderInit {
  cacheTimeout: number
  debug: boolean
  /**
   * The /dev/fuse descriptor replies go to, when this process has one (not through the holder's relay): then
   * files held whole in the store are opened with FUSE passthrough (unless `passthrough` is false).
   */
  fuseFd?: number
  passthrough?: boolean
  /** Where the opens of passthrough candidates are kept for the next process that serves the connection. */
  openLog?: OpenLog
}

/**
 * How the files that could be opened with passthrough are open, kept outside the process: the kernel refuses an
 * open of a file in another mode than its other opens (EIO), so the next process serving the connection (p2pd
 * restarted) must answer each such file as the last one did. `opened` is awaited before the OPEN reply,
 * `released` before the backing id is closed.
 */
export interface OpenLog {
  /** `backingId` undefined: opened without passthrough. */
  opened(nodeid: number, backingId: number | undefined): Promise<void>
  released(nodeid: number): Promise<void>
}

/** The open files of one node that could be opened with passthrough: all in one mode, one backing id. */
interface NodeOpens {
  /** The backing id they share (undefined: opened without passthrough). */
  id: Promise<number | undefined>
  opens: number
  /** Opened by an earlier process: how many are open is not known, so it stays as it is. */
  pinned: boolean
  /** The backing id is known and registered. */
  registered?: boolean
}

/**
 * The file system side of a FUSE connection: answers each request with the operations and hands the reply to
 * `send` (to /dev/fuse, or to the holder that writes it there). Reads run concurrently, each into a reply buffer
 * of its own, reused once sent.
 */
export class Responder {
  readonly #session: Session
  readonly #send: (reply: Uint8Array) => Promise<void>
  readonly #inflight = new AbortController()
  readonly #spare: Buffer[] = []
  readonly #debug: boolean
  readonly #init = Promise.withResolvers<void>()
  readonly #ops: Operations
  readonly #fuseFd: number | undefined
  readonly #openLog: OpenLog | undefined
  /** Passthrough candidates that are open, by node id. */
  readonly #nodes = new Map<number, NodeOpens>()
  /** Backing ids being closed, by node id: a new open of the node waits for it. */
  readonly #closing = new Map<number, Promise<void>>()
  /** Registering or closing backing files: waited for before the descriptor closes. */
  readonly #backingWork = new Set<Promise<unknown>>()
  /** The connection refused a backing file (no passthrough agreed, a file system too deep): none are tried. */
  #noBacking: string | undefined
  #ended = false
  #stopped = false

  constructor(ops: Operations, init: ResponderInit, send: (reply: Uint8Array) => Promise<void>) {
    const passthrough = init.fuseFd !== undefined && ops.backingFile !== undefined && init.passthrough !== false
    this.#session = new Session(ops, { cacheTimeout: init.cacheTimeout, maxRead: MAX_READ, passthrough })
    this.#ops = ops
    this.#fuseFd = passthrough ? init.fuseFd : undefined
    this.#openLog = init.openLog
    this.#send = send
    this.#debug = init.debug
    this.#init.promise.catch(() => {})
  }

  /**
   * Whether opens pass through to the store's files: 'passthrough', 'off' (the kernel did not offer it, or it
   * was not asked for), or undefined before INIT in a process that did not see it (a p2pd serving a connection
   * again), where the first backing file registered tells.
   */
  get mode(): 'passthrough' | 'off' | undefined {
    if (this.#fuseFd === undefined || this.#noBacking !== undefined || this.#session.passthrough === false) return 'off'
    return this.#session.passthrough === true ? 'passthrough' : undefined
  }

  fuse(): { mode: 'passthrough' | 'off' | 'unknown'; backingFiles: number } {
    let backingFiles = 0
    for (const node of this.#nodes.values()) if (node.registered) backingFiles++
    return { mode: this.mode ?? 'unknown', backingFiles }
  }

  /** Takes over how an earlier process had the passthrough candidates open (see OpenLog). */
  adopt(opens: Map<number, number | undefined>): void {
    for (const [nodeid, id] of opens) {
      this.#nodes.set(nodeid, { id: Promise.resolve(id), opens: 0, pinned: true, registered: id !== undefined })
      if (id !== undefined) this.#session.passthrough ??= true
    }
  }

  /** Waits for the kernel's INIT to be answered. */
  async started(mountpoint: string, timeoutMs: number, signal?: AbortSignal): Promise<void> {
    const timer = setTimeout(() => {
      this.#init.reject(new MountError(mountpoint, `FUSE did not start within ${timeoutMs} ms`, 'check `dmesg`'))
    }, timeoutMs)
    const onAbort = () => this.#init.reject(signal?.reason)
    signal?.addEventListener('abort', onAbort, { once: true })
    try {
      await this.#init.promise
    } catch (err) {
      throw err instanceof MountError
        ? err
        : new MountError(mountpoint, (err as Error).message, 'check `dmesg` for FUSE errors', { cause: err })
    } finally {
      clearTimeout(timer)
      signal?.removeEventListener('abort', onAbort)
    }
  }

  /** The connection ended before INIT was answered. */
  failed(err: Error): void {
    this.#init.reject(err)
  }

  /**
   * Aborts the reads in flight. `answer`: their readers get EIO (the connection ends); else nothing more is
   * sent (the holder keeps the requests for the next process to answer).
   */
  stop(reason: Error, answer: boolean): void {
    if (!answer) this.#stopped = true
    this.#inflight.abort(reason)
  }

  dispatch(bytes: Buffer): void {
    const req = parseRequest(bytes)
    if (this.#debug) process.stderr.write(`fuse: #${req.unique} op ${req.opcode} node ${req.nodeid} ${describe(req)}\n`)
    if (req.opcode === Op.READ) {
      const into = this.#spare.pop() ?? Buffer.allocUnsafeSlow(OUT_HEADER + MAX_READ)
      this.#session.read(req, into, this.#inflight.signal).then((reply) =>
        this.#reply(reply).finally(() => {
          if (this.#spare.length < 16) this.#spare.push(into)
        })
      )
      return
    }
    // A node open already keeps its mode; a new one is looked at while passthrough may be on.
    if (req.opcode === Op.OPEN && this.#fuseFd !== undefined) {
      const candidate = this.#nodes.has(req.nodeid) || (this.mode !== 'off' && this.#candidate(req.nodeid))
      if (candidate) {
        void this.#open(req)
        return
      }
    }
    if (req.opcode === Op.RELEASE) this.#release(req.nodeid)
    const reply = this.#session.answer(req)
    if (reply !== undefined) this.#reply(reply)
    if (req.opcode === Op.INIT) {
      if (this.#session.minor > 0) this.#init.resolve()
      else this.#init.reject(new Error('the kernel refused the FUSE protocol version'))
    }
  }

  /**
   * Resolves once no backing file is being registered or closed: the descriptor can close. Nothing more is
   * registered or closed after (the connection's backing files go with it).
   */
  async released(): Promise<void> {
    this.#ended = true
    while (this.#backingWork.size > 0) await Promise.allSettled([...this.#backingWork])
  }

  #pending: Map<number, Promise<string | undefined>> = new Map()

  /** Whether the node is a file that could have a backing file (one chunk); starts looking for it. */
  #candidate(nodeid: number): boolean {
    const path = this.#session.pathOf(nodeid)
    if (path === undefined) return false
    const file = this.#ops.backingFile?.(path)
    if (file === undefined) return false
    file.catch(() => {})
    this.#pending.set(nodeid, file)
    return true
  }

  async #open(req: Request): Promise<void> {
    const nodeid = req.nodeid
    let node = this.#nodes.get(nodeid)
    if (node === undefined) {
      const file = this.#pending.get(nodeid)
      this.#pending.delete(nodeid)
      node = { id: this.#register(nodeid, file), opens: 0, pinned: false }
      this.#nodes.set(nodeid, node)
    }
    node.opens++
    const id = await node.id
    if (id !== undefined) {
      node.registered = true
      const path = this.#session.pathOf(nodeid)
      if (path !== undefined) this.#ops.passedThrough?.(path)
    }
    const reply = id === undefined ? this.#session.answer(req)! : this.#session.openPassthrough(req, id)
    // Refused (a write, a directory): not open.
    if (reply.length === OUT_HEADER) this.#release(nodeid)
    await this.#reply(reply)
  }

  /** Registers the node's verified file with the connection: its backing id, or undefined (a normal open). */
  #register(nodeid: number, file: Promise<string | undefined> | undefined): Promise<number | undefined> {
    const work = (async () => {
      await this.#closing.get(nodeid)
      let id: number | undefined
      const path = await file?.catch(() => undefined)
      if (path !== undefined && this.#noBacking === undefined && !this.#ended) {
        const fh = await openFile(path, 'r').catch(() => undefined)
        if (fh !== undefined) {
          try {
            if (!this.#ended) id = backingOpen(this.#fuseFd!, fh.fd)
            // Served again after a restart, this process did not see the INIT: the kernel just said.
            if (id !== undefined) this.#session.passthrough ??= true
          } catch (err) {
            const code = (err as NodeJS.ErrnoException).code
            // Out of descriptors is this moment's; anything else is the connection's (no passthrough agreed,
            // ELOOP: the store's file system stacks too deep): no more tries.
            if (code !== 'EMFILE' && code !== 'ENFILE' && code !== 'ENOMEM') this.#noBacking = code ?? 'error'
          } finally {
            // The connection keeps its own reference to the file.
            await fh.close()
          }
        }
      }
      await this.#openLog?.opened(nodeid, id).catch(() => {})
      return id
    })()
    this.#backingWork.add(work)
    work.finally(() => this.#backingWork.delete(work))
    return work
  }

  /** One open of the node less; the last closes its backing id. */
  #release(nodeid: number): void {
    const node = this.#nodes.get(nodeid)
    if (node === undefined || node.pinned) return
    if (--node.opens > 0) return
    this.#nodes.delete(nodeid)
    const work = (async () => {
      const id = await node.id
      await this.#openLog?.released(nodeid).catch(() => {})
      if (id !== undefined && !this.#ended) {
        try {
          backingClose(this.#fuseFd!, id)
        } catch {
          // The connection ended meanwhile: the id went with it.
        }
      }
    })()
    this.#closing.set(nodeid, work)
    this.#backingWork.add(work)
    work.finally(() => {
      this.#backingWork.delete(work)
      if (this.#closing.get(nodeid) === work) this.#closing.delete(nodeid)
    })
  }

  #reply(reply: Uint8Array): Promise<void> {
    return this.#stopped ? Promise.resolve() : this.#send(reply)
  }
}

export interface ConnectionInit {
  cacheTimeout: number
  debug: boolean
  /** The connection ended by itself (an unmount from outside, an abort), not by close or detach. */
  onEnded?: () => void
  /** Passthrough off (default on where the kernel offers it). */
  passthrough?: boolean
  openLog?: OpenLog
}

/**
 * One FUSE connection served in this process from its own /dev/fuse descriptor: the relay that brings requests,
 * the responder, the replies written to the descriptor. An embedded mount's, or p2pd's copy of one the session
 * holder keeps (held.ts), which it can also `detach` from, leaving the connection to the holder's descriptor.
 */
export class Connection {
  readonly #fd: number
  readonly #relay: Relay
  readonly #writes = new Set<Promise<void>>()
  readonly responder: Responder
  #closed = false
  #leaving = false
  #ended: Promise<void> | undefined

  constructor(fd: number, ops: Operations, init: ConnectionInit) {
    this.#fd = fd
    const responderInit: ResponderInit = { cacheTimeout: init.cacheTimeout, debug: init.debug, fuseFd: fd }
    if (init.passthrough !== undefined) responderInit.passthrough = init.passthrough
    if (init.openLog !== undefined) responderInit.openLog = init.openLog
    this.responder = new Responder(ops, responderInit, (reply) => this.#write(reply))
    this.#relay = new Relay(fd, (request) => this.responder.dispatch(request))
    // However the relay ends (an unmount, or killed by someone), the connection ends with it: readers of the
    // mount then get an error instead of waiting for answers nobody will read the requests for.
    this.#relay.ended.then((stderr) => {
      this.responder.failed(new Error(`the FUSE connection ended before it started${stderr ? `: ${stderr}` : ''}`))
      if (!this.#leaving) init.onEnded?.()
      return this.#end()
    })
  }

  /**
   * Detaches the mount (lazily: a busy mount goes too), aborts reads in flight, and ends the connection: with
   * the relay and this fd closed, the kernel fails whatever a process still holding a file of it asks.
   */
  async close(mountpoint: string): Promise<void> {
    this.#leaving = true
    this.responder.stop(new Error(`${mountpoint} is being unmounted`), true)
    const failure = await lazyUnmount(mountpoint)
    this.#relay.kill()
    await this.#end()
    if (failure !== undefined && (await isMounted(mountpoint))) {
      throw new UnmountError(mountpoint, failure, `try 'p2p-mount --unmount ${mountpoint}'`)
    }
  }

  /**
   * Stops serving without ending the connection (another descriptor of it, the holder's, keeps it): the reads in
   * flight get no answer, and the requests read and not answered stay with the kernel, which sends them again
   * to the next server when it asks (FUSE_NOTIFY_RESEND).
   */
  async detach(): Promise<void> {
    this.#leaving = true
    this.responder.stop(new Error('the mount is handed over to the next server'), false)
    this.#relay.kill()
    await this.#end()
  }

  /** Closes /dev/fuse once the relay is gone and no reply is being written (the fd number could be reused). */
  #end(): Promise<void> {
    this.#ended ??= (async () => {
      await this.#relay.ended
      this.#closed = true
      this.responder.stop(new Error('the FUSE connection ended'), true)
      await Promise.allSettled(this.#writes)
      await this.responder.released()
      await new Promise<void>((resolve) => close(this.#fd, () => resolve()))
    })()
    return this.#ended
  }

  #write(reply: Uint8Array): Promise<void> {
    if (this.#closed) return Promise.resolve()
    const done = new Promise<void>((resolve) => {
      // ENOENT: the request was interrupted meanwhile; ENODEV: the connection is gone. Nobody to tell either way.
      write(this.#fd, reply, 0, reply.length, null, () => resolve())
    })
    this.#writes.add(done)
    done.finally(() => this.#writes.delete(done))
    return done
  }
}

/** FUSE_NOTIFY_RESEND (protocol 7.40, Linux 6.9): the kernel queues again every request read and not answered. */
export const NOTIFY_RESEND = 7

/**
 * Asks the kernel to send again the requests of the connection of `fd` that were read and not answered (by a
 * server that died or detached): a notification, unique 0 and the code in the error field.
 */
export function notifyResend(fd: number): Promise<void> {
  const message = Buffer.alloc(OUT_HEADER)
  message.writeUInt32LE(OUT_HEADER, 0)
  message.writeInt32LE(NOTIFY_RESEND, 4)
  return new Promise((resolve, reject) =>
    write(fd, message, 0, message.length, null, (err) => (err === null ? resolve() : reject(err)))
  )
}

/** `umount -l` when something is mounted there; what went wrong, if anything. */
export async function lazyUnmount(mountpoint: string): Promise<string | undefined> {
  if (!(await isMounted(mountpoint))) return undefined
  try {
    await exec('umount', ['-l', mountpoint], { timeout: 30_000 })
    return undefined
  } catch (err) {
    return ((err as { stderr?: string }).stderr ?? String(err)).trim()
  }
}

/** The arguments worth a debug line: a read's offset and size, a looked-up name. */
function describe(req: Request): string {
  const body = Buffer.from(req.body.buffer, req.body.byteOffset, req.body.byteLength)
  if (req.opcode === Op.READ) return `offset ${body.readBigUInt64LE(8)} size ${body.readUInt32LE(16)}`
  if (req.opcode === Op.LOOKUP) return JSON.stringify(body.subarray(0, body.indexOf(0)).toString())
  return ''
}

/** Runs a command with `fds` as its fds 3, 4, ... (mount's `fd=3`, a held mountpoint). */
export function withFds(fds: number[], cmd: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe', ...fds] })
    let stderr = ''
    child.stderr!.on('data', (d) => {
      stderr += d
    })
    child.on('error', reject)
    child.on('close', (code) => {
      if (code === 0) resolve()
      else reject(new Error(stderr.trim().split('\n')[0] || `${cmd} exited with ${code}`))
    })
  })
}

/** Raises the kernel's read-ahead on the mount (its bdi), so sequential reads come in MAX_READ pieces. */
export async function setReadAhead(mountpoint: string): Promise<void> {
  const { dev } = await stat(mountpoint)
  const major = Number((BigInt(dev) >> 8n) & 0xfffn)
  const minor = Number((BigInt(dev) & 0xffn) | ((BigInt(dev) >> 12n) & ~0xffn))
  await writeFile(`/sys/class/bdi/${major}:${minor}/read_ahead_kb`, String(READ_AHEAD_KB)).catch(() => {})
}

/**
 * Removes a FUSE mount whose process died ("Transport endpoint is not connected"), lazily.
 * Returns false when nothing was mounted there.
 */
export async function forceUnmount(mountpoint: string, options?: AbortOptions): Promise<boolean> {
  const attempts: [string, string[]][] = [
    ['umount', ['-l', mountpoint]],
    ['fusermount3', ['-uz', mountpoint]]
  ]
  const failures: string[] = []
  for (const [cmd, args] of attempts) {
    if (!(await isMounted(mountpoint))) return failures.length > 0
    try {
      await exec(cmd, args, { timeout: 30_000, signal: options?.signal })
      return true
    } catch (err) {
      failures.push(`${cmd}: ${((err as { stderr?: string }).stderr ?? String(err)).trim()}`)
    }
  }
  if (!(await isMounted(mountpoint))) return true
  throw new UnmountError(mountpoint, failures.join('; '), 'run it as root, or as the user that mounted it')
}

/** Whether `mountpoint` is a mount point now (from /proc/self/mountinfo). */
export async function isMounted(mountpoint: string): Promise<boolean> {
  const target = resolve(mountpoint)
  const text = await readFile('/proc/self/mountinfo', 'utf8')
  return text.split('\n').some((line) => unescapeMountPath(line.split(' ')[4] ?? '') === target)
}

function unescapeMountPath(path: string): string {
  return path.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(Number.parseInt(oct, 8)))
}
