// containers-storage's "additional layer store" (podman, CRI-O), served with FUSE: a directory podman only
// stats and reads, whose entries are answered on demand, as stargz-store does.
//
//   STORE/                      lists nothing; a lookup of base64(REF) opens that image
//   STORE/base64(REF)/          lists the image's layer digests
//   STORE/base64(REF)/KEY/      KEY: a layer's compressed digest (containers-storage 1.43-1.53, podman 4.x-5.0)
//                               or its TOC digest (containers-storage 1.54+, podman 5.1+)
//       diff/                   the layer's own files, overlay's whiteouts (layer-diff.ts), read through the fetcher
//       info                    JSON that containers-storage decodes into its Layer record (see infoOf)
//       blob                    the compressed layer blob, read by Range when someone reads it
//
// Podman creates KEY/use when it takes a layer and rmdirs KEY when it lets go. A store that counts those
// "must return ENOENT" (containers-storage, notifyUseAdditionalLayer): any other answer, success included, is
// logged as a warning on every pull. So CREATE of `use` and RMDIR of a layer directory are counted and answered
// ENOENT; UNLINK of `use` succeeds; nothing else is writable. The mount is read-write only so that those requests
// reach this process (on a `ro` mount the kernel answers EROFS itself).
//
// Not protocol.ts's Session: lookups here wait on the network (opening an image), misses must not be cached
// (an image pushed later, a tag moved), and the store's own directories take requests an image never does.
import { close, open } from 'node:fs'
import { mkdir, readFile } from 'node:fs/promises'
import { resolve } from 'node:path'
import { MountError } from './errors.js'
import { lazyUnmount, MAX_READ, setReadAhead, withFds } from './fuse-mount.js'
import { StoreFs } from './layer-store-fs.js'
import { StoreConnection } from './layer-store-session.js'
import type { LayerStore, LayerStoreInit, StoreLayer } from './layer-store-types.js'
import { holdMountpoint } from './mountpoint.js'

export { decodeRef, infoOf } from './layer-store-fs.js'
export type * from './layer-store-types.js'

/** Mounts the layer store at `init.mountpoint` and serves it until `unmount`. Needs root. */
export async function mountLayerStore<L extends StoreLayer>(init: LayerStoreInit<L>): Promise<LayerStore> {
  const { mountpoint } = init
  const mounted = await mountTypeAt(mountpoint)
  if (mounted !== undefined && mounted !== STORE_TYPE) {
    throw new MountError(mountpoint, `${mounted} is mounted there`, 'give --layer-store a directory of its own')
  }
  if (mounted !== undefined) {
    // An earlier p2pd's store (it crashed, or was killed): nobody serves it.
    const failure = await lazyUnmount(mountpoint)
    if (failure !== undefined)
      throw new MountError(mountpoint, `left mounted, and: ${failure}`, 'unmount it (umount -l)')
    init.log?.(`layer store: unmounted what was left mounted on ${mountpoint}`)
  }
  // After the unmount: a dead mount answers ENOTCONN to anything, mkdir included.
  await mkdir(mountpoint, { recursive: true })
  const store = new StoreFs(init)
  const target = await holdMountpoint(mountpoint)
  let fd: number
  try {
    fd = await mountStoreDevice(mountpoint, target.handle.fd)
  } finally {
    await target.close()
  }
  const connection = new StoreConnection(fd, store, init.debug === true)
  try {
    await connection.started(mountpoint, 30_000)
    await setReadAhead(mountpoint)
  } catch (err) {
    await connection.close(mountpoint)
    throw err
  }
  let closing: Promise<void> | undefined
  return {
    mountpoint,
    stats: () => ({ ...store.counts }),
    unmount() {
      closing ??= connection.close(mountpoint)
      return closing
    }
  }
}

const STORE_TYPE = 'fuse.strata-layers'

/** The file system type mounted on `path` now (the last mount there), or undefined. */
async function mountTypeAt(path: string): Promise<string | undefined> {
  const target = resolve(path).replace(/[ \t\n\\]/g, (c) => `\\${c.charCodeAt(0).toString(8).padStart(3, '0')}`)
  let type: string | undefined
  for (const line of (await readFile('/proc/self/mountinfo', 'utf8')).split('\n')) {
    const fields = line.split(' ')
    if (fields[4] === target) type = fields[fields.indexOf('-') + 1]
  }
  return type
}

async function mountStoreDevice(mountpoint: string, dirFd: number): Promise<number> {
  const fd = await new Promise<number>((resolve, reject) =>
    open('/dev/fuse', 'r+', (err, fd) => (err === null ? resolve(fd) : reject(err)))
  ).catch((err: NodeJS.ErrnoException) => {
    const hint = err.code === 'ENOENT' ? 'load the fuse module (modprobe fuse)' : 'the layer store needs root'
    throw new MountError(mountpoint, `cannot open /dev/fuse (${err.code})`, hint, { cause: err })
  })
  // Read-write (see the top of this file), not nosuid or nodev: podman mounts overlays over these directories
  // as containers' roots, like the directories of its own graph root. The store's directories are root's only.
  const data = [
    'fd=3',
    'rootmode=40000',
    'user_id=0',
    'group_id=0',
    'default_permissions',
    'allow_other',
    `max_read=${MAX_READ}`
  ]
  const args = ['-i', '-n', '-c', '-t', STORE_TYPE, '-o', data.join(','), 'strata-layers', '/proc/self/fd/4']
  try {
    await withFds([fd, dirFd], 'mount', args)
  } catch (err) {
    close(fd, () => {})
    throw new MountError(mountpoint, (err as Error).message, 'check `dmesg` for FUSE errors', { cause: err })
  }
  return fd
}
