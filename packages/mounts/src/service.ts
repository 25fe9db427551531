// The Mounts service: a user's mount of an image (p2p-mount's), served by p2pd for a local caller or by p2p-mount
// itself (embedded). One set of steps for both: open the image, check and hold the mountpoint, serve the FUSE
// mount (through the session holder when there is one, so that it outlives this process), the writable overlay,
// the read record, passthrough; list, unmount, and serve again after a restart what the holder kept.

import type { AbortOptions } from '@strata/base'
import type { Image } from '@strata/fetcher'
import {
  type Caller,
  createFuseHolder,
  discardMount,
  type FuseHolder,
  type HeldMountInfo,
  heldMounts,
  type ReadFailure,
  resumeMount,
  type ServedMount,
  serveMount
} from '@strata/fs'
import { type ClientProcess, clientOf, sameClient } from './clients.js'
import { openPinned } from './pinned.js'
import { refusal } from './refusal.js'
import type { ImageSource, OpenProgress } from './source.js'
import { type Stream, watchClient } from './stream.js'
import { writableDir } from './writable-dir.js'

export interface MountsInit {
  source: ImageSource
  /** Writable mounts keep their layers in `DATA/mounts` (see writableDirOf). */
  dataDir: string
  /** The FUSE session holder's directory: mounts then outlive this process (p2pd: `DATA/fuse`). None: they die with it. */
  holderDir?: string
  /** Paths no mount may cover (p2pd's data dir and socket). */
  protect?: string[]
  /** FUSE passthrough for files held whole in the store, where the kernel offers it (default on). */
  passthrough?: boolean
  /**
   * Fetch the prioritized files of eStargz layers in the background once mounted (embedded p2p-mount). p2pd does
   * not: measured, it made ten cold nodes starting an image at once flood each other's homes (registry egress
   * 0.19x -> 0.63x of ten nodes alone, p50 13.6 -> 17.5 s), and gained nothing with a warm peer.
   */
  prefetch?: boolean
  log?: (message: string) => void
}

/** A mount asked for. Paths are absolute (p2pd's working directory is not the caller's). */
export interface MountRequest {
  image: string
  mountpoint: string
  writable?: boolean
  record?: string
  /** Serve again the mount this client had from a p2pd that went away (the holder kept it): never a new one. */
  resume?: boolean
}

/** Who asks: uid and gid (SO_PEERCRED in p2pd, this process when embedded), and the process, when known. */
export interface Requester extends Caller {
  pid?: number
}

/** What happens to a mount, in order, while its request holds it. */
export type MountEvent =
  /** What opening the image says as it goes (embedded p2p-mount's source says it; p2pd's node does not). */
  | { type: 'progress'; event: OpenProgress }
  /** The image is the one the reference named before: the registry could not be reached. */
  | { type: 'warning'; message: string }
  | { type: 'opened'; image: string; digest: string; layers: number }
  | { type: 'mounted'; mountpoint: string }
  /** The answer to a `resume`: the mount is served again (it kept working meanwhile, reads waited). */
  | { type: 'resumed'; mountpoint: string }
  /** A read failed and the reader got EIO. */
  | { type: 'read-error'; failure: ReadFailure }
  | { type: 'prefetched'; bytes: number; ms: number }
  | { type: 'prefetch-failed'; message: string }
  /** This process is stopping: the mount stays, held for the next one; the events end without a result. */
  | { type: 'detached'; message: string }
  | { type: 'result'; unmounted: string }

/** A mount served now (`GET /mounts`): its image, its owner, and how its stored files are read. */
export interface MountInfo {
  mountpoint: string
  image: string
  digest: string
  uid: number
  fuse: { mode: string; backingFiles: number }
}

export interface Mounts {
  /** The mounts the holder kept from an earlier process, served again (or ended); resolves when done. */
  readonly resumed: Promise<void>
  /**
   * Mounts (or, with `resume`, takes up again) and holds the mount while the events are read and the signal is
   * not aborted; then unmounts. Throws at once when a mount is already served at the mountpoint.
   */
  mount(request: MountRequest, caller: Requester, options?: AbortOptions): AsyncGenerator<MountEvent>
  list(): MountInfo[]
  /** Ends the mount at `mountpoint` (false: there is none); only its owner or root may. */
  unmount(mountpoint: string, caller: Caller): Promise<boolean>
  /**
   * This process is stopping: with a holder, the mounts stay, held for the next process, and their clients are
   * told (`detached`) and wait for it.
   */
  close(): Promise<void>
}

/** What the holder keeps with each mount (fs keeps the paths and the owner); `kind` tells these from others'. */
interface MountMeta {
  kind: typeof KIND
  image: string
  digest: string
  client?: ClientProcess
}

