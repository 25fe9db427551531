// The FUSE transport: mounts /dev/fuse with mount(8) and speaks the kernel protocol (protocol.ts) over it.
// No libfuse: its version 2 (all a Node binding offered) caps reads at 128 KiB; the protocol lets us ask for
// 1 MiB. Requests are relayed from /dev/fuse into a pipe by a `dd` child, because a read of /dev/fuse blocks and
// Node can only wait on a pipe without tying up one of its few I/O threads; replies are written to /dev/fuse
// directly. Everything here runs on the event loop: nothing may block (no sync I/O, no execSync).
import { type ChildProcess, execFile, spawn } from 'node:child_process'
import { close, open, write } from 'node:fs'
import { readFile, stat, writeFile } from 'node:fs/promises'
import { resolve } from 'node:path'
import { promisify } from 'node:util'
import type { AbortOptions } from '@strata/stargz'
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
}

/** A live FUSE mount. */
export interface Mount {
  readonly mountpoint: string
  /** Unmounts (lazily, so a busy mount goes too) and aborts reads in flight. */
  unmount(options?: AbortOptions): Promise<void>
}

const exec = promisify(execFile)

/** Largest read the kernel may ask for at once: 256 pages (the kernel's own limit for max_pages). */
const MAX_READ = 1 << 20
/** The relay's read buffer: larger than any request the kernel sends a read-only mount (the kernel checks). */
const RELAY_BUFFER = 1 << 20
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
  if (await isMounted(mountpoint)) {
    throw new MountError(
      mountpoint,
      'something is mounted there already',
      `unmount it first ('p2p-mount --unmount ${mountpoint}' if it is a p2p-mount that died)`
    )
  }
  const timeout = init.cacheTimeout ?? 86_400
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
  if (init.allowOther ?? uid === 0) data.push('allow_other')
  try {
    // The target is the directory held open since it was checked (fd 4), not its path, which could have changed.
    const args = ['-i', '-n', '-c', '-t', 'fuse.strata', '-o', data.join(','), 'strata', '/proc/self/fd/4']
    await withFds([fd, target.handle.fd], 'mount', args)
  } catch (err) {
    close(fd, () => {})
    throw new MountError(
      mountpoint,
      (err as Error).message,
      uid === 0 ? 'check `dmesg` for FUSE errors' : 'mounting needs root: run it as root',
      { cause: err }
    )
  }

  const connection = new Connection(fd, ops, timeout, init.debug === true)
  try {
    await connection.started(mountpoint, init.timeoutMs ?? 30_000, options?.signal)
    await setReadAhead(mountpoint)
  } catch (err) {
    await connection.close(mountpoint)
    throw err
  }
  let unmounted: Promise<void> | undefined
  return {
    mountpoint,
    unmount() {
      unmounted ??= connection.close(mountpoint)
      return unmounted
    }
  }
}

/** One FUSE connection: the relay that brings requests, the session that answers them, the replies. */
class Connection {
  readonly #fd: number
  readonly #session: Session
  readonly #relay: ChildProcess
  readonly #relayed: Promise<void>
  readonly #inflight = new AbortController()
  readonly #writes = new Set<Promise<void>>()
  readonly #spare: Buffer[] = []
  readonly #debug: boolean
  #pending: Buffer = Buffer.alloc(0)
  #closed = false
  #ended: Promise<void> | undefined
  #init = Promise.withResolvers<void>()

