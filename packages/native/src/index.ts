/**
 * @strata/native: the system calls strata needs that Node does not expose, as a small N-API addon
 * (src/strata.c, compiled by src/build.sh at `pnpm build`; no node-gyp, no download).
 *
 * - `peerCredentials(socket)`: who connected a Unix socket (SO_PEERCRED), so p2pd's control API acts for the
 *   caller with the caller's rights, not its own.
 * - `pidfdGetfd(pid, fd)`: this process's own descriptor of another process's open file (pidfd_getfd(2)): how
 *   p2pd takes the FUSE connections the session holder keeps, since opening /proc/PID/fd/N of /dev/fuse gives a
 *   new, unconnected device, and Node can receive no descriptor.
 * - `backingOpen(fuseFd, fileFd)` / `backingClose(fuseFd, id)`: the FUSE device's FUSE_DEV_IOC_BACKING_OPEN and
 *   _CLOSE ioctls (Linux 6.9+), which register a file the kernel then reads an opened FUSE file from directly
 *   (FOPEN_PASSTHROUGH). Node has no ioctl.
 *
 * Each throws an Error whose `code` is the errno name (EPERM, ENOTTY, ...), as Node's own fs errors do.
 */

import { createRequire } from 'node:module'
import type { Socket } from 'node:net'
import { StrataError } from '@strata/base'

export interface PeerCredentials {
  pid: number
  uid: number
  gid: number
}

interface Addon {
  peerCredentials(fd: number): PeerCredentials
  pidfdGetfd(pid: number, fd: number): number
  backingOpen(fuseFd: number, fileFd: number): number
  backingClose(fuseFd: number, id: number): void
}

/** The addon is missing (the build did not run) or cannot load: say so, and how to fix it. */
export class NativeAddonError extends StrataError {
  override readonly name = 'NativeAddonError'
  override readonly code = 'ERR_STRATA_NATIVE'
  override readonly hint =
    'build it: pnpm run build (needs a C compiler and the Node headers; scripts/setup.sh installs both)'
  constructor(cause: unknown) {
    super(`strata's native addon (dist/strata.node of @strata/native) cannot be loaded: ${(cause as Error).message}`, {
      cause
    })
  }
}

let addon: Addon | undefined
function load(): Addon {
  if (addon === undefined) {
    try {
      // From src/ (tests) and dist/ alike, the addon is at ../dist/strata.node.
      addon = createRequire(import.meta.url)('../dist/strata.node') as Addon
    } catch (err) {
      throw new NativeAddonError(err)
    }
  }
  return addon
}

/** The pid, uid and gid the kernel recorded when the peer connected this Unix socket. */
export function peerCredentials(socket: Socket): PeerCredentials {
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd
  if (typeof fd !== 'number' || fd < 0) throw new Error('peerCredentials: the socket has no file descriptor')
  return load().peerCredentials(fd)
}

/**
 * A new descriptor (close-on-exec) in this process for the open file description that is `fd` in process `pid`:
 * the same file, and for /dev/fuse the same connection. Needs the right to ptrace `pid` (root has it).
 */
export function pidfdGetfd(pid: number, fd: number): number {
  return load().pidfdGetfd(pid, fd)
}

/** Registers the open file `fileFd` with the FUSE connection of `fuseFd` for passthrough; its backing id. */
export function backingOpen(fuseFd: number, fileFd: number): number {
  return load().backingOpen(fuseFd, fileFd)
}

/** Lets go of a backing id (files opened with it keep reading from their file until closed). */
export function backingClose(fuseFd: number, id: number): void {
  load().backingClose(fuseFd, id)
}
