// Mounting and unmounting FUSE with mount(8) and umount(8), and the mount table: the helpers around a connection.
import { execFile, spawn } from 'node:child_process'
import { close, open } from 'node:fs'
import { readFile, stat, writeFile } from 'node:fs/promises'
import { resolve } from 'node:path'
import { promisify } from 'node:util'
import type { AbortOptions } from '@strata/base'
import { MountError, UnmountError } from './errors.js'

const exec = promisify(execFile)

/** Largest read the kernel may ask for at once: 256 pages (the kernel's own limit for max_pages). */
export const MAX_READ = 1 << 20
/** Kernel read-ahead on the mount, so that a sequential reader gets MAX_READ requests (default 128 KiB). */
const READ_AHEAD_KB = 4096

/** A mount there would hide another (or a dead one, which the user should clean up knowingly). */
export async function refuseMounted(mountpoint: string): Promise<void> {
  if (await isMounted(mountpoint)) {
    throw new MountError(
      mountpoint,
      'something is mounted there already',
      `unmount it first ('p2p-mount --unmount ${mountpoint}' if it is a p2p-mount that died)`
    )
  }
}

/**
 * Opens /dev/fuse and mounts it read-only on the directory open as `dirFd` in this process (`mountpoint` is its
 * name, for messages). Returns the /dev/fuse descriptor of the new connection, whose INIT is still to be read.
 */
export async function mountDevice(mountpoint: string, dirFd: number, allowOther?: boolean): Promise<number> {
  const fd = await new Promise<number>((resolve, reject) =>
    open('/dev/fuse', 'r+', (err, fd) => (err === null ? resolve(fd) : reject(err)))
  ).catch((err: NodeJS.ErrnoException) => {
    const hint = err.code === 'ENOENT' ? 'load the fuse module (modprobe fuse)' : 'mounting needs root: run it as root'
    throw new MountError(mountpoint, `cannot open /dev/fuse (${err.code})`, hint, { cause: err })
  })
  const uid = process.getuid?.() ?? 0
  const data = [
    'ro',
    'nosuid',
    'nodev',
    'fd=3',
    'rootmode=40000',
    `user_id=${uid}`,
    `group_id=${process.getgid?.() ?? 0}`,
    'default_permissions',
    `max_read=${MAX_READ}`
  ]
  if (allowOther ?? uid === 0) data.push('allow_other')
  try {
    // The target is the directory held open since it was checked (fd 4), not its path, which could have changed.
    const args = ['-i', '-n', '-c', '-t', 'fuse.strata', '-o', data.join(','), 'strata', '/proc/self/fd/4']
    await withFds([fd, dirFd], 'mount', args)
  } catch (err) {
    close(fd, () => {})
    throw new MountError(
      mountpoint,
      (err as Error).message,
      uid === 0 ? 'check `dmesg` for FUSE errors' : 'mounting needs root: run it as root',
      { cause: err }
    )
  }
  return fd
}

/** `umount -l` when something is mounted there; what went wrong, if anything. */
export async function lazyUnmount(mountpoint: string): Promise<string | undefined> {
  if (!(await isMounted(mountpoint))) return undefined
  try {
    await exec('umount', ['-l', mountpoint], { timeout: 30_000 })
    return undefined
  } catch (err) {
    return ((err as { stderr?: string }).stderr ?? String(err)).trim()
  }
}

/** Runs a command with `fds` as its fds 3, 4, ... (mount's `fd=3`, a held mountpoint). */
export function withFds(fds: number[], cmd: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe', ...fds] })
    let stderr = ''
    child.stderr!.on('data', (d) => {
      stderr += d
    })
    child.on('error', reject)
    child.on('close', (code) => {
      if (code === 0) resolve()
      else reject(new Error(stderr.trim().split('\n')[0] || `${cmd} exited with ${code}`))
    })
  })
}

/** Raises the kernel's read-ahead on the mount (its bdi), so sequential reads come in MAX_READ pieces. */
export async function setReadAhead(mountpoint: string): Promise<void> {
  const { dev } = await stat(mountpoint)
  const major = Number((BigInt(dev) >> 8n) & 0xfffn)
  const minor = Number((BigInt(dev) & 0xffn) | ((BigInt(dev) >> 12n) & ~0xffn))
  await writeFile(`/sys/class/bdi/${major}:${minor}/read_ahead_kb`, String(READ_AHEAD_KB)).catch(() => {})
}

/**
 * Removes a FUSE mount whose process died ("Transport endpoint is not connected"), lazily.
 * Returns false when nothing was mounted there.
 */
export async function forceUnmount(mountpoint: string, options?: AbortOptions): Promise<boolean> {
  const attempts: [string, string[]][] = [
    ['umount', ['-l', mountpoint]],
    ['fusermount3', ['-uz', mountpoint]]
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