const KIND = 'p2p-mount'

interface Held {
  served: ServedMount
  owner: Caller
  image: string
  digest: string
  /** The client whose request holds the mount: when it is gone, the mount ends. */
  client?: ClientProcess
  /** That client's open stream, while there is one. */
  stream?: Stream
  events: MountEvent[]
  /** Until the client of a mount served again comes back: is it still alive? */
  watch?: NodeJS.Timeout
  ending?: Promise<void>
}

export function createMounts(init: MountsInit): Mounts {
  const log = init.log ?? (() => {})
  const mounts = new Map<string, Held>()
  const holder = init.holderDir !== undefined ? createFuseHolder(init.holderDir) : undefined
  const streams = new Set<Promise<void>>()
  let stopping = false

  const note = (held: Held, event: MountEvent) => {
    held.events.push(event)
    held.stream?.wake()
  }
  const failure = (held: Held) => (f: ReadFailure) => note(held, { type: 'read-error', failure: f })
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
    if (holder === undefined) return
    let found: HeldMountInfo[]
    try {
      found = await heldMounts(holder)
    } catch (err) {
      log(`p2pd: cannot ask the FUSE session holder for its mounts: ${(err as Error).message}`)
      return
    }
    await Promise.all(found.filter((h) => (h.meta as Partial<MountMeta>)?.kind === KIND).map((h) => resume(h, holder)))
  })()

  const refuseWhileStopping = () => {
    if (stopping) throw refusal('Stopping', 503, 'p2pd is stopping', 'ask the next p2pd')
  }

  /** Serves a kept mount again, at once: its readers have waited since the last process went away. */
  async function resume(h: HeldMountInfo, holder: FuseHolder): Promise<void> {
    const meta = h.meta as Partial<MountMeta> | undefined
    try {
      if (typeof meta?.image !== 'string' || typeof meta.digest !== 'string') throw new Error('no image recorded')
      const image = await openPinned(init.source, meta.image, meta.digest)
      const held: Held = {
        served: undefined as unknown as ServedMount,
        owner: h.owner ?? { uid: 0, gid: 0 },
        image: meta.image,
        digest: meta.digest,
        ...(meta.client !== undefined && { client: meta.client }),
        events: []
      }
      held.served = await resumeMount({
        image,
        fetcher: init.source.fetcher,
        holder,
        held: h,
        onError: failure(held),
        ...(init.passthrough === false && { fuse: { passthrough: false } })
      })
      mounts.set(h.mountpoint, held)
      log(`p2pd: serving ${meta.image} at ${h.mountpoint} again (${h.session.pending} requests waited)`)
      watch(h.mountpoint, held)
    } catch (err) {
      log(`p2pd: cannot serve the mount at ${h.mountpoint} again (${(err as Error).message}): unmounting it`)
      await discardMount(holder, h).catch((e: Error) => log(`p2pd: unmounting ${h.mountpoint} failed: ${e.message}`))
    }
  }

  /** A mount served again ends when its client is gone before it came back for it. */
  function watch(mountpoint: string, held: Held): void {
    if (held.client === undefined) return
    held.watch = watchClient(
      held.client,
      () => held.stream !== undefined || held.ending !== undefined || stopping,
      async () => {
        log(`p2pd: the p2p-mount (pid ${held.client?.pid}) of ${mountpoint} is gone: unmounting it`)
        await end(mountpoint, held).catch((e: Error) => log(`p2pd: unmounting ${mountpoint} failed: ${e.message}`))
      }
    )
  }

  async function* mountEvents(req: MountRequest, caller: Requester, signal: AbortSignal): AsyncGenerator<MountEvent> {
    let stale: string | undefined
    const image = yield* open(req.image, signal, (message) => {
      stale = message
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
      events: []
    }
    held.served = await serveMount(
      {
        image,
        fetcher: init.source.fetcher,
        mountpoint: req.mountpoint,
        onError: failure(held),
        ...(req.writable === true && { writableDir: await writableDir(init.dataDir, req.mountpoint, image.digest) }),
        ...(req.record !== undefined && { recordFile: req.record }),
        // The mountpoint and the record's directory must be the caller's: p2pd mounts and writes as root.
        policy: { caller: owner, protect: init.protect ?? [] },
        ...(init.passthrough === false && { fuse: { passthrough: false } }),
        ...(holder !== undefined && { holder, meta: metaOf(held) })
      },
      { signal }
    )
    mounts.set(req.mountpoint, held)
    yield { type: 'mounted', mountpoint: req.mountpoint }
    if (init.prefetch === true) prefetch(held, image, signal)
    yield* hold(req.mountpoint, held, signal)
  }

  /** Opens the image, passing on its progress as it comes (the source's `onProgress`). */
  async function* open(
    ref: string,
    signal: AbortSignal,
    onStale: (message: string) => void
  ): AsyncGenerator<MountEvent, Image> {
    const progress: MountEvent[] = []
    let wake = () => {}
    const opening = init.source.openImage(ref, {
      signal,
      onStale,
      onProgress: (event) => {
        progress.push({ type: 'progress', event })
        wake()
      }
    })
    let settled = false
    const done = opening.then(
      () => {
        settled = true
      },
      () => {
        settled = true
      }
    )
    while (!settled) {
      if (progress.length === 0) {
        await Promise.race([
          done,
          new Promise<void>((resolve) => {
            wake = resolve
          })
        ])
      }
      yield* progress.splice(0)
    }
    yield* progress.splice(0)
    return opening
  }

  /** The prioritized files of eStargz layers, in the background: the workload will want them first. */
  function prefetch(held: Held, image: Image, signal: AbortSignal): void {
    const bytes = image.layers.reduce((n, l) => n + l.toc.prioritized.reduce((m, e) => m + e.size, 0), 0)
    if (bytes === 0) return
    const started = Date.now()
    init.source.fetcher.prefetch(image, { signal }).then(
      () => note(held, { type: 'prefetched', bytes, ms: Date.now() - started }),
      (err: Error) => {
        if (!signal.aborted) note(held, { type: 'prefetch-failed', message: err.message })
      }
    )
  }

  /** A client whose p2pd went away asks for its mount again. */
  async function* resumeEvents(req: MountRequest, caller: Requester, signal: AbortSignal): AsyncGenerator<MountEvent> {
    await resumed
    refuseWhileStopping()
    const held = mounts.get(req.mountpoint)
    if (held === undefined || held.ending !== undefined) {
      throw refusal(
        'MountGone',
        404,
        `p2pd holds no mount at ${req.mountpoint} any more`,
        `it ended while p2pd was away; if ${req.mountpoint} is left stale, run 'p2p-mount --unmount ${req.mountpoint}'`
      )
    }
    if (caller.uid !== 0 && caller.uid !== held.owner.uid) {
      throw refusal('Forbidden', 403, `the mount at ${req.mountpoint} belongs to uid ${held.owner.uid}, not to you`)
    }
    const { client } = await clientOf(caller)
    const same = sameClient(client, held.client)
    if ((held.stream !== undefined && !same) || held.image !== req.image) {
      throw refusal('MountBusy', 409, `p2pd serves ${held.image} at ${req.mountpoint} for another p2p-mount`)
    }
    // The same client again (its connection broke, and this p2pd has not noticed yet): the new stream holds it.
    held.stream?.handOver()
    if (client !== undefined && !same) {
      held.client = client
      await held.served.update?.(metaOf(held)).catch(() => {})
    }
    yield { type: 'resumed', mountpoint: req.mountpoint }
    yield* hold(req.mountpoint, held, signal)
  }

  /**
   * The mount stays while its request's events are read, passing on read errors. It ends when its client asks
   * (`unmount`), aborts or goes away; not when this process stops (`close`): then the holder keeps it.
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
    const stream: Stream = {
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
        // What happened before this stream held the mount (read errors while p2pd was away) comes first.
        if (held.events.length === 0) await woken()
        if (!handedOver) yield* held.events.splice(0)
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
    mount(req, caller, options) {
      const signal = options?.signal ?? new AbortController().signal
      if (req.resume === true) return resumeEvents(req, caller, signal)
      if (mounts.has(req.mountpoint)) {
        throw refusal(
          'MountBusy',
          409,
          `p2pd already serves a mount at ${req.mountpoint}`,
          `unmount it first: p2p-mount --unmount ${req.mountpoint}`
        )
      }
      return mountEvents(req, caller, signal)
    },
    list: () =>
      [...mounts.entries()].map(([mountpoint, h]) => ({
        mountpoint,
        image: h.image,
        digest: h.digest,
        uid: h.owner.uid,
        fuse: h.served.fuse?.() ?? { mode: 'off', backingFiles: 0 }
      })),
    async unmount(mountpoint, caller) {
      await resumed
      const mount = mounts.get(mountpoint)
      if (mount === undefined) return false
      if (caller.uid !== 0 && caller.uid !== mount.owner.uid) {
        throw refusal(
          'Forbidden',
          403,
          `the mount at ${mountpoint} belongs to uid ${mount.owner.uid}, not to you`,
          'only its owner or root can unmount it'
        )
      }
      mount.stream?.release()
      await end(mountpoint, mount)
      return true
    },
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
      await holder?.detach()
    }
  }
}
