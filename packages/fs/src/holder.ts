// The FUSE session holder: a small process, started detached by p2pd, that keeps p2pd's FUSE connections (the
// /dev/fuse descriptors and their relays) alive while p2pd restarts, so that mounts (and the containers on them)
// survive a crash, a kill or an upgrade of p2pd.
//
// Two ways to serve a session. Direct (Linux 6.9+, `mount` with `direct: true`): the holder mounts and keeps the
// /dev/fuse descriptor, nothing more; p2pd takes its own copy of it (pidfd_getfd: opening /proc/PID/fd/N of
// /dev/fuse gives a new, unattached device) and serves it as an embedded mount does, and the next p2pd asks the
// kernel to resend what the last one left unanswered (FUSE_NOTIFY_RESEND). The relay (the fallback: older
// kernels, no right to take a descriptor): the holder reads each request (through the same `dd` relay as an
// embedded mount), passes it to the p2pd that serves the session over a Unix socket, and writes p2pd's replies to
// /dev/fuse. It keeps every request until its reply has been written: when p2pd goes away, the requests it had
// not answered (a read in progress) are sent again to the next p2pd that attaches, and so are those that came in
// between.
//
// Protocol. The holder listens on `holder.sock` in a directory only root can enter; a connection sends one JSON
// line, the holder answers one JSON line ({"ok": true, ...} or {"ok": false, "error": {...}}). To serve a
// session, p2pd listens on a socket of its own in that directory (`serve`) and names it with a random `token` in
// `mount` or `attach`: the holder connects there, sends {"token", "id", "pending"} on a line, and from then on
// the connection carries the session's FUSE messages, unframed (each starts with its length): requests from the
// holder, replies from p2pd. (The holder connects, rather than answering on its own socket, so that it can read
// replies straight into one buffer of its own: Node offers that to connecting sockets only. Measured: it halves
// what a reply costs the holder.) Requests:
//   {"op": "list"}     -> {"version", "pid", "features", "sessions": [{id, mountpoint, meta, pending, attached,
//                          direct?: {pid, fd}}]}
//   {"op": "mount", "mountpoint", "target", "allowOther", "meta", "serve", "token"}
//                         target: a path that opens the directory p2pd checked (its /proc/PID/fd/N)
//   {"op": "mount", "mountpoint", "target", "allowOther", "meta", "direct": true} -> {"id", "pid", "fd"}
//   {"op": "attach", "id", "serve", "token"}   a new attach takes the session from the connection that had it
//   {"op": "update", "id", "meta"}
//   {"op": "close", "id"}                      unmounts (lazily) and ends the session
// The holder exits when it holds no session and nobody is connected (after a few seconds).
import { close as closeFd, write, writeSync } from 'node:fs'
import { chmod, open, readlink, unlink } from 'node:fs/promises'
import { createConnection, createServer, type Socket } from 'node:net'
import { join } from 'node:path'
import { isMounted, lazyUnmount, MAX_READ, mountDevice, refuseMounted } from './fuse-mount.js'
import { Relay } from './fuse-relay.js'
import { Op, OUT_HEADER } from './protocol.js'

/** The version of the protocol above; a holder of another version is not spoken to. */
export const HOLDER_PROTOCOL = 1
export const HOLDER_SOCKET = 'holder.sock'
/**
 * What this holder does beyond protocol 1, in `list`: `direct`, sessions whose server reads and answers its own
 * copy of the descriptor (`mount` with `direct: true` answers the holder's pid and the descriptor's number).
 */
export const HOLDER_FEATURES = ['direct']
/** The largest JSON line either side sends (a session's meta is a few hundred bytes). */
export const MAX_LINE = 1 << 20

/** Requests the kernel wants no answer to: not kept. */
const UNANSWERED = new Set<number>([Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT])
const IDLE_EXIT_MS = 5000
/** How often sessions served directly are checked to be mounted still. */
const SWEEP_MS = 10_000

interface Session {
  readonly id: string
  readonly mountpoint: string
  meta: unknown
  readonly fd: number
  /**
   * The server reads and answers the connection itself, from its own copy of `fd` (pidfd_getfd): the holder
   * only keeps the descriptor open. Else the holder relays (below).
   */
  readonly direct: boolean
  relay?: Relay
  /** Requests read from /dev/fuse and not answered yet, in the order they came. */
  readonly pending: Map<bigint, Buffer>
  /** The p2pd connection that serves the session now. */
  client: Socket | undefined
  /** Replies being written to /dev/fuse. */
  readonly writes: Set<Promise<void>>
  closed: boolean
  ended?: Promise<void>
}

