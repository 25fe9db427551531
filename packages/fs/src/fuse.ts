// The only file that touches fuse-native. Every callback here runs on the Node event loop while a FUSE
// thread waits for its answer: nothing in here may block (no sync I/O, no execSync).
import { execFile } from 'node:child_process'
import { readFile, stat } from 'node:fs/promises'
import { createRequire } from 'node:module'
import { resolve } from 'node:path'
import { promisify } from 'node:util'
import type { AbortOptions } from '@strata/stargz'
import { MountError, UnmountError } from './errors.js'
import type { Operations } from './operations.js'

export interface FuseMountInit {
  /** Let users other than the mounting one read the mount (default: when running as root). */
  allowOther?: boolean
  /** Seconds the kernel may cache attributes, entries and misses (default: a day; the image is immutable). */
  cacheTimeout?: number
  /** How long mounting may take before it is abandoned (default 30 s). */
  timeoutMs?: number
  /** libfuse debug output on stderr. */
  debug?: boolean
}

/** A live FUSE mount. */
export interface Mount {
  readonly mountpoint: string
  /** Unmounts (lazily, so a busy mount goes too) and aborts reads in flight. */
  unmount(options?: AbortOptions): Promise<void>
}

type Callback = (code: number, ...values: unknown[]) => void

interface FuseInstance {
  mount(cb: (err: Error | null) => void): void
  unmount(cb: (err: Error | null) => void): void
}

interface FuseClass {
  new (mountpoint: string, ops: Record<string, unknown>, opts: Record<string, unknown>): FuseInstance
}

const exec = promisify(execFile)

/** Upper bound on one FUSE operation; the fetcher's own timeouts fire well before this one. */
const OPERATION_TIMEOUT_MS = 10 * 60_000

/** Largest read the kernel may ask for at once (it caps this at its own limit, 128 KiB with FUSE 2). */
const MAX_READ = 1 << 20

/**
 * Mounts `ops` at `mountpoint` read-only with FUSE. Kernel page cache stays on (`kernel_cache`, no
 * direct_io) and attributes are cached long: an image never changes under a mount.
 */
export async function mountFuse(
  ops: Operations,
  mountpoint: string,
  init: FuseMountInit = {},
  options?: AbortOptions
): Promise<Mount> {
  const info = await stat(mountpoint).catch((err: NodeJS.ErrnoException) => err)
  if (info instanceof Error) {
    if (info.code === 'ENOTCONN') {
      throw new MountError(
        mountpoint,
        'a mount whose process died is still there',
        `clean it up with 'p2p-mount --unmount ${mountpoint}'`,
        { cause: info }
      )
    }
    throw new MountError(mountpoint, `the mountpoint is not usable (${info.code})`, 'create the directory first', {
      cause: info
    })
  }
  if (!info.isDirectory()) throw new MountError(mountpoint, 'the mountpoint is not a directory')
  if (await isMounted(mountpoint)) {
    throw new MountError(
      mountpoint,
      'something is mounted there already',
      `unmount it first ('p2p-mount --unmount ${mountpoint}' if it is a p2p-mount that died)`
    )
  }

  const Fuse = loadFuse()
  const timeout = init.cacheTimeout ?? 86_400
  const fuseOptions = [
    'ro',
    'default_permissions',
    'use_ino',
    'kernel_cache',
    `entry_timeout=${timeout}`,
    `attr_timeout=${timeout}`,
    `negative_timeout=${timeout}`,
    `max_read=${MAX_READ}`,
    'fsname=strata',
    'subtype=strata'
  ]
  if (init.allowOther ?? process.getuid?.() === 0) fuseOptions.push('allow_other')
  if (init.debug === true) fuseOptions.push('debug')

  // fuse-native has no switch for `ro`, `use_ino` (stable inode numbers, one per hardlinked file) or
  // `negative_timeout`, so its option string is replaced as a whole.
  class StrataFuse extends Fuse {
    _fuseOptions(): string {
      return `-o${fuseOptions.join(',')}`
    }
  }

  const inflight = new AbortController()
  // No timeout on reads: fuse-native would answer for a read still filling libfuse's buffer, which libfuse then
  // reuses. A read ends by itself (the fetcher's sources time out) or with the unmount's abort.
  const fuse = new StrataFuse(mountpoint, handlers(ops, inflight.signal), {
    timeout: { default: OPERATION_TIMEOUT_MS, read: false }
  })

  await new Promise<void>((resolve, reject) => {
    const timeoutMs = init.timeoutMs ?? 30_000
    const timer = setTimeout(() => {
      reject(new MountError(mountpoint, `FUSE did not start within ${timeoutMs} ms`, 'check `dmesg` for FUSE errors'))
    }, timeoutMs)
    const onAbort = () => reject(options?.signal?.reason)
    options?.signal?.addEventListener('abort', onAbort, { once: true })
    fuse.mount((err) => {
      clearTimeout(timer)
      options?.signal?.removeEventListener('abort', onAbort)
      if (err === null) resolve()
      else
        reject(
          new MountError(
            mountpoint,
            err.message,
            'FUSE needs /dev/fuse and root (or a setuid fusermount); is something already mounted there?',
            { cause: err }
          )
        )
    })
  })

  let unmounted: Promise<void> | undefined
  return {
    mountpoint,
    unmount() {
      unmounted ??= new Promise<void>((resolve, reject) => {
        inflight.abort(new Error(`${mountpoint} is being unmounted`))
        fuse.unmount((err) => {
          if (err === null) resolve()
          else
            reject(new UnmountError(mountpoint, err.message, `try 'p2p-mount --unmount ${mountpoint}'`, { cause: err }))
        })
      })
      return unmounted
    }
  }
}

