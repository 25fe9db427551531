// @strata/mounts: mounting as a service, for p2pd's control API, embedded p2p-mount and the containerd
// snapshotter alike. It is given where images come from and how they are read (an ImageSource: p2pd's node, or a
// local fetcher), and owns the steps: open the image, check and hold the mountpoint, serve the FUSE mount through
// the session holder (so that it outlives p2pd), writable overlays, the read record, passthrough, list, unmount,
// serve again after a restart; and the shared merged roots of image chains (MergedMounts).
export { type ImageChain, MergedMounts, type MergedMountsInit, MountUnavailableError } from './merged.js'
export {
  createMounts,
  type MountEvent,
  type MountInfo,
  type MountRequest,
  type Mounts,
  type MountsInit,
  type Requester
} from './service.js'
export type { ImageSource, MountReader, OpenImageOptions, OpenProgress } from './source.js'
export { WritableLayerInUseError, writableDirOf } from './writable-dir.js'
