// @strata/fs: FUSE: a merged read-only view of an image over the fetcher.
// buildTree merges the layers' TOCs; createOperations are the FUSE operations as plain functions;
// mountFuse serves them over /dev/fuse (the one place that speaks to the kernel); serveMount is the whole thing
// in one call. createFuseHolder: the process that keeps p2pd's FUSE sessions across its restarts (resumeMount).
export { type ErrnoCode, FsError, MountError, UnmountError, UnsafePathError } from './errors.js'
export { type FuseMountInit, type Mount, mountFuse } from './fuse.js'
export { forceUnmount, isMounted } from './fuse-mount.js'
export {
  canServeDirectly,
  createFuseHolder,
  type FuseHolder,
  type FuseHolderInit,
  fuseReadMode,
  type HeldSession
} from './held.js'
export { diffTree, OPAQUE_XATTR, overlayTOC } from './layer-diff.js'
export {
  decodeRef,
  infoOf,
  type LayerStore,
  type LayerStoreInit,
  type LayerStoreSource,
  type LayerStoreStats,
  mountLayerStore,
  type StoreImage,
  type StoreLayer
} from './layer-store.js'
export {
  type Caller,
  type HeldDirectory,
  holdMountpoint,
  type MountpointPolicy,
  RecordFileError,
  thisProcess
} from './mountpoint.js'
export {
  createOperations,
  type Operations,
  type OperationsInit,
  type ReadFailure,
  type ReadRange,
  type Stat,
  type StatFs
} from './operations.js'
export { createReadRecorder, type ReadRecorder, type ReadRecorderInit } from './record.js'
export {
  discardMount,
  type HeldMountInfo,
  heldMounts,
  type LayerReader,
  type ResumeMountInit,
  resumeMount,
  type ServedMount,
  type ServeMountInit,
  serveMount
} from './serve.js'
export { buildTree, type Node, type NodeType, type Tree } from './tree.js'