interface HolderRequest {
  op?: unknown
  id?: unknown
  mountpoint?: unknown
  target?: unknown
  allowOther?: unknown
  meta?: unknown
  serve?: unknown
  token?: unknown
  direct?: unknown
}

/** Runs the holder on `dir/holder.sock` until it holds nothing. */
export async function runHolder(dir: string): Promise<void> {
  const path = join(dir, HOLDER_SOCKET)
  const log = (message: string) =>
    process.stderr.write(`${new Date().toISOString()} holder ${process.pid}: ${message}\n`)
  // Losing the holder loses every mount: a bug in one request must not take the others down.
  process.on('uncaughtException', (err) => log(`uncaught: ${err.stack ?? err}`))
  process.on('unhandledRejection', (err) => log(`unhandled: ${(err as Error)?.stack ?? err}`))
  if (await answers(path)) {
    log(`another holder answers on ${path}`)
    return
  }
  const sessions = new Map<string, Session>()
  let connections = 0
  let nextId = 1
  let idle: NodeJS.Timeout | undefined
  const server = createServer({ pauseOnConnect: true }, (socket) => void serve(socket))

  const checkIdle = () => {
    clearTimeout(idle)
    if (sessions.size > 0 || connections > 0) return
    idle = setTimeout(() => {
      if (sessions.size > 0 || connections > 0) return
      log('no sessions left: exiting')
      // The socket file stays: the next holder replaces it (a name unlinked here could be a newer holder's).
      server.close()
      process.exit(0)
    }, IDLE_EXIT_MS)
  }

  const answer = (socket: Socket, reply: object) => socket.write(`${JSON.stringify(reply)}\n`)
  const refuse = (socket: Socket, err: unknown) => {
    const e = err as { name?: string; message?: string; hint?: string }
    answer(socket, {
      ok: false,
      error: { name: e?.name ?? 'Error', message: e?.message ?? String(err), hint: e?.hint }
    })
    socket.end()
  }

  async function serve(socket: Socket): Promise<void> {
    connections++
    clearTimeout(idle)
    socket.on('error', () => {})
    socket.once('close', () => {
      connections--
      checkIdle()
    })
    let line: { request: HolderRequest; rest: Buffer }
    try {
      line = await readLine(socket)
    } catch (err) {
      refuse(socket, err)
      return
    }
    const { request } = line
    try {
      switch (request.op) {
        case 'list':
          answer(socket, {
            ok: true,
            version: HOLDER_PROTOCOL,
            pid: process.pid,
            features: HOLDER_FEATURES,
            sessions: [...sessions.values()].map((s) => ({
              id: s.id,
              mountpoint: s.mountpoint,
              meta: s.meta,
              pending: s.pending.size,
              attached: s.client !== undefined,
              ...(s.direct && { direct: { pid: process.pid, fd: s.fd } })
            }))
          })
          socket.end()
          return
        case 'mount': {
          const s = await mount(request)
          answer(socket, { ok: true, id: s.id, ...(s.direct && { pid: process.pid, fd: s.fd }) })
          socket.end()
          return
        }
        case 'attach': {
          const s = session(request.id)
          await attach(s, request)
          answer(socket, { ok: true, id: s.id })
          socket.end()
          return
        }
        case 'update':
          session(request.id).meta = request.meta
          answer(socket, { ok: true })
          socket.end()
          return
        case 'close':
          await close(session(request.id))
          answer(socket, { ok: true })
          socket.end()
          return
        default:
          throw new Error(`unknown request ${JSON.stringify(request.op)}`)
      }
    } catch (err) {
      refuse(socket, err)
    }
  }

  function session(id: unknown): Session {
    const s = typeof id === 'string' ? sessions.get(id) : undefined
    if (s === undefined) throw Object.assign(new Error(`no session ${JSON.stringify(id)}`), { name: 'NoSuchSession' })
    return s
  }

  async function mount(request: HolderRequest): Promise<Session> {
    const { mountpoint, target } = request
    if (typeof mountpoint !== 'string' || typeof target !== 'string')
      throw new Error('mount needs mountpoint and target')
    // The directory p2pd checked and holds open, through its /proc/PID/fd/N: the very one, whatever its path now.
    const dir = await open(target, 'r')
    let fd: number
    try {
      const opened = await readlink(`/proc/self/fd/${dir.fd}`)
      if (opened !== mountpoint) throw new Error(`${target} is ${opened}, not ${mountpoint}`)
      if (!(await dir.stat()).isDirectory()) throw new Error(`${mountpoint} is not a directory`)
      await refuseMounted(mountpoint)
      fd = await mountDevice(mountpoint, dir.fd, request.allowOther === true ? true : undefined)
    } finally {
      await dir.close()
    }
    const s: Session = {
      id: String(nextId++),
      mountpoint,
      meta: request.meta,
      fd,
      direct: request.direct === true,
      pending: new Map(),
      client: undefined,
      writes: new Set(),
      closed: false
    }
    sessions.set(s.id, s)
    log(`session ${s.id}: mounted ${mountpoint}${s.direct ? ' (served from its own descriptor)' : ''}`)
    // Served directly: the server takes a copy of `fd` and reads the INIT itself; the holder keeps `fd` only.
    if (s.direct) return s
    try {
      // Attached before the relay starts: the kernel's INIT goes to this server.
      await attach(s, request)
    } catch (err) {
      sessions.delete(s.id)
      await lazyUnmount(mountpoint)
      await new Promise<void>((resolve) => closeFd(fd, () => resolve()))
      throw err
    }
    const relay = new Relay(fd, (req) => {
      if (s.closed) return
      if (!UNANSWERED.has(req.readUInt32LE(4))) s.pending.set(req.readBigUInt64LE(8), req)
      s.client?.write(req)
    })
    s.relay = relay
    s.ended = relay.ended.then(async (stderr) => {
      // The connection ended (unmounted, aborted) or the relay was killed: nothing can answer its requests now.
      s.closed = true
      s.pending.clear()
      sessions.delete(s.id)
      s.client?.destroy()
      s.client = undefined
      // The fd number could be reused: only once no reply is being written to it.
      await Promise.allSettled([...s.writes])
      await new Promise<void>((resolve) => closeFd(fd, () => resolve()))
      // ENODEV is how a read of /dev/fuse ends when the connection does (an unmount): not worth a word.
      const why = stderr === '' || /No such device/.test(stderr) ? '' : `: ${stderr}`
      log(`session ${s.id}: ended (${mountpoint})${why}`)
      checkIdle()
    })
    return s
  }

  /** Connects to the server's `serve` socket and hands it the session, with the requests still unanswered. */
  async function attach(s: Session, request: HolderRequest): Promise<void> {
    const { serve, token } = request
    if (typeof serve !== 'string' || typeof token !== 'string') throw new Error('attach needs serve and token')
    const replies = new Replies((reply, done) => {
      if (s.closed || s.client !== socket) return done()
      const unique = reply.readBigUInt64LE(8)
      if (reply.length <= BIG_REPLY) {
        // A small reply (an entry, attributes, a listing) at once: a trip through the thread pool would add a
        // wake-up to every metadata request, and the write only copies a few bytes into the waiting request.
        try {
          writeSync(s.fd, reply)
        } catch {
          // As below.
        }
        s.pending.delete(unique)
        return done()
      }
      const written = new Promise<void>((resolve) => {
        // ENOENT: the request was interrupted meanwhile; ENODEV: the connection is gone. Nobody to tell.
        write(s.fd, reply, 0, reply.length, null, () => {
          s.pending.delete(unique)
          done()
          resolve()
        })
      })
      s.writes.add(written)
      written.then(() => s.writes.delete(written))
    })
    const socket = createConnection({ path: serve, onread: replies.onread(() => socket.destroy()) })
    connections++
    socket.on('error', () => {})
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', () => resolve())
      socket.once('error', reject)
    })
    socket.once('close', () => {
      connections--
      if (s.client === socket) {
        s.client = undefined
        if (!s.closed) log(`session ${s.id}: its server went away with ${s.pending.size} requests unanswered; held`)
      }
      checkIdle()
    })
    const before = s.client
    s.client = socket
    before?.destroy()
    socket.write(`${JSON.stringify({ token, id: s.id, pending: s.pending.size })}\n`)
    for (const req of s.pending.values()) socket.write(req)
  }

  async function close(s: Session): Promise<void> {
    const failure = await lazyUnmount(s.mountpoint)
    if (s.direct) {
      if (!s.closed) {
        s.closed = true
        sessions.delete(s.id)
        await new Promise<void>((resolve) => closeFd(s.fd, () => resolve()))
        log(`session ${s.id}: ended (${s.mountpoint})`)
        checkIdle()
      }
      if (failure !== undefined && (await isMounted(s.mountpoint))) {
        throw Object.assign(new Error(failure), { name: 'UnmountError' })
      }
      return
    }
    s.relay?.kill()
    await s.ended
    if (failure !== undefined && (await isMounted(s.mountpoint))) {
      throw Object.assign(new Error(failure), { name: 'UnmountError' })
    }
  }

  // A session served directly has no reader here to see its connection end: one no longer mounted (unmounted
  // behind p2pd's back, or while no p2pd ran) is let go, so that the holder does not keep it, and live on, forever.
  const sweep = setInterval(async () => {
    for (const s of [...sessions.values()]) {
      if (s.direct && !s.closed && !(await isMounted(s.mountpoint).catch(() => true))) {
        log(`session ${s.id}: ${s.mountpoint} is no longer mounted`)
        await close(s).catch(() => {})
      }
    }
  }, SWEEP_MS)
  sweep.unref()
  await unlink(path).catch(() => {})
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(path, () => resolve())
  })
  await chmod(path, 0o600)
  log(`listening on ${path}`)
  checkIdle()
}

