// p2pd's mount routes: the control API's face of the Mounts service (@strata/mounts), which does the mounting.
// This file only parses the requests and maps the service's events to the JSON lines of `POST /mount`, which
// p2p-mount and operators' scripts read: they stay as they are.
import { join } from 'node:path'
import { createMounts, type MountEvent as ServiceEvent } from '@strata/mounts'
import type { ControlServer, StrataNode } from '@strata/node'

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
 * The FUSE sessions are kept by the holder (`DATA/fuse`), not by p2pd: when p2pd stops (`close`) or dies, mounts
 * stay, reads wait, and the next p2pd serves them again at its start and answers what waited. p2p-mount resumes
 * its stream with `resume: true`; a mount whose p2p-mount died meanwhile is unmounted.
 */
export function addMountRoutes(
  control: ControlServer,
  node: StrataNode,
  init: { dataDir: string; socket: string; passthrough?: boolean; log?: (message: string) => void }
): MountRoutes {
  const mounts = createMounts({
    source: node,
    dataDir: init.dataDir,
    holderDir: join(init.dataDir, 'fuse'),
    // No mount may cover what p2pd itself needs: its store and its socket.
    protect: [init.dataDir, init.socket],
    ...(init.passthrough !== undefined && { passthrough: init.passthrough }),
    ...(init.log !== undefined && { log: init.log })
  })

  control.route('POST', /\/mount/, ({ body, caller, signal }) =>
    wire(mounts.mount(parseRequest(body), caller, { signal }))
  )
  // What p2pd serves now: each mount, its image, its owner, and how its stored files are read.
  control.route('GET', /\/mounts/, async () => mounts.list())
  control.route('POST', /\/unmount/, async ({ body, caller }) => {
    const mountpoint = (body as { mountpoint?: unknown } | undefined)?.mountpoint
    const unmounted = typeof mountpoint === 'string' && (await mounts.unmount(mountpoint, caller))
    return { unmounted }
  })
  return mounts
}

/**
 * The service's events as `POST /mount` has always sent them. p2pd's node reports no open progress, and p2pd
 * does not prefetch: those events are not sent.
 */
async function* wire(events: AsyncIterable<ServiceEvent>): AsyncGenerator<MountEvent> {
  for await (const e of events) {
    if (e.type === 'read-error') {
      const { path, layer, error } = e.failure
      yield { type: 'read-error', path, layer, message: error.message }
    } else if (e.type !== 'progress' && e.type !== 'prefetched' && e.type !== 'prefetch-failed') yield e
  }
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
