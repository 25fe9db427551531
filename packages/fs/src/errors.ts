import { constants } from 'node:os'
import { StrataError } from '@strata/base'

export type ErrnoCode = keyof typeof constants.errno

/**
 * A file-system operation failed with an errno the kernel passes on to the reader (ENOENT, EIO, ...).
 * `code` is the errno's name, `errno` its (positive) number.
 */
export class FsError extends StrataError {
  override name = 'FsError'
  readonly errno: number
  constructor(
    override readonly code: ErrnoCode,
    message: string,
    options?: { cause?: unknown }
  ) {
    super(`${code}: ${message}`, options)
    this.errno = constants.errno[code]
  }
}

/** A TOC path or hardlink target that would leave the image's root (`..`, absolute, empty component). */
export class UnsafePathError extends StrataError {
  override name = 'UnsafePathError'
  override readonly code = 'ERR_UNSAFE_PATH'
  override readonly hint = 'the image is malformed or hostile: rebuild it, or mount a different image'
  constructor(
    readonly layer: number,
    readonly path: string,
    reason: string
  ) {
    super(`layer ${layer}: refusing path '${path}': ${reason}`)
  }
}

/** The kernel refused the mount, or the mountpoint is unusable. */
export class MountError extends StrataError {
  override name = 'MountError'
  override readonly code = 'ERR_MOUNT'
  constructor(
    readonly mountpoint: string,
    message: string,
    override readonly hint?: string,
    options?: { cause?: unknown }
  ) {
    super(`cannot mount at ${mountpoint}: ${message}`, options)
  }
}

/** Unmounting failed (the mount stays); usually a process still uses it. */
export class UnmountError extends StrataError {
  override name = 'UnmountError'
  override readonly code = 'ERR_UNMOUNT'
  constructor(
    readonly mountpoint: string,
    message: string,
    override readonly hint?: string,
    options?: { cause?: unknown }
  ) {
    super(`cannot unmount ${mountpoint}: ${message}`, options)
  }
}
