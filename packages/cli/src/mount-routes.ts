import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import {
  type Caller,
  createFuseHolder,
  discardMount,
  type HeldMountInfo,
  heldMounts,
  type ReadFailure,
  resumeMount,
  type ServedMount,
  serveMount
} from '@strata/fs'
import type { ControlServer, StrataNode } from '@strata/node'
import { makeReference, parseReference } from '@strata/registry/reference'
import { writableDir } from './writable-dir.js'

/** What p2p-mount sends to `POST /mount`. Paths are absolute (the daemon's working directory is not the caller's). */
export interface MountRequest {
  image: string
  mountpoint: string
  writable?: boolean
  record?: string
  /** Serve again the mount this p2p-mount had from a p2pd that went away (the holder kept it): never a new one. */
  resume?: boolean
}

/** Events of `POST /mount`, one JSON object a line. */
export type MountEvent =
  | { type: 'opened'; image: string; digest: string; layers: number }
  | { type: 'mounted'; mountpoint: string }
  /** The answer to a `resume`: p2pd serves the mount again (it kept working meanwhile, reads waited). */
  | { type: 'resumed'; mountpoint: string }
  | { type: 'read-error'; path: string; layer: number; message: string }
  | { type: 'warning'; message: string }
  /** p2pd is stopping: the mount stays, held for the next p2pd; the stream ends without a result. */
  | { type: 'detached'; message: string }
  | { type: 'result'; unmounted: string }

/**
 * What p2pd asks the FUSE session holder to keep with each mount (fs keeps the paths and the owner). `kind`
 * tells these mounts from other users' of the holder (a snapshotter's), which are left alone here.
 */
interface MountMeta {
  kind: typeof KIND
  image: string
  digest: string
  client?: ClientProcess
}

const KIND = 'p2p-mount'

/** A p2p-mount process: its pid and its start time (a pid is reused; the pair is not). */
interface ClientProcess {
  pid: number
  start: string
}

interface Held {
  served: ServedMount
  owner: Caller
  image: string
  digest: string
  /** The p2p-mount whose request holds the mount: when it is gone, the mount ends. */
  client?: ClientProcess
  /** That p2p-mount's open stream, while there is one. */
  stream?: { release(): void; wake(): void; handOver(): void }
  failures: MountEvent[]
  /** Until the p2p-mount of a mount served again comes back: is it still alive? */
  watch?: NodeJS.Timeout
  ending?: Promise<void>
}

export interface MountRoutes {
  /** The mounts the FUSE session holder kept from an earlier p2pd, served again (or ended); resolves when done. */
  readonly resumed: Promise<void>
  /**
   * p2pd is stopping (SIGTERM, an upgrade): the mounts stay, held by the FUSE session holder for the next p2pd;
   * their p2p-mount clients wait for it. Call before the control server closes.
   */
  close(): Promise<void>
}

/**
 * Daemon mode of p2p-mount: p2pd serves the mount, so reads go through its fetcher (its store, then its
 * peers, then the registry). `POST /mount` mounts and holds the mount while the request stays open: when
 * p2p-mount asks `POST /unmount` or its process goes away (it was killed), the mount is removed.
 *
 * The FUSE sessions are kept by the holder (@strata/fs createFuseHolder, `DATA/fuse`), not by p2pd: when p2pd
 * stops (`close`) or dies, mounts stay, reads wait, and the next p2pd serves them again at its start (the same
 * image by digest) and answers what waited. p2p-mount resumes its stream with `resume: true`; a mount whose
 * p2p-mount died meanwhile is unmounted.
 * p2pd wires it with `addMountRoutes(control, node, { dataDir, socket })`.
 */
