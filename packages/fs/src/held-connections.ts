// The two ways this process serves a session the holder keeps (see holder.ts): over the holder's socket (the
// relay), or from its own copy of the connection's descriptor (direct, Linux 6.9+).
import type { Socket } from 'node:net'
import { UnmountError } from './errors.js'
import { Connection, type FuseMountInit } from './fuse.js'
import { MessageStream, RELAY_BUFFER } from './fuse-relay.js'
import { Responder } from './fuse-responder.js'
import type { FileOpenLog } from './open-log.js'
import type { Operations } from './operations.js'
import { IN_HEADER } from './protocol.js'

/**
 * What a connection needs of the holder's client (held.ts): to say whether it serves the session, and to ask the
 * holder to close it. Narrow on purpose: held.ts builds the connections, so they do not import it back.
 */
export interface HolderLink {
  serving(c: { detach(): Promise<void> }, on: boolean): void
  call(request: object, start: boolean): Promise<unknown>
}

/** A held session served by this process: requests come over the holder's socket, replies go back on it. */
export class HeldConnection {
  readonly responder: Responder
  readonly #socket: Socket
  readonly #holder: HolderLink
  readonly id: string
  /** The socket closed: detached, closed, or the holder ended the session (or died). */
  readonly gone: Promise<void>

  constructor(holder: HolderLink, id: string, socket: Socket, rest: Buffer, ops: Operations, init: FuseMountInit) {
    this.#holder = holder
    this.id = id
    this.#socket = socket
    this.responder = new Responder(
      ops,
      { cacheTimeout: init.cacheTimeout ?? 86_400, debug: init.debug === true },
      (r) => this.#send(r)
    )
    const requests = new MessageStream(
      IN_HEADER,
      RELAY_BUFFER,
      (r) => this.responder.dispatch(r),
      () => socket.destroy()
    )
    socket.on('error', () => {})
    this.gone = new Promise((resolve) => socket.once('close', () => resolve()))
    this.gone.then(() => {
      // Whatever is in flight is the holder's again: nothing more goes to a socket that is gone.
      this.responder.stop(new Error('the FUSE session holder connection closed'), false)
      this.responder.failed(new Error('the FUSE session holder ended the session before it started'))
      holder.serving(this, false)
    })
    holder.serving(this, true)
    if (rest.length > 0) requests.push(rest)
    socket.on('data', (d: Buffer) => requests.push(d))
    socket.resume()
  }

  #send(reply: Uint8Array): Promise<void> {
    if (this.#socket.destroyed) return Promise.resolve()
    return new Promise((resolve) => this.#socket.write(reply, () => resolve()))
  }

  async detach(): Promise<void> {
    this.responder.stop(new Error('the mount is handed over to the next p2pd'), false)
    this.#socket.destroy()
    await this.gone
  }

  async close(mountpoint: string): Promise<void> {
    this.responder.stop(new Error(`${mountpoint} is being unmounted`), true)
    try {
      await this.#holder.call({ op: 'close', id: this.id }, false)
    } catch (err) {
      const e = err as Error & { code?: string }
      // No holder, or it has no such session any more: the connection ended already.
      if (e.name === 'NoSuchSession' || e.code === 'ENOENT' || e.code === 'ECONNREFUSED') return
      throw new UnmountError(mountpoint, e.message, `try 'p2p-mount --unmount ${mountpoint}'`, { cause: err })
    } finally {
      this.#socket.destroy()
    }
  }
}

/**
 * A held session served from this process's own copy of the connection's descriptor, as an embedded mount is:
 * the holder only keeps its descriptor open, so that the connection outlives this process.
 */
export class DirectConnection {
  readonly id: string
  readonly connection: Connection
  readonly #holder: HolderLink
  readonly #log: FileOpenLog

  constructor(
    holder: HolderLink,
    id: string,
    fd: number,
    ops: Operations,
    init: FuseMountInit,
    log: FileOpenLog,
    adopted?: Map<number, number | undefined>
  ) {
    this.#holder = holder
    this.id = id
    this.#log = log
    this.connection = new Connection(fd, ops, {
      cacheTimeout: init.cacheTimeout ?? 86_400,
      debug: init.debug === true,
      ...(init.passthrough !== undefined && { passthrough: init.passthrough }),
      openLog: log,
      // Ended from outside (an unmount by someone else): the holder's descriptor has nothing left to keep.
      onEnded: () => {
        holder.serving(this, false)
        holder.call({ op: 'close', id }, false).catch(() => {})
      }
    })
    // Before the first request arrives (the relay delivers on a later turn of the event loop).
    if (adopted !== undefined) this.connection.responder.adopt(adopted)
    holder.serving(this, true)
  }

  get responder(): Responder {
    return this.connection.responder
  }

  async detach(): Promise<void> {
    this.#holder.serving(this, false)
    await this.connection.detach()
    await this.#log.close()
  }

  async close(mountpoint: string): Promise<void> {
    this.#holder.serving(this, false)
    try {
      await this.connection.close(mountpoint)
      await this.#log.close(true)
    } finally {
      try {
        await this.#holder.call({ op: 'close', id: this.id }, false)
      } catch (err) {
        const e = err as Error & { code?: string }
        if (!(e.name === 'NoSuchSession' || e.code === 'ENOENT' || e.code === 'ECONNREFUSED')) {
          // biome-ignore lint/correctness/noUnsafeFinally: the unmount's own failure, if any, is the same one
          throw new UnmountError(mountpoint, e.message, `try 'p2p-mount --unmount ${mountpoint}'`, { cause: err })
        }
      }
    }
  }
}
