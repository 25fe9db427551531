/**
 * @strata/native: the system calls strata needs that Node does not expose, as a small N-API addon
 * (src/strata.c, compiled by src/build.sh at `pnpm build`; no node-gyp, no download).
 *
 * - `peerCredentials(socket)`: who connected a Unix socket (SO_PEERCRED), so p2pd's control API acts for the
 *   caller with the caller's rights, not its own.
 */
import { createRequire } from 'node:module'
import type { Socket } from 'node:net'

export interface PeerCredentials {
  pid: number
  uid: number
  gid: number
}

interface Addon {
  peerCredentials(fd: number): PeerCredentials
}

/** The addon is missing (the build did not run) or cannot load: say so, and how to fix it. */
export class NativeAddonError extends Error {
  override readonly name = 'NativeAddonError'
  readonly code = 'ERR_STRATA_NATIVE'
  readonly hint = 'build it: pnpm run build (needs a C compiler and the Node headers; scripts/setup.sh installs both)'
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
