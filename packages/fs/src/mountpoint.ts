// Where a mount may go, and for whom. p2pd mounts as root on behalf of local callers, so a request must not
// reach further than the caller could: a path the caller owns, empty, outside the system's directories. The
// directory is held open from the check to the mount (mount(8) is given /proc/self/fd/N, not the path), so
// swapping it for a symbolic link in between mounts nothing elsewhere.

import { constants } from 'node:fs'
import { type FileHandle, lstat, open, readdir, readlink } from 'node:fs/promises'
import { dirname, posix } from 'node:path'
import { StrataError } from '@strata/base'
import { MountError } from './errors.js'

/** Who asks for the mount: the caller's uid and gid (from SO_PEERCRED in p2pd; the process itself when embedded). */
export interface Caller {
  uid: number
  gid: number
}

export interface MountpointPolicy {
  /** Whose request it is; a caller that is not root must own the mountpoint (default: this process). */
  caller?: Caller
  /** Paths no mount may cover (p2pd's data dir and socket): the mountpoint may not be one of them or above one. */
  protect?: string[]
}

/** A directory checked and held open until it is mounted on. */
export interface HeldDirectory {
  readonly path: string
  readonly handle: FileHandle
  close(): Promise<void>
}

/** Trees of the running system: nothing is mounted in them for a caller (programs p2pd itself runs live there). */
const SYSTEM_TREES = [
  '/bin',
  '/boot',
  '/dev',
  '/etc',
  '/lib',
  '/lib32',
  '/lib64',
  '/libx32',
  '/proc',
  '/sbin',
  '/sys',
  '/usr'
]

export function thisProcess(): Caller {
  return { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0 }
}

/**
 * Checks `path` as a mountpoint, held open on return. Always: an existing directory reached without symbolic
 * links. With a policy (every mountpoint a user names): absolute and normalised, not a system directory or one
 * that holds what p2pd needs, empty, and owned by the caller unless the caller is root. Without one: a directory
 * strata made itself (a writable mount's lower).
 */
export async function holdMountpoint(path: string, policy?: MountpointPolicy): Promise<HeldDirectory> {
  const refuse: Refuse = (why, hint, cause) => {
    throw new MountError(path, why, hint, { cause })
  }
  if (policy === undefined) return holdDirectory(path, 'the mountpoint', refuse)
  const caller = policy.caller ?? thisProcess()
  if (!path.startsWith('/') || posix.normalize(path) !== path || (path.length > 1 && path.endsWith('/')))
    refuse('the path is not absolute and normalised (no ., .., // or trailing /)', 'pass the plain absolute path')
  if (isSystemPath(path)) refuse('it is a system directory', 'mount on an empty directory of your own, e.g. /mnt/image')
  for (const p of policy.protect ?? []) {
    if (within(path, p)) refuse(`it would cover ${p}, which p2pd needs`)
  }
  const dir = await holdDirectory(path, 'the mountpoint', refuse)
  try {
    const info = await dir.handle.stat()
    if (caller.uid !== 0 && info.uid !== caller.uid)
      refuse(`it belongs to uid ${info.uid}, not to you (uid ${caller.uid})`, 'mount on a directory you own')
    const entries = await readdir(procPath(dir.handle))
    if (entries.length > 0) refuse('the mountpoint is not empty', 'mount on an empty directory')
    return dir
  } catch (err) {
    await dir.close()
    throw err
  }
}

type Refuse = (why: string, hint?: string, cause?: unknown) => never

/**
 * Opens an existing directory without following symbolic links anywhere on its path (the kernel's name for
 * what was opened must be the path asked for), and keeps it open.
 */
async function holdDirectory(path: string, what: string, refuse: Refuse): Promise<HeldDirectory> {
  let handle: FileHandle
  try {
    handle = await open(path, constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW)
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'ENOTCONN')
      refuse('a mount whose process died is still there', `clean it up with 'p2p-mount --unmount ${path}'`, err)
    // O_NOFOLLOW with O_DIRECTORY: a link is "not a directory" (ENOTDIR), or ELOOP on some kernels.
    const link =
      (code === 'ELOOP' || code === 'ENOTDIR') && (await lstat(path).catch(() => undefined))?.isSymbolicLink()
    if (link === true) refuse(`${what} is a symbolic link`, 'pass the directory it points to', err)
    if (code === 'ENOTDIR') refuse(`${what} is not a directory`, undefined, err)
    return refuse(`${what} is not usable (${code})`, 'create the directory first', err)
  }
  const opened = await readlink(procPath(handle)).catch(() => undefined)
  if (opened !== path) {
    await handle.close()
    refuse(`the path goes through a symbolic link (it is ${opened ?? 'unknown'})`, `pass ${opened} instead`)
  }
  return { path, handle, close: () => handle.close().catch(() => {}) }
}

/** The held directory as a path the kernel resolves to exactly it (in this process). */
export function procPath(handle: FileHandle): string {
  return `/proc/self/fd/${handle.fd}`
}

/**
 * The directory of a file written for `caller` (a record), held open: it must be the caller's (or the caller is
 * root). The file is then made inside the held directory, so the path cannot be redirected meanwhile.
 */
export async function holdCallerDirectory(file: string, caller: Caller = thisProcess()): Promise<HeldDirectory> {
  const refuse: Refuse = (why, _hint, cause) => {
    throw new RecordFileError(file, why, { cause })
  }
  const dir = await holdDirectory(dirname(file), 'its directory', refuse)
  const info = await dir.handle.stat()
  if (caller.uid !== 0 && info.uid !== caller.uid) {
    await dir.close()
    throw new RecordFileError(file, `its directory belongs to uid ${info.uid}, not to you (uid ${caller.uid})`)
  }
  return dir
}

/** The record file cannot be written where it was asked for. */
export class RecordFileError extends StrataError {
  override name = 'RecordFileError'
  override readonly code = 'ERR_RECORD_FILE'
  override readonly hint = 'write the record into a directory you own'
  constructor(
    readonly file: string,
    why: string,
    options?: { cause?: unknown }
  ) {
    super(`cannot record reads into ${file}: ${why}`, options)
  }
}

function isSystemPath(path: string): boolean {
  if (path.split('/').length <= 2) return true // '/' and every top-level directory: /tmp, /mnt, /home, /var, ...
  return SYSTEM_TREES.some((tree) => within(tree, path))
}

/** Whether `path` is `base` or inside it. */
function within(base: string, path: string): boolean {
  return path === base || path.startsWith(base.endsWith('/') ? base : `${base}/`)
}
