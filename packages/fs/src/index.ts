// @strata/fs: FUSE: a merged read-only view of an image over the fetcher.
// buildTree merges the layers' TOCs; createOperations are the FUSE operations as plain functions;
// mountFuse serves them over /dev/fuse (the one place that speaks to the kernel); serveMount is the whole thing
// in one call.
export { type ErrnoCode, FsError, MountError, UnmountError, UnsafePathError } from './errors.js'
export { type FuseMountInit, forceUnmount, isMounted, type Mount, mountFuse } from './fuse.js'
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
  type ReadFile,
  type ReadStored,
  type Stat,
  type StatFs
} from './operations.js'
export { createReadRecorder, type ReadRecorder, type ReadRecorderInit } from './record.js'
export { type LayerReader, type ServedMount, type ServeMountInit, serveMount } from './serve.js'
export { buildTree, type Node, type NodeType, type Tree } from './tree.js'
