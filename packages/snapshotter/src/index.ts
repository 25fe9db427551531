// @strata/snapshotter: containerd's snapshots API as a proxy plugin of p2pd. Without labels it is an overlay
// snapshotter (containerd unpacks layers into the mounts it returns); when Prepare's labels name the image and
// layer (CRI, ctr-remote, the 2.x transfer service), the layer becomes a remote snapshot served by one lazy
// merged-root FUSE mount per image chain, shared by every container of that image.
export { type ContainerdConfigOptions, containerdConfig } from './config.js'
export {
  MountUnavailable,
  SnapshotError,
  SnapshotExists,
  SnapshotInvalid,
  SnapshotNotFound,
  SnapshotPrecondition,
  SnapshotterRootError,
  Status
} from './errors.js'
export { parseFilters } from './filters.js'
export {
  CRI_LABELS,
  chainIds,
  type ImageOpener,
  REMOTE_LABEL,
  remoteRequest,
  SNAPSHOT_REF_LABEL,
  STARGZ_LABELS
} from './remote.js'
export { type SnapshotsServer, serveSnapshots, snapshotsService } from './server.js'
export {
  type MountSpec,
  type SnapshotInfo,
  Snapshotter,
  type SnapshotterInit,
  type Usage
} from './snapshotter.js'
export { type SnapshotterService, type StartSnapshotterInit, startSnapshotter } from './start.js'
