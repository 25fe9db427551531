import { type Caller, type ServedMount, serveMount } from '@strata/fs'
import type { ControlServer, StrataNode } from '@strata/node'
import { writableDir } from './writable-dir.js'

/** What p2p-mount sends to `POST /mount`. Paths are absolute (the daemon's working directory is not the caller's). */
export interface MountRequest {
  image: string
  mountpoint: string
  writable?: boolean
  record?: string
}

/** Events of `POST /mount`, one JSON object a line. */
export type MountEvent =
  | { type: 'opened'; image: string; digest: string; layers: number }
  | { type: 'mounted'; mountpoint: string }
  | { type: 'read-error'; path: string; layer: number; message: string }
  | { type: 'warning'; message: string }
  | { type: 'result'; unmounted: string }

/**
 * Daemon mode of p2p-mount: p2pd serves the mount, so reads go through its fetcher (its store, then its
 * peers, then the registry). `POST /mount` mounts and holds the mount while the request stays open: when
 * p2p-mount asks `POST /unmount` or its connection goes away (it was killed), the mount is removed.
 * p2pd wires it with `addMountRoutes(control, node, { dataDir })`.
 */
export function addMountRoutes(
  control: ControlServer,
  node: StrataNode,
  init: { dataDir: string; socket: string }
): void {
  const mounts = new Map<string, { served: ServedMount; release: () => void; owner: Caller }>()
  // No mount may cover what p2pd itself needs: its store and its socket.
  const protect = [init.dataDir, init.socket]

  control.route('POST', /\/mount/, ({ body, caller, signal }) => {
    const req = parseRequest(body)
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

  control.route('POST', /\/unmount/, async ({ body, caller }) => {
    const mountpoint = (body as { mountpoint?: unknown } | undefined)?.mountpoint
    const mount = typeof mountpoint === 'string' ? mounts.get(mountpoint) : undefined
    if (mount === undefined) return { unmounted: false }
    if (caller.uid !== 0 && caller.uid !== mount.owner.uid) {
      throw Object.assign(new Error(`the mount at ${mountpoint} belongs to uid ${mount.owner.uid}, not to you`), {
        name: 'Forbidden',
        status: 403,
        hint: 'only its owner or root can unmount it'
      })
    }
    mount.release()
    await mount.served.unmount()
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
    if (stale !== undefined) yield { type: 'warning', message: stale }
    yield { type: 'opened', image: req.image, digest: image.digest, layers: image.layers.length }
    const failures: MountEvent[] = []
    const served = await serveMount(
      {
        image,
        fetcher: node.fetcher,
        mountpoint: req.mountpoint,
        onError: (f) => failures.push({ type: 'read-error', path: f.path, layer: f.layer, message: f.error.message }),
        ...(req.writable === true && { writableDir: await writableDir(init.dataDir, req.mountpoint, image.digest) }),
        ...(req.record !== undefined && { recordFile: req.record }),
        // The mountpoint and the record's directory must be the caller's: p2pd mounts and writes as root.
        policy: { caller: { uid: caller.uid, gid: caller.gid }, protect }
      },
      { signal }
    )
    let release = () => {}
    const released = new Promise<void>((resolve) => {
      release = resolve
    })
    mounts.set(req.mountpoint, { served, release, owner: caller })
    const onAbort = () => release()
    signal.addEventListener('abort', onAbort, { once: true })
    // No prefetch of the prioritized files here, unlike embedded p2p-mount: measured, it made ten cold nodes
    // starting an image at once flood each other's homes (registry egress 0.19x -> 0.63x of ten nodes alone, p50
    // 13.6 -> 17.5 s), and gained nothing with a warm peer. Reads and read-ahead fetch what the workload wants.
    try {
      yield { type: 'mounted', mountpoint: req.mountpoint }
      while (!signal.aborted) {
        const woke = await Promise.race([released.then(() => 'released' as const), tick(5000)])
        yield* failures.splice(0)
        if (woke === 'released') break
      }
    } finally {
      signal.removeEventListener('abort', onAbort)
      await served.unmount()
      mounts.delete(req.mountpoint)
    }
    yield { type: 'result', unmounted: req.mountpoint }
  }
}

const tick = (ms: number) => new Promise<'tick'>((resolve) => setTimeout(() => resolve('tick'), ms).unref())

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
    ...(b.record !== undefined && { record: b.record })
  }
}
