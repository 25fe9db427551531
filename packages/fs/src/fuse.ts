// The FUSE transport: mounts /dev/fuse with mount(8) and speaks the kernel protocol (protocol.ts) over it.
// No libfuse: its version 2 (all a Node binding offered) caps reads at 128 KiB; the protocol lets us ask for
// 1 MiB. Requests are relayed from /dev/fuse into a pipe by a `dd` child, because a read of /dev/fuse blocks and
// Node can only wait on a pipe without tying up one of its few I/O threads; replies are written to /dev/fuse
// directly. Everything here runs on the event loop: nothing may block (no sync I/O, no execSync).
// Its parts: the mount helpers (fuse-mount.ts), the relay of requests (fuse-relay.ts), and the responder that
// answers them (fuse-responder.ts); here, the mount and its connection.
import { close, write } from 'node:fs'
import type { AbortOptions } from '@strata/base'
import { UnmountError } from './errors.js'
import { isMounted, lazyUnmount, mountDevice, refuseMounted, setReadAhead } from './fuse-mount.js'
import { Relay } from './fuse-relay.js'
import { type OpenLog, Responder, type ResponderInit } from './fuse-responder.js'
import { type HeldDirectory, holdMountpoint } from './mountpoint.js'
import type { Operations } from './operations.js'
import { OUT_HEADER } from './protocol.js'

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