/**
 * Removes a FUSE mount whose process died ("Transport endpoint is not connected"), lazily.
 * Returns false when nothing was mounted there.
 */
export async function forceUnmount(mountpoint: string, options?: AbortOptions): Promise<boolean> {
  const attempts: [string, string[]][] = [
    ['fusermount', ['-uz', mountpoint]],
    ['umount', ['-l', mountpoint]]
  ]
  const failures: string[] = []
  for (const [cmd, args] of attempts) {
    if (!(await isMounted(mountpoint))) return failures.length > 0
    try {
      await exec(cmd, args, { timeout: 30_000, signal: options?.signal })
      return true
    } catch (err) {
      failures.push(`${cmd}: ${((err as { stderr?: string }).stderr ?? String(err)).trim()}`)
    }
  }
  if (!(await isMounted(mountpoint))) return true
  throw new UnmountError(mountpoint, failures.join('; '), 'run it as root, or as the user that mounted it')
}

/** Whether `mountpoint` is a mount point now (from /proc/self/mountinfo). */
export async function isMounted(mountpoint: string): Promise<boolean> {
  const target = resolve(mountpoint)
  const text = await readFile('/proc/self/mountinfo', 'utf8')
  return text.split('\n').some((line) => unescapeMountPath(line.split(' ')[4] ?? '') === target)
}

function unescapeMountPath(path: string): string {
  return path.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(Number.parseInt(oct, 8)))
}

function loadFuse(): FuseClass {
  return createRequire(import.meta.url)('fuse-native') as FuseClass
}

function errnoOf(err: unknown): number {
  return (err as Error)?.name === 'FsError' ? -(err as { errno: number }).errno : -5 // EIO
}

function handlers(ops: Operations, signal: AbortSignal): Record<string, unknown> {
  const answer = (cb: Callback, fn: () => unknown): void => {
    let value: unknown
    try {
      value = fn()
    } catch (err) {
      cb(errnoOf(err))
      return
    }
    cb(0, value)
  }
  const readOnly = (path: string, ...rest: unknown[]): void => {
    const cb = rest[rest.length - 1] as Callback
    answer(cb, () => ops.modify(path))
  }
  return {
    getattr: (path: string, cb: Callback) => answer(cb, () => toFuseStat(ops.getattr(path))),
    fgetattr: (path: string, _fd: number, cb: Callback) => answer(cb, () => toFuseStat(ops.getattr(path))),
    readdir: (path: string, cb: Callback) => answer(cb, () => ['.', '..', ...ops.readdir(path)]),
    open: (path: string, flags: number, cb: Callback) =>
      answer(cb, () => {
        ops.open(path, flags)
        return 0
      }),
    // `buf` is libfuse's memory, valid until cb: the read fills it in place (from the store, in an I/O thread).
    read: (path: string, _fd: number, buf: Buffer, len: number, pos: number, cb: Callback) => {
      ops.read(path, pos, buf.subarray(0, len), { signal }).then(
        (n) => cb(n),
        (err) => cb(errnoOf(err))
      )
    },
    readlink: (path: string, cb: Callback) => answer(cb, () => ops.readlink(path)),
    getxattr: (path: string, name: string, _position: number, cb: Callback) =>
      answer(cb, () => Buffer.from(ops.getxattr(path, name))),
    listxattr: (path: string, cb: Callback) => answer(cb, () => ops.listxattr(path)),
    statfs: (_path: string, cb: Callback) => answer(cb, () => ops.statfs()),
    access: (path: string, mode: number, cb: Callback) => answer(cb, () => ops.access(path, mode)),
    write: readOnly,
    create: readOnly,
    truncate: readOnly,
    ftruncate: readOnly,
    unlink: readOnly,
    rename: readOnly,
    link: readOnly,
    symlink: readOnly,
    mkdir: readOnly,
    rmdir: readOnly,
    chmod: readOnly,
    chown: readOnly,
    utimens: readOnly,
    mknod: readOnly,
    setxattr: readOnly,
    removexattr: readOnly
  }
}

function toFuseStat(s: ReturnType<Operations['getattr']>): Record<string, number> {
  // fuse-native carries times as unsigned milliseconds: a time before 1970 shows as the epoch.
  const time = Math.max(0, s.mtimeMs)
  return {
    mode: s.mode,
    uid: s.uid,
    gid: s.gid,
    size: s.size,
    nlink: s.nlink,
    ino: s.ino,
    rdev: s.rdev,
    blksize: s.blksize,
    blocks: s.blocks,
    atime: time,
    mtime: time,
    ctime: time
  }
}