/**
 * The replies on a server's connection, read straight into buffers of their own (Node's `onread`): the header
 * first, then the rest into a buffer of the reply's size (1 MiB ones from a pool). No reply is copied in user
 * space, and each is written to /dev/fuse on the thread pool, several at once, as a server in process would.
 */
class Replies {
  readonly #header = Buffer.allocUnsafe(OUT_HEADER)
  readonly #pool: Buffer[] = []
  readonly #deliver: (reply: Buffer, done: () => void) => void
  #headerBytes = 0
  #reply: Buffer | undefined
  #have = 0

  constructor(deliver: (reply: Buffer, done: () => void) => void) {
    this.#deliver = deliver
  }

  onread(broken: () => void): { buffer: () => Uint8Array; callback: (n: number) => boolean } {
    return {
      buffer: () =>
        this.#reply === undefined
          ? this.#header.subarray(this.#headerBytes)
          : this.#reply.subarray(this.#have, this.#reply.length),
      callback: (n) => {
        if (this.#reply === undefined) {
          this.#headerBytes += n
          if (this.#headerBytes < OUT_HEADER) return true
          this.#headerBytes = 0
          const len = this.#header.readUInt32LE(0)
          if (len < OUT_HEADER || len > OUT_HEADER + MAX_READ) {
            broken()
            return false
          }
          this.#reply = this.#take(len)
          this.#header.copy(this.#reply)
          this.#have = OUT_HEADER
        } else this.#have += n
        if (this.#have === this.#reply.length) {
          const reply = this.#reply
          this.#reply = undefined
          this.#deliver(reply, () => this.#give(reply))
        }
        return true
      }
    }
  }

  #take(len: number): Buffer {
    if (len <= BIG_REPLY) return Buffer.allocUnsafe(len)
    return (this.#pool.pop() ?? Buffer.allocUnsafeSlow(OUT_HEADER + MAX_READ)).subarray(0, len)
  }

  #give(reply: Buffer): void {
    if (reply.buffer.byteLength === OUT_HEADER + MAX_READ && this.#pool.length < 16) {
      this.#pool.push(Buffer.from(reply.buffer, reply.byteOffset, OUT_HEADER + MAX_READ))
    }
  }
}

