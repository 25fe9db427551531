import { type SnapshotsServer, serveSnapshots } from './server.js'
import { Snapshotter, type SnapshotterInit } from './snapshotter.js'

export interface StartSnapshotterInit extends SnapshotterInit {
  /** The Unix socket containerd's proxy plugin dials. */
  socket: string
}

/** A running snapshotter: the records and mounts, and the gRPC server in front of them. */
export interface SnapshotterService {
  readonly socket: string
  readonly snapshotter: Snapshotter
  /** Stops answering; the records stay for the next start, and the merged roots with the FUSE session holder. */
  close(): Promise<void>
}

/** Opens the snapshotter in `init.root` and serves it on `init.socket`. */
export async function startSnapshotter(init: StartSnapshotterInit): Promise<SnapshotterService> {
  const snapshotter = await Snapshotter.open(init)
  let server: SnapshotsServer
  try {
    server = await serveSnapshots(snapshotter, init.socket, init.log)
  } catch (err) {
    await snapshotter.close()
    throw err
  }
  return {
    socket: init.socket,
    snapshotter,
    async close() {
      await server.close()
      await snapshotter.close()
    }
  }
}
