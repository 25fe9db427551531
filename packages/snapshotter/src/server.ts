// containerd.services.snapshots.v1.Snapshots over gRPC on a Unix socket: what containerd's proxy snapshotter
// plugin dials. Messages come from the vendored .proto files (proto/containerd); every method maps onto the
// Snapshotter, and errors carry the gRPC status containerd acts on.
import { chmod, lstat, mkdir, rm } from 'node:fs/promises'
import { dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import {
  loadPackageDefinition,
  Server,
  ServerCredentials,
  type ServerUnaryCall,
  type ServerWritableStream,
  type ServiceDefinition,
  type sendUnaryData,
  status
} from '@grpc/grpc-js'
import { loadSync } from '@grpc/proto-loader'
import { SnapshotError } from './errors.js'
import type { MountSpec, SnapshotInfo, Snapshotter } from './snapshotter.js'
import type { Kind } from './state.js'

const PROTO_DIR = fileURLToPath(new URL('../proto', import.meta.url))

interface Timestamp {
  seconds: number
  nanos: number
}

interface WireInfo {
  name: string
  parent: string
  kind: 'UNKNOWN' | 'VIEW' | 'ACTIVE' | 'COMMITTED'
  created_at: Timestamp | null
  updated_at: Timestamp | null
  labels: Record<string, string>
}

interface WireMount {
  type: string
  source: string
  target: string
  options: string[]
}

let service: ServiceDefinition | undefined

/** The Snapshots service definition, loaded once. */
export function snapshotsService(): ServiceDefinition {
  if (service === undefined) {
    const def = loadSync('containerd/snapshots.proto', {
      includeDirs: [PROTO_DIR],
      keepCase: true,
      longs: Number,
      enums: String,
      defaults: true
    })
    // biome-ignore lint/suspicious/noExplicitAny: generated from the .proto at run time
    const pkg = loadPackageDefinition(def) as any
    service = pkg.containerd.services.snapshots.v1.Snapshots.service as ServiceDefinition
  }
  return service
}

const KINDS: Record<Kind, WireInfo['kind']> = { view: 'VIEW', active: 'ACTIVE', committed: 'COMMITTED' }

const toTimestamp = (ms: number): Timestamp => ({ seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1_000_000 })

function toWire(info: SnapshotInfo): WireInfo {
  return {
    name: info.name,
    parent: info.parent,
    kind: KINDS[info.kind],
    created_at: toTimestamp(info.created),
    updated_at: toTimestamp(info.updated),
    labels: info.labels
  }
}

const toMounts = (mounts: MountSpec[]): WireMount[] => mounts.map((m) => ({ ...m, target: '' }))

export interface SnapshotsServer {
  readonly socket: string
  close(): Promise<void>
}

/**
 * Serves `snapshotter` on the Unix socket `socket` (mode 0600: containerd runs as root, nobody else may change
 * snapshots). A stale socket file from a killed p2pd is replaced; anything else at the path is refused.
 */
export async function serveSnapshots(
  snapshotter: Snapshotter,
  socket: string,
  log: (message: string) => void = () => {}
): Promise<SnapshotsServer> {
  await mkdir(dirname(socket), { recursive: true, mode: 0o755 })
  const existing = await lstat(socket).catch(() => undefined)
  if (existing !== undefined) {
    if (!existing.isSocket()) throw new Error(`${socket} exists and is not a socket: remove it or choose another path`)
    await rm(socket)
  }
  const server = new Server()
  server.addService(snapshotsService(), handlers(snapshotter, log))
  await new Promise<void>((resolve, reject) =>
    server.bindAsync(`unix:${socket}`, ServerCredentials.createInsecure(), (err) =>
      err === null ? resolve() : reject(err)
    )
  )
  await chmod(socket, 0o600)
  return {
    socket,
    close: () =>
      new Promise<void>((resolve) => {
        const force = setTimeout(() => {
          server.forceShutdown()
          resolve()
        }, 5_000)
        force.unref()
        server.tryShutdown(() => {
          clearTimeout(force)
          resolve()
        })
      })
  }
}

type Call<Req> = ServerUnaryCall<Req, unknown>

function handlers(sn: Snapshotter, log: (message: string) => void) {
  const unary =
    <Req>(method: string, fn: (req: Req) => Promise<unknown> | unknown) =>
    (call: Call<Req>, callback: sendUnaryData<unknown>) => {
      Promise.resolve()
        .then(() => fn(call.request))
        .then(
          (reply) => callback(null, reply ?? {}),
          (err: unknown) => callback(toStatus(method, err, log))
        )
    }
  return {
    Prepare: unary<{ key: string; parent: string; labels: Record<string, string> }>('Prepare', async (r) => ({
      mounts: toMounts(await sn.prepare(r.key, r.parent, r.labels ?? {}))
    })),
    View: unary<{ key: string; parent: string; labels: Record<string, string> }>('View', async (r) => ({
      mounts: toMounts(await sn.view(r.key, r.parent, r.labels ?? {}))
    })),
    Mounts: unary<{ key: string }>('Mounts', async (r) => ({ mounts: toMounts(await sn.mounts(r.key)) })),
    Commit: unary<{ name: string; key: string; labels: Record<string, string> }>('Commit', async (r) => {
      await sn.commit(r.name, r.key, r.labels ?? {})
      return {}
    }),
    Remove: unary<{ key: string }>('Remove', async (r) => {
      await sn.remove(r.key)
      return {}
    }),
    Stat: unary<{ key: string }>('Stat', (r) => ({ info: toWire(sn.stat(r.key)) })),
    Update: unary<{ info: WireInfo | null; update_mask: { paths: string[] } | null }>('Update', async (r) => ({
      info: toWire(
        await sn.update({ name: r.info?.name ?? '', labels: r.info?.labels ?? {} }, r.update_mask?.paths ?? [])
      )
    })),
    List: (call: ServerWritableStream<{ filters: string[] }, unknown>) => {
      try {
        const all = sn.list(call.request.filters ?? [])
        // A message per hundred: a long list must not exceed the message size limit.
        for (let i = 0; i < all.length; i += 100) call.write({ info: all.slice(i, i + 100).map(toWire) })
        call.end()
      } catch (err) {
        call.destroy(Object.assign(new Error((err as Error).message), toStatus('List', err, log)))
      }
    },
    Usage: unary<{ key: string }>('Usage', (r) => sn.usage(r.key)),
    Cleanup: unary<unknown>('Cleanup', async () => {
      await sn.cleanup()
      return {}
    })
  }
}

/** The gRPC status of a failure; unexpected ones (not a SnapshotError) are logged too. */
function toStatus(method: string, err: unknown, log: (message: string) => void): { code: number; details: string } {
  if (err instanceof SnapshotError) return { code: err.status, details: err.message }
  const message = (err as Error)?.message ?? String(err)
  log(`snapshotter: ${method} failed: ${message}`)
  return { code: status.UNKNOWN, details: message }
}
