// p2pd's side of the FUSE session holder (holder.ts): starts it when none runs, mounts through it, serves its
// sessions, and serves them again after a restart. The FUSE messages go over the holder's socket; the file
// system side (Responder) is the same as for a mount served in this process.
import { spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { close as closeFd } from 'node:fs'
import { chmod, mkdir, open, unlink } from 'node:fs/promises'
import { createConnection, createServer, type Server, type Socket } from 'node:net'
import { release } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import type { AbortOptions } from '@strata/base'
import { backingClose, pidfdGetfd } from '@strata/native'
import { MountError } from './errors.js'
import { type FuseMountInit, type Mount, notifyResend } from './fuse.js'
import { refuseMounted, setReadAhead } from './fuse-mount.js'
import { DirectConnection, HeldConnection } from './held-connections.js'
import { HOLDER_FEATURES, HOLDER_PROTOCOL, HOLDER_SOCKET, readLine } from './holder.js'
import type { HeldDirectory } from './mountpoint.js'
import { FileOpenLog, openLogPath } from './open-log.js'
import type { Operations } from './operations.js'

/** The holder's script: next to this file's compiled self (from src/, under tests, the built one). */
const HOLDER_SCRIPT = fileURLToPath(new URL('../dist/holder-main.js', import.meta.url))

/** A FUSE session the holder keeps. */
export interface HeldSession {
  readonly id: string
  /** Where its FUSE file system is mounted (for a writable mount, the lower directory under the overlay). */
  readonly mountpoint: string
  /** What the server that mounted it asked the holder to keep with it. */
  readonly meta: unknown
  /** Requests the kernel sent that no server has answered yet. */
  readonly pending: number
  /** Whether a server serves it now (a session served directly: whether its server was the holder's client). */
  readonly attached: boolean
  /**
   * Served directly: the server takes its own copy of the holder's descriptor `fd` (pidfd_getfd of `pid`), reads
   * and answers the connection itself, and asks the kernel to resend what the last one left unanswered.
   */
  readonly direct?: { pid: number; fd: number }
}

/** The holder of a data directory (`DIR/holder.sock`), started on first use. */
export interface FuseHolder {
  readonly dir: string
  /** The sessions it keeps; none when no holder runs. */
  sessions(options?: AbortOptions): Promise<HeldSession[]>
  /** Stops serving every session this process serves, without ending them: the next process serves them. */
  detach(): Promise<void>
}

/** A mount whose FUSE session the holder keeps. */
export interface HeldMount extends Mount {
  readonly session: string
  /** Stops serving it and leaves it to the holder (and the next process that attaches). */
  detach(): Promise<void>
  /** Replaces what the holder keeps with the session. */
  update(meta: unknown): Promise<void>
}

interface Reply {
  ok?: boolean
  error?: { name?: string; message?: string; hint?: string }
  [key: string]: unknown
}

export interface FuseHolderInit {
  /**
   * Serve sessions from this process's own copy of each connection's descriptor where the kernel and the
   * holder allow it (default true); false: every session through the holder's relay (the fallback; benchmarks).
   */
  direct?: boolean
}

/** The holder of sessions of `dir` (created 0700: whoever reaches its socket serves the mounts). */
export function createFuseHolder(dir: string, init: FuseHolderInit = {}): FuseHolder {
  const client = new HolderClient(dir)
  if (init.direct === false) client.directFailed = new Error('direct serving turned off')
  return client
}

export class HolderClient implements FuseHolder {
  readonly dir: string
  readonly #socket: string
  readonly #served = new Set<{ detach(): Promise<void> }>()
  /** Taking a copy of a held descriptor failed once (no right to, no addon): sessions go through the relay. */
  directFailed: Error | undefined
  #starting: Promise<void> | undefined
  /** Where the holder connects to hand this process a session (see holder.ts), and who waits for which. */
  #serve: Promise<{ server: Server; path: string }> | undefined
  readonly #waiting = new Map<string, (stream: { socket: Socket; rest: Buffer; pending: number }) => void>()

  constructor(dir: string) {
    this.dir = dir
    this.#socket = join(dir, HOLDER_SOCKET)
  }

  /**
   * Asks the holder for a session's stream (`mount` or `attach`): the answer, and the connection the holder made
   * to this process's serve socket, paused, with what followed its first line.
   */
  async session(
    request: object,
    start: boolean,
    options?: AbortOptions
  ): Promise<{ reply: Reply; socket: Socket; rest: Buffer; pending: number }> {
    const { path } = await this.#listen()
    const token = randomBytes(16).toString('hex')
    const stream = new Promise<{ socket: Socket; rest: Buffer; pending: number }>((resolve) => {
      this.#waiting.set(token, resolve)
    })
    try {
      const reply = await this.call({ ...request, serve: path, token }, start, options)
      // The holder connected before it answered.
      const timeout = new Promise<never>((_, reject) =>
        setTimeout(() => reject(new Error('the FUSE session holder did not connect')), 30_000).unref()
      )
      return { reply, ...(await Promise.race([stream, timeout])) }
    } finally {
      this.#waiting.delete(token)
    }
  }

  #listen(): Promise<{ server: Server; path: string }> {
    this.#serve ??= (async () => {
      await mkdir(this.dir, { recursive: true, mode: 0o700 })
      await chmod(this.dir, 0o700)
      const path = join(this.dir, `serve-${process.pid}-${randomBytes(4).toString('hex')}.sock`)
      const server = createServer({ pauseOnConnect: true }, (socket) => {
        socket.on('error', () => {})
        readLine<{ token?: unknown; pending?: unknown }>(socket).then(
          ({ request, rest }) => {
            const waiter = typeof request.token === 'string' ? this.#waiting.get(request.token) : undefined
            if (waiter === undefined) socket.destroy()
            else waiter({ socket, rest, pending: Number(request.pending) || 0 })
          },
          () => socket.destroy()
        )
      })
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject)
        server.listen(path, () => resolve())
      })
      server.unref()
      await chmod(path, 0o600)
      return { server, path }
    })()
    return this.#serve
  }

  /**
   * What the holder does beyond protocol 1 (holder.ts HOLDER_FEATURES); with none running, those of the holder
   * this process would start.
   */
  async features(options?: AbortOptions): Promise<string[]> {
    const reply = await this.#list(options)
    if (reply === undefined) return HOLDER_FEATURES
    return Array.isArray(reply.features) ? (reply.features as string[]) : []
  }

  #list(options?: AbortOptions): Promise<Reply | undefined> {
    return this.call({ op: 'list' }, false, options).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT' || err.code === 'ECONNREFUSED') return undefined
      throw err
    })
  }

  async sessions(options?: AbortOptions): Promise<HeldSession[]> {
    const reply = await this.#list(options)
    if (reply === undefined) return []
    if (reply.version !== HOLDER_PROTOCOL) {
      throw new MountError(
        this.dir,
        `the FUSE session holder (pid ${reply.pid}) speaks protocol ${reply.version}, not ${HOLDER_PROTOCOL}`,
        'run the p2pd version that started it, or unmount its mounts so that it exits'
      )
    }
    return reply.sessions as HeldSession[]
  }

  async detach(): Promise<void> {
    await Promise.all([...this.#served].map((c) => c.detach()))
    const serve = this.#serve
    this.#serve = undefined
    if (serve !== undefined) {
      const { server, path } = await serve
      await new Promise<void>((resolve) => server.close(() => resolve()))
      await unlink(path).catch(() => {})
    }
  }

  /** One request, one answer. */
  async call(request: object, start: boolean, options?: AbortOptions): Promise<Reply> {
    const { reply, socket } = await this.open(request, start, options)
    socket.destroy()
    return reply
  }

  /** Sends `request` on a new connection; the answer, and the connection (paused) with what followed it. */
  async open(
    request: object,
    start: boolean,
    options?: AbortOptions
  ): Promise<{ reply: Reply; socket: Socket; rest: Buffer }> {
    let socket: Socket
    try {
      socket = await connect(this.#socket, options)
    } catch (err) {
      if (!start) throw err
      await this.#start(options)
      socket = await connect(this.#socket, options)
    }
    try {
      socket.write(`${JSON.stringify(request)}\n`)
      const { request: reply, rest } = await readLine<Reply>(socket)
      if (reply.ok !== true) {
        const e = reply.error ?? {}
        throw Object.assign(new Error(e.message ?? 'the holder refused'), {
          name: e.name ?? 'HolderError',
          ...(e.hint !== undefined && { hint: e.hint })
        })
      }
      return { reply, socket, rest }
    } catch (err) {
      socket.destroy()
      throw err
    }
  }

  serving(c: { detach(): Promise<void> }, on: boolean): void {
    if (on) this.#served.add(c)
    else this.#served.delete(c)
  }

  /** Starts a holder, detached (its own session: it outlives this process), and waits until it answers. */
  #start(options?: AbortOptions): Promise<void> {
    this.#starting ??= (async () => {
      await mkdir(this.dir, { recursive: true, mode: 0o700 })
      await chmod(this.dir, 0o700)
      const log = await open(join(this.dir, 'holder.log'), 'a', 0o600)
      try {
        const child = spawn(process.execPath, [HOLDER_SCRIPT, this.dir], {
          detached: true,
          // Its working directory must not keep any file system busy for as long as it lives.
          cwd: '/',
          stdio: ['ignore', log.fd, log.fd]
        })
        child.unref()
        let exited = false
        child.once('exit', () => {
          exited = true
        })
        child.once('error', () => {
          exited = true
        })
        for (let i = 0; i < 250 && !exited; i++) {
          options?.signal?.throwIfAborted()
          const c = await connect(this.#socket).catch(() => undefined)
          if (c !== undefined) {
            c.destroy()
            return
          }
          await new Promise((r) => setTimeout(r, 20))
        }
        throw new MountError(
          this.dir,
          `the FUSE session holder did not start${exited ? ' (it exited)' : ''}`,
          `see ${join(this.dir, 'holder.log')}`
        )
      } finally {
        await log.close()
      }
    })()
    const starting = this.#starting
    starting.then(
      () => {
        if (this.#starting === starting) this.#starting = undefined
      },
      () => {
        if (this.#starting === starting) this.#starting = undefined
      }
    )
    return starting
  }
}

function connect(path: string, options?: AbortOptions): Promise<Socket> {
  return new Promise((resolve, reject) => {
    options?.signal?.throwIfAborted()
    const socket = createConnection(path)
    socket.once('connect', () => {
      socket.off('error', reject)
      resolve(socket)
    })
    socket.once('error', reject)
  })
}

/**
 * Whether this process can serve held sessions from descriptors of its own: Linux 6.9+ (FUSE_NOTIFY_RESEND, so
 * that the kernel, not the holder, keeps the requests a dead server left unanswered) and the native addon
 * (pidfd_getfd). Else the holder relays.
 */
export function canServeDirectly(): boolean {
  const [major = 0, minor = 0] = release()
    .split('.')
    .map((n) => Number.parseInt(n, 10))
  return major > 6 || (major === 6 && minor >= 9)
}

/**
 * How mounts on this machine read files held whole in the store, for `p2pctl status`: with FUSE passthrough
 * (Linux 6.9+ and the native addon: INIT asks for it, and the kernel offers it when built with
 * CONFIG_FUSE_PASSTHROUGH), or normally (every read a request).
 */
export function fuseReadMode(): string {
  if (!canServeDirectly()) return `normal (Linux ${release()}: passthrough needs 6.9)`
  try {
    backingClose(-1, 0)
  } catch (err) {
    if ((err as { code?: string }).code === 'ERR_STRATA_NATIVE') return 'normal (the native addon is not built)'
  }
  return `passthrough where the kernel offers it, for files held whole in the store (Linux ${release()})`
}

function heldMount(c: HeldConnection | DirectConnection, holder: HolderClient, mountpoint: string): HeldMount {
  let unmounted: Promise<void> | undefined
  return {
    mountpoint,
    fuse: () => (c instanceof DirectConnection ? c.responder.fuse() : { mode: 'off', backingFiles: 0 }),
    session: c.id,
    unmount() {
      unmounted ??= c.close(mountpoint)
      return unmounted
    },
    detach: () => c.detach(),
    async update(meta) {
      await holder.call({ op: 'update', id: c.id, meta }, false)
    }
  }
}

/**
 * Mounts `ops` on the held directory with FUSE, through the holder (started when none runs): the FUSE session
 * outlives this process, and `resumeHeld` serves it again from the next one.
 */
export async function mountThroughHolder(
  ops: Operations,
  target: HeldDirectory,
  holder: FuseHolder,
  meta: unknown,
  init: FuseMountInit = {},
  options?: AbortOptions
): Promise<HeldMount> {
  const client = asClient(holder)
  const mountpoint = target.path
  await refuseMounted(mountpoint)
  if (client.directFailed === undefined && canServeDirectly() && (await client.features(options)).includes('direct')) {
    const mounted = await mountDirect(ops, target, client, meta, init, options)
    if (mounted !== undefined) return mounted
  }
  const request = {
    op: 'mount',
    mountpoint,
    // The holder opens the directory this process checked and holds, not the path (which could have changed).
    target: `/proc/${process.pid}/fd/${target.handle.fd}`,
    ...(init.allowOther !== undefined && { allowOther: init.allowOther }),
    meta
  }
  const { reply, socket, rest } = await client
    .session(request, true, options)
    .catch((err: Error & { hint?: string }) => {
      if (err instanceof MountError) throw err
      throw new MountError(mountpoint, err.message, err.hint ?? 'check `dmesg` for FUSE errors', { cause: err })
    })
  const c = new HeldConnection(client, String(reply.id), socket, rest, ops, init)
  try {
    await c.responder.started(mountpoint, init.timeoutMs ?? 30_000, options?.signal)
    await setReadAhead(mountpoint)
  } catch (err) {
    await c.close(mountpoint).catch(() => {})
    throw err
  }
  return heldMount(c, client, mountpoint)
}

/**
 * The holder mounts and keeps the descriptor; this process takes a copy and serves it. Undefined when it cannot
 * take one (the session is given up, and this and later mounts go through the relay).
 */
async function mountDirect(
  ops: Operations,
  target: HeldDirectory,
  client: HolderClient,
  meta: unknown,
  init: FuseMountInit,
  options?: AbortOptions
): Promise<HeldMount | undefined> {
  const mountpoint = target.path
  const request = {
    op: 'mount',
    mountpoint,
    target: `/proc/${process.pid}/fd/${target.handle.fd}`,
    ...(init.allowOther !== undefined && { allowOther: init.allowOther }),
    meta,
    direct: true
  }
  const reply = await client.call(request, true, options).catch((err: Error & { hint?: string }) => {
    if (err instanceof MountError) throw err
    throw new MountError(mountpoint, err.message, err.hint ?? 'check `dmesg` for FUSE errors', { cause: err })
  })
  const id = String(reply.id)
  let fd: number
  try {
    fd = pidfdGetfd(Number(reply.pid), Number(reply.fd))
  } catch (err) {
    client.directFailed = err as Error
    await client.call({ op: 'close', id }, false).catch(() => {})
    return undefined
  }
  const log = new FileOpenLog(openLogPath(client.dir, Number(reply.pid), id))
  await log.close(true)
  const c = new DirectConnection(client, id, fd, ops, init, log)
  try {
    await c.responder.started(mountpoint, init.timeoutMs ?? 30_000, options?.signal)
    await setReadAhead(mountpoint)
  } catch (err) {
    await c.close(mountpoint).catch(() => {})
    throw err
  }
  return heldMount(c, client, mountpoint)
}

/** Serves a session the holder kept (mounted by an earlier process) with `ops`, at once. */
export async function resumeHeld(
  ops: Operations,
  holder: FuseHolder,
  session: HeldSession,
  init: FuseMountInit = {},
  options?: AbortOptions
): Promise<HeldMount> {
  const client = asClient(holder)
  if (session.direct !== undefined) {
    const fd = pidfdGetfd(session.direct.pid, session.direct.fd)
    // What the last server read and did not answer (a read in progress when it died) is the kernel's again, and
    // comes first: before this process reads anything.
    try {
      await notifyResend(fd)
    } catch (err) {
      closeFdQuietly(fd)
      throw new MountError(
        session.mountpoint,
        `the kernel would not resend the requests left unanswered (${(err as Error).message})`,
        'unmount it: p2p-mount --unmount',
        { cause: err }
      )
    }
    const { log, open } = await FileOpenLog.take(openLogPath(client.dir, session.direct.pid, session.id))
    const c = new DirectConnection(client, session.id, fd, ops, init, log, open)
    return heldMount(c, client, session.mountpoint)
  }
  const { socket, rest } = await client.session({ op: 'attach', id: session.id }, false, options)
  const c = new HeldConnection(client, session.id, socket, rest, ops, init)
  return heldMount(c, client, session.mountpoint)
}

/** Ends a held session nobody will serve (its image cannot be opened again): unmounted, lazily. */
export async function discardHeld(holder: FuseHolder, session: HeldSession): Promise<void> {
  await asClient(holder).call({ op: 'close', id: session.id }, false)
}

function asClient(holder: FuseHolder): HolderClient {
  if (!(holder instanceof HolderClient)) throw new TypeError('the holder must come from createFuseHolder')
  return holder
}

function closeFdQuietly(fd: number): void {
  closeFd(fd, () => {})
}