  constructor(fd: number, ops: Operations, cacheTimeout: number, debug: boolean) {
    this.#fd = fd
    this.#debug = debug
    this.#session = new Session(ops, { cacheTimeout, maxRead: MAX_READ })
    // setpriv: the relay dies with this process, so a killed p2p-mount leaves a mount that says "not connected".
    this.#relay = spawn('setpriv', ['--pdeathsig', 'KILL', '--', 'dd', `bs=${RELAY_BUFFER}`, 'status=none'], {
      stdio: [fd, 'pipe', 'pipe']
    })
    let stderr = ''
    this.#relay.stderr!.on('data', (d) => {
      stderr += d
    })
    this.#relay.stdout!.on('data', (d: Buffer) => this.#receive(d))
    // A broken pipe ends the relay, and with it the connection (below); it must not end the process.
    this.#relay.stdout!.on('error', () => this.#relay.kill('SIGKILL'))
    this.#relay.stderr!.on('error', () => {})
    this.#relayed = new Promise((resolve) => {
      this.#relay.on('error', (err) => {
        this.#init.reject(err)
        resolve()
      })
      this.#relay.on('close', () => {
        this.#init.reject(new Error(`the FUSE connection ended before it started${stderr ? `: ${stderr.trim()}` : ''}`))
        resolve()
      })
    })
    this.#init.promise.catch(() => {})
    // However the relay ends (an unmount, or killed by someone), the connection ends with it: readers of the
    // mount then get an error instead of waiting for answers nobody will read the requests for.
    this.#relayed.then(() => this.#end())
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

  /**
   * Detaches the mount (lazily: a busy mount goes too), aborts reads in flight, and ends the connection: with
   * the relay and this fd closed, the kernel fails whatever a process still holding a file of it asks.
   */
  async close(mountpoint: string): Promise<void> {
    this.#inflight.abort(new Error(`${mountpoint} is being unmounted`))
    let failure: unknown
    if (await isMounted(mountpoint)) {
      await exec('umount', ['-l', mountpoint], { timeout: 30_000 }).catch((err) => {
        failure = err
      })
    }
    this.#relay.kill('SIGKILL')
    await this.#end()
    if (failure !== undefined && (await isMounted(mountpoint))) {
      const stderr = (failure as { stderr?: string }).stderr ?? String(failure)
      throw new UnmountError(mountpoint, stderr.trim(), `try 'p2p-mount --unmount ${mountpoint}'`, { cause: failure })
    }
  }

  /** Closes /dev/fuse once the relay is gone and no reply is being written (the fd number could be reused). */
  #end(): Promise<void> {
    this.#ended ??= (async () => {
      await this.#relayed
      this.#closed = true
      this.#inflight.abort(new Error('the FUSE connection ended'))
      await Promise.allSettled(this.#writes)
      await new Promise<void>((resolve) => close(this.#fd, () => resolve()))
    })()
    return this.#ended
  }

  /** Requests arrive as the relay wrote them; a pipe read may hold parts of several. */
  #receive(data: Buffer): void {
    let buf = this.#pending.length === 0 ? data : Buffer.concat([this.#pending, data])
    while (buf.length >= 4) {
      const len = buf.readUInt32LE(0)
      if (len < IN_HEADER) {
        // Not a FUSE request: the stream is broken. Stop rather than guess.
        this.#relay.kill('SIGKILL')
        return
      }
      if (buf.length < len) break
      this.#dispatch(buf.subarray(0, len))
      buf = buf.subarray(len)
    }
    this.#pending = buf.length === 0 ? Buffer.alloc(0) : Buffer.from(buf)
  }

  #dispatch(bytes: Buffer): void {
    const req = parseRequest(bytes)
    if (this.#debug) process.stderr.write(`fuse: #${req.unique} op ${req.opcode} node ${req.nodeid} ${describe(req)}\n`)
    if (req.opcode === Op.READ) {
      const into = this.#spare.pop() ?? Buffer.allocUnsafeSlow(OUT_HEADER + MAX_READ)
      this.#session.read(req, into, this.#inflight.signal).then((reply) =>
        this.#send(reply).finally(() => {
          if (this.#spare.length < 16) this.#spare.push(into)
        })
      )
      return
    }
    const reply = this.#session.answer(req)
    if (reply !== undefined) this.#send(reply)
    if (req.opcode === Op.INIT) {
      if (this.#session.minor > 0) this.#init.resolve()
      else this.#init.reject(new Error('the kernel refused the FUSE protocol version'))
    }
  }

  #send(reply: Uint8Array): Promise<void> {
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
async function setReadAhead(mountpoint: string): Promise<void> {
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
