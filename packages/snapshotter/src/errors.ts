/**
 * The snapshotter's failure modes. Each carries the gRPC status code containerd maps to its own error kinds
 * (errdefs.FromGRPC): an unknown key must be NOT_FOUND, a taken one ALREADY_EXISTS, and so on, because
 * containerd decides what to do next by the code (a remote layer is ALREADY_EXISTS on purpose).
 */

/** gRPC status codes used here (the numbers are the wire values). */
import { StrataError } from '@strata/base'

export const Status = {
  INVALID_ARGUMENT: 3,
  NOT_FOUND: 5,
  ALREADY_EXISTS: 6,
  FAILED_PRECONDITION: 9,
  INTERNAL: 13,
  UNAVAILABLE: 14
} as const

export type StatusCode = (typeof Status)[keyof typeof Status]

/** An error answered to containerd with `status` as the gRPC code. */
export class SnapshotError extends StrataError {
  override name = 'SnapshotError'
  override readonly code: string = 'ERR_SNAPSHOT'
  constructor(
    readonly status: StatusCode,
    message: string,
    options?: { cause?: unknown }
  ) {
    super(message, options)
  }
}

/** No snapshot has that key (Stat, Mounts, Remove, Commit, a parent). */
export class SnapshotNotFound extends SnapshotError {
  override name = 'SnapshotNotFound'
  override readonly code = 'ERR_SNAPSHOT_NOT_FOUND'
  constructor(key: string, what = 'snapshot') {
    super(Status.NOT_FOUND, `${what} ${JSON.stringify(key)} does not exist`)
  }
}

/**
 * The key is taken. Prepare also answers this on purpose for a remote layer: the snapshot containerd wanted
 * (named by its `containerd.io/snapshot.ref` label) exists now, so it need not unpack the layer.
 */
export class SnapshotExists extends SnapshotError {
  override name = 'SnapshotExists'
  override readonly code = 'ERR_SNAPSHOT_EXISTS'
  constructor(key: string, why?: string) {
    super(
      Status.ALREADY_EXISTS,
      `snapshot ${JSON.stringify(key)} already exists${why !== undefined ? ` (${why})` : ''}`
    )
  }
}

/** The operation does not fit the snapshot's state: removing one with children, committing a committed one. */
export class SnapshotPrecondition extends SnapshotError {
  override name = 'SnapshotPrecondition'
  override readonly code = 'ERR_SNAPSHOT_PRECONDITION'
  constructor(message: string) {
    super(Status.FAILED_PRECONDITION, message)
  }
}

/** The request itself is wrong: an empty key, a filter that does not parse, a field that cannot change. */
export class SnapshotInvalid extends SnapshotError {
  override name = 'SnapshotInvalid'
  override readonly code = 'ERR_SNAPSHOT_INVALID'
  constructor(message: string) {
    super(Status.INVALID_ARGUMENT, message)
  }
}

/** A remote layer's merged-root mount cannot be made now (the image cannot be opened, FUSE failed). */
export class MountUnavailable extends SnapshotError {
  override name = 'MountUnavailable'
  override readonly code = 'ERR_SNAPSHOT_MOUNT_UNAVAILABLE'
  override readonly hint = "check p2pd's log for why the image could not be opened or mounted; containerd retries"
  constructor(message: string, options?: { cause?: unknown }) {
    super(Status.UNAVAILABLE, message, options)
  }
}

/** The snapshotter's directory cannot be used (overlayfs takes no ':' or ',' in its paths). */
export class SnapshotterRootError extends StrataError {
  override name = 'SnapshotterRootError'
  override readonly code = 'ERR_SNAPSHOTTER_ROOT'
  constructor(
    readonly root: string,
    why: string,
    override readonly hint: string,
    options?: { cause?: unknown }
  ) {
    super(`cannot keep snapshots in ${root}: ${why}`, options)
  }
}