export function addMountRoutes(
  control: ControlServer,
  node: StrataNode,
  init: { dataDir: string; socket: string; passthrough?: boolean; log?: (message: string) => void }
): MountRoutes {
  const log = init.log ?? (() => {})
  const mounts = new Map<string, Held>()
  // No mount may cover what p2pd itself needs: its store and its socket.
  const protect = [init.dataDir, init.socket]
  const holder = createFuseHolder(join(init.dataDir, 'fuse'))
  const streams = new Set<Promise<void>>()
  let stopping = false

  const failure = (held: Held) => (f: ReadFailure) =>
    held.failures.push({ type: 'read-error', path: f.path, layer: f.layer, message: f.error.message })
  const metaOf = (held: Held): MountMeta => ({
    kind: KIND,
    image: held.image,
    digest: held.digest,
    ...(held.client !== undefined && { client: held.client })
  })

  /** Unmounts, once; the mountpoint is free again after. */
  const end = (mountpoint: string, held: Held): Promise<void> => {
    held.ending ??= (async () => {
      clearInterval(held.watch)
      try {
        await held.served.unmount()
      } finally {
        if (mounts.get(mountpoint) === held) mounts.delete(mountpoint)
      }
    })()
    return held.ending
  }

  const resumed = (async () => {
    let found: HeldMountInfo[]
    try {
      found = await heldMounts(holder)
    } catch (err) {
      log(`p2pd: cannot ask the FUSE session holder for its mounts: ${(err as Error).message}`)
      return
    }
    await Promise.all(found.filter((h) => (h.meta as Partial<MountMeta>)?.kind === KIND).map((h) => resume(h)))
  })()

  const refuseWhileStopping = () => {
    if (stopping) {
      throw Object.assign(new Error('p2pd is stopping'), { name: 'Stopping', status: 503, hint: 'ask the next p2pd' })
    }
  }

  /** Serves a kept mount again, at once: its readers have waited since the last p2pd went away. */
  async function resume(h: HeldMountInfo): Promise<void> {
    const meta = h.meta as Partial<MountMeta> | undefined
    try {
      if (typeof meta?.image !== 'string' || typeof meta.digest !== 'string') throw new Error('no image recorded')
      const image = await reopen(meta.image, meta.digest)
      const held: Held = {
        served: undefined as unknown as ServedMount,
        owner: h.owner ?? { uid: 0, gid: 0 },
        image: meta.image,
        digest: meta.digest,
        ...(meta.client !== undefined && { client: meta.client }),
        failures: []
      }
      held.served = await resumeMount({ image, fetcher: node.fetcher, holder, held: h, onError: failure(held) })
      mounts.set(h.mountpoint, held)
      log(`p2pd: serving ${meta.image} at ${h.mountpoint} again (${h.session.pending} requests waited)`)
      watchClient(h.mountpoint, held)
    } catch (err) {
      log(`p2pd: cannot serve the mount at ${h.mountpoint} again (${(err as Error).message}): unmounting it`)
      await discardMount(holder, h).catch((e: Error) => log(`p2pd: unmounting ${h.mountpoint} failed: ${e.message}`))
    }
  }

  /** The same image by digest; from what the store kept of the reference when the registry cannot be reached. */
  async function reopen(image: string, digest: string) {
    const ref = parseReference(image)
    const pinned = makeReference({ registry: ref.registry, repository: ref.repository, digest }).toString()
    try {
      return await node.openImage(pinned)
    } catch (err) {
      const named = await node.openImage(image).catch(() => undefined)
      if (named?.digest === digest) return named
      throw err
    }
  }

  /** A mount served again ends when its p2p-mount is gone before it came back for it. */
  function watchClient(mountpoint: string, held: Held): void {
    const client = held.client
    if (client === undefined) return
    const check = async () => {
      if (held.stream !== undefined || held.ending !== undefined || stopping) return
      if (await alive(client)) return
      log(`p2pd: the p2p-mount (pid ${client.pid}) of ${mountpoint} is gone: unmounting it`)
      await end(mountpoint, held).catch((e: Error) => log(`p2pd: unmounting ${mountpoint} failed: ${e.message}`))
    }
    held.watch = setInterval(() => void check(), 1000)
    held.watch.unref()
    void check()
  }

  control.route('POST', /\/mount/, ({ body, caller, signal }) => {
    const req = parseRequest(body)
    if (req.resume === true) return resumeEvents(req, caller, signal)
    if (mounts.has(req.mountpoint)) {
      return Promise.reject(
        Object.assign(new Error(`p2pd already serves a mount at ${req.mountpoint}`), {
          name: 'MountBusy',
          status: 409,
          hint: `unmount it first: p2p-mount --unmount ${req.mountpoint}`
        })
      )
    }
    return mountEvents(req, caller, signal)
  })

  // What p2pd serves now: each mount, its image, its owner, and how its stored files are read.
  control.route('GET', /\/mounts/, async () =>
    [...mounts.entries()].map(([mountpoint, h]) => ({
      mountpoint,
      image: h.image,
      digest: h.digest,
      uid: h.owner.uid,
      fuse: h.served.fuse?.() ?? { mode: 'off', backingFiles: 0 }
    }))
  )

  control.route('POST', /\/unmount/, async ({ body, caller }) => {
    const mountpoint = (body as { mountpoint?: unknown } | undefined)?.mountpoint
    await resumed
    const mount = typeof mountpoint === 'string' ? mounts.get(mountpoint) : undefined
    if (mount === undefined) return { unmounted: false }
    if (caller.uid !== 0 && caller.uid !== mount.owner.uid) {
      throw Object.assign(new Error(`the mount at ${mountpoint} belongs to uid ${mount.owner.uid}, not to you`), {
        name: 'Forbidden',
        status: 403,
        hint: 'only its owner or root can unmount it'
      })
    }
    mount.stream?.release()
    await end(mountpoint as string, mount)
    return { unmounted: true }
  })

  async function* mountEvents(req: MountRequest, caller: Caller, signal: AbortSignal): AsyncGenerator<MountEvent> {
    let stale: string | undefined
    const image = await node.openImage(req.image, {
      signal,
      onStale: (message) => {
        stale = message
      }
    })
    refuseWhileStopping()
    if (stale !== undefined) yield { type: 'warning', message: stale }
    yield { type: 'opened', image: req.image, digest: image.digest, layers: image.layers.length }
    const owner = { uid: caller.uid, gid: caller.gid }
    const held: Held = {
      served: undefined as unknown as ServedMount,
      owner,
      image: req.image,
      digest: image.digest,
      ...(await clientOf(caller)),
      failures: []
    }
    held.served = await serveMount(
      {
        image,
        fetcher: node.fetcher,
        mountpoint: req.mountpoint,
        onError: failure(held),
        ...(req.writable === true && { writableDir: await writableDir(init.dataDir, req.mountpoint, image.digest) }),
        ...(req.record !== undefined && { recordFile: req.record }),
        // The mountpoint and the record's directory must be the caller's: p2pd mounts and writes as root.
        policy: { caller: owner, protect },
        ...(init.passthrough === false && { fuse: { passthrough: false } }),
        holder,
        meta: metaOf(held)
      },
      { signal }
    )
    mounts.set(req.mountpoint, held)
    // No prefetch of the prioritized files here, unlike embedded p2p-mount: measured, it made ten cold nodes
    // starting an image at once flood each other's homes (registry egress 0.19x -> 0.63x of ten nodes alone, p50
    // 13.6 -> 17.5 s), and gained nothing with a warm peer. Reads and read-ahead fetch what the workload wants.
    yield { type: 'mounted', mountpoint: req.mountpoint }
    yield* hold(req.mountpoint, held, signal)
  }

  /** A p2p-mount whose p2pd went away asks for its mount again. */
  async function* resumeEvents(req: MountRequest, caller: Caller, signal: AbortSignal): AsyncGenerator<MountEvent> {
    await resumed
    refuseWhileStopping()
    const held = mounts.get(req.mountpoint)
    if (held === undefined || held.ending !== undefined) {
      throw Object.assign(new Error(`p2pd holds no mount at ${req.mountpoint} any more`), {
        name: 'MountGone',
        status: 404,
        hint: `it ended while p2pd was away; if ${req.mountpoint} is left stale, run 'p2p-mount --unmount ${req.mountpoint}'`
      })
    }
    if (caller.uid !== 0 && caller.uid !== held.owner.uid) {
      throw Object.assign(new Error(`the mount at ${req.mountpoint} belongs to uid ${held.owner.uid}, not to you`), {
        name: 'Forbidden',
        status: 403
      })
    }
    const { client } = await clientOf(caller)
    const same = client !== undefined && client.pid === held.client?.pid && client.start === held.client.start
    if ((held.stream !== undefined && !same) || held.image !== req.image) {
      throw Object.assign(new Error(`p2pd serves ${held.image} at ${req.mountpoint} for another p2p-mount`), {
        name: 'MountBusy',
        status: 409
      })
    }
    // The same p2p-mount again (its connection broke, and this p2pd has not noticed yet): the new stream holds it.
    held.stream?.handOver()
    if (client !== undefined && (client.pid !== held.client?.pid || client.start !== held.client.start)) {
      held.client = client
      await held.served.update?.(metaOf(held)).catch(() => {})
    }
    yield { type: 'resumed', mountpoint: req.mountpoint }
    yield* hold(req.mountpoint, held, signal)
  }

  /**
   * The mount stays while its p2p-mount's stream is open, passing on read errors. It ends when p2p-mount asks
   * (`/unmount`) or goes away; not when p2pd stops (`close`): then the holder keeps it for the next p2pd.
   */
  async function* hold(mountpoint: string, held: Held, signal: AbortSignal): AsyncGenerator<MountEvent> {
    let released = false
    let handedOver = false
    let wake = () => {}
    const woken = () =>
      new Promise<void>((resolve) => {
        wake = resolve
        setTimeout(resolve, 5000).unref()
      })
    const stream = {
      release() {
        released = true
        wake()
      },
      wake: () => wake(),
      handOver() {
        handedOver = true
        wake()
      }
    }
    held.stream = stream
    clearInterval(held.watch)
    const onAbort = () => wake()
    signal.addEventListener('abort', onAbort, { once: true })
    const done = Promise.withResolvers<void>()
    streams.add(done.promise)
    let keep = false
    try {
      while (!signal.aborted && !released && !stopping && !handedOver) {
        await woken()
        if (!handedOver) yield* held.failures.splice(0)
      }
      if (handedOver) {
        keep = true
        return
      }
      keep = stopping && !released
      if (keep) {
        yield {
          type: 'detached',
          message: `p2pd is stopping: the mount at ${mountpoint} stays, held for the next p2pd`
        }
        return
      }
    } finally {
      signal.removeEventListener('abort', onAbort)
      if (held.stream === stream) held.stream = undefined
      streams.delete(done.promise)
      done.resolve()
      if (!keep) await end(mountpoint, held)
    }
    yield { type: 'result', unmounted: mountpoint }
  }

  return {
    resumed,
    async close() {
      stopping = true
      await resumed
      for (const held of mounts.values()) {
        clearInterval(held.watch)
        held.stream?.wake()
      }
      // Each stream says `detached` before the control server ends it.
      await Promise.race([Promise.allSettled([...streams]), new Promise((r) => setTimeout(r, 5000).unref())])
      await Promise.allSettled([...mounts.values()].map((held) => held.ending ?? held.served.detach?.()))
      await holder.detach()
    }
  }
}