/** Replies larger than this get a pooled buffer. */
const BIG_REPLY = 64 * 1024

/** Reads the JSON line a connection starts with; the bytes after it stay for the stream. Leaves it paused. */
export function readLine<T = HolderRequest>(socket: Socket): Promise<{ request: T; rest: Buffer }> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = []
    let size = 0
    const done = (err?: Error) => {
      socket.off('data', onData)
      socket.off('close', onClose)
      socket.pause()
      if (err !== undefined) reject(err)
    }
    const onClose = () => done(new Error('the connection closed before its first line'))
    const onData = (d: Buffer) => {
      const nl = d.indexOf(10)
      if (nl < 0) {
        parts.push(d)
        size += d.length
        if (size > MAX_LINE) done(new Error('the first line is too long'))
        return
      }
      parts.push(d.subarray(0, nl))
      done()
      try {
        resolve({ request: JSON.parse(Buffer.concat(parts).toString('utf8')) as T, rest: d.subarray(nl + 1) })
      } catch {
        reject(new Error('the first line is not JSON'))
      }
    }
    socket.on('data', onData)
    socket.once('close', onClose)
    socket.resume()
  })
}

/** Whether a holder answers on `path`. */
function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = createConnection(path)
    c.once('connect', () => {
      c.destroy()
      resolve(true)
    })
    c.once('error', () => resolve(false))
  })
}
