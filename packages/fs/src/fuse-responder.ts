// The answering side of a FUSE connection: the request dispatch, the INIT it waits for, and the passthrough
// opens with their backing ids.
import { open as openFile } from 'node:fs/promises'
import { backingClose, backingOpen } from '@strata/native'
import { MountError } from './errors.js'
import { MAX_READ } from './fuse-mount.js'
import type { Operations } from './operations.js'
import { Op, OUT_HEADER, parseRequest, type Request, Session } from './protocol.js'

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

/** The arguments worth a debug line: a read's offset and size, a looked-up name. */
function describe(req: Request): string {
  const body = Buffer.from(req.body.buffer, req.body.byteOffset, req.body.byteLength)
  if (req.opcode === Op.READ) return `offset ${body.readBigUInt64LE(8)} size ${body.readUInt32LE(16)}`
  if (req.opcode === Op.LOOKUP) return JSON.stringify(body.subarray(0, body.indexOf(0)).toString())
  return ''
}