/** The p2p-mount process asking (SO_PEERCRED's pid), with its start time from /proc. */
async function clientOf(caller: Caller & { pid?: number }): Promise<{ client?: ClientProcess }> {
  if (caller.pid === undefined || caller.pid <= 0) return {}
  const start = await startTime(caller.pid)
  return start === undefined ? {} : { client: { pid: caller.pid, start } }
}

async function alive(client: ClientProcess): Promise<boolean> {
  return (await startTime(client.pid)) === client.start
}

/** Field 22 of /proc/PID/stat (after the command, which may hold spaces and parentheses). */
async function startTime(pid: number): Promise<string | undefined> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined)
  if (stat === undefined) return undefined
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19]
}

function parseRequest(body: unknown): MountRequest {
  const b = body as Partial<MountRequest> | undefined
  // Normalised too: p2p-mount resolves the caller's path, and serveMount refuses `..`, `.` and `//`.
  const absolute = (p: unknown) => typeof p === 'string' && p.startsWith('/')
  if (typeof b?.image !== 'string' || b.image === '' || !absolute(b.mountpoint)) {
    throw Object.assign(new Error('POST /mount needs {"image": "REF", "mountpoint": "/ABSOLUTE/PATH"}'), {
      name: 'BadRequest',
      status: 400
    })
  }
  if (b.record !== undefined && !absolute(b.record)) {
    throw Object.assign(new Error('"record" must be an absolute path'), { name: 'BadRequest', status: 400 })
  }
  return {
    image: b.image,
    mountpoint: b.mountpoint!,
    ...(b.writable === true && { writable: true }),
    ...(b.record !== undefined && { record: b.record }),
    ...(b.resume === true && { resume: true })
  }
}
