// Shared merged-root mounts (the containerd snapshotter's): one FUSE mount of an image's layers 0..i serves every
// user of that image chain (each container's overlay has it as its lower directory). A mount lives while some
// user needs it: its users are counted by the caller (the snapshotter's records, which persist across restarts),
// which asks `release` when the last one goes and is asked again, at release time, whether one came meanwhile.
//
// With a FUSE session holder (@strata/fs), the mounts outlive p2pd, as the containers on them must: the holder
// keeps each session while p2pd is away (a SIGTERM, a SIGKILL, an upgrade), readers wait, and the next p2pd
// serves them again at its start (`recover`). Without one, a mount dies with p2pd; it is then detached at the
// next start and mounted afresh when a snapshot needs it (containers that ran on the old one lose their root).
import { execFile } from 'node:child_process'
import { mkdir, readdir, rmdir, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { type AbortOptions, StrataError } from '@strata/base'
import type { Image } from '@strata/fetcher'
import {
  createFuseHolder,
  discardMount,
  type FuseHolder,
  forceUnmount,
  type HeldMountInfo,
  heldMounts,
  isMounted,
  resumeMount,
  type ServedMount,
  serveMount
} from '@strata/fs'
import type { ImageSource } from './source.js'

const exec = promisify(execFile)

/** An image chain: layers 0..`index` of the image `ref` (manifest `manifest`), whose top is `layer`. */
export interface ImageChain {
  ref: string
  manifest: string
  layer: string
  index: number
}

/** A merged root cannot be made now (the image cannot be opened, FUSE failed): try again later. */
export class MountUnavailableError extends StrataError {
  override readonly name = 'MountUnavailableError'
  override readonly code = 'ERR_MOUNT_UNAVAILABLE'
}

export interface MergedMountsInit {
  /** The directory the mounts go in (root-only). */
  dir: string
  /** What the mounts read through: p2pd's node. */
  source: ImageSource
  log: (message: string) => void
  /** Fetch the prioritized files of the image's eStargz layers when a mount is first made (default true). */
  prefetch?: boolean
  /** The FUSE session holder's directory: mounts then outlive this process. None: they die with it. */
  holderDir?: string
  /** FUSE passthrough for files held whole in the store, where the kernel offers it (default on). */
  passthrough?: boolean
}

/** What the holder keeps with each of these sessions; `kind` tells them from other users' of a holder. */
interface MountMeta {
  kind: typeof KIND
  id: number
  ref: string
  manifest: string
  layer: string
  index: number
}

const KIND = 'strata-snapshotter'

export class MergedMounts {
  readonly #init: MergedMountsInit
  readonly #live = new Map<number, ServedMount>()
  /** Work on each mount, one thing at a time: a mount is never made and removed at once. */
  readonly #queue = new Map<number, Promise<void>>()
  readonly #prefetching = new Set<Promise<void>>()
  readonly #stop = new AbortController()
  readonly #holder: FuseHolder | undefined

  constructor(init: MergedMountsInit) {
    this.#init = init
    this.#holder = init.holderDir !== undefined ? createFuseHolder(init.holderDir) : undefined
  }

  #fuse(): { fuse?: { passthrough: false } } {
    return this.#init.passthrough === false ? { fuse: { passthrough: false } } : {}
  }

  path(id: number): string {
    return join(this.#init.dir, String(id))
  }

  /** Ids of the mounts this process serves now. */
  live(): number[] {
    return [...this.#live.keys()]
  }

  /**
   * Takes over what a previous p2pd left: the mounts the holder kept that some snapshot still needs (`needed`:
   * id -> its remote layer) are served again, in the background but before anything else is done with them;
   * the others are unmounted, and so are dead mounts (a p2pd without a holder, killed).
   */
  async recover(needed: ReadonlyMap<number, ImageChain>): Promise<void> {
    await mkdir(this.#init.dir, { recursive: true, mode: 0o700 })
    const held = new Set<string>()
    if (this.#holder !== undefined) {
      let found: HeldMountInfo[] = []
      try {
        found = await heldMounts(this.#holder)
      } catch (err) {
        this.#init.log(`snapshotter: cannot ask the FUSE session holder for its mounts: ${(err as Error).message}`)
      }
      for (const h of found) {
        const meta = h.meta as Partial<MountMeta> | undefined
        if (meta?.kind !== KIND || typeof meta.id !== 'number') continue
        held.add(h.mountpoint)
        const remote = needed.get(meta.id)
        if (remote === undefined || h.mountpoint !== this.path(meta.id) || remote.layer !== meta.layer) {
          void this.#discard(h)
          continue
        }
        const id = meta.id
        void this.#serial(id, () => this.#resume(id, remote, h)).catch(() => {})
      }
    }
    for (const name of await readdir(this.#init.dir)) {
      const path = join(this.#init.dir, name)
      if (!held.has(path) && (await mountedOrDead(path))) await forceUnmount(path).catch(() => {})
    }
  }

  /** Serves a mount the holder kept; when that fails it is unmounted (and mounted afresh when needed). */
  async #resume(id: number, remote: ImageChain, h: HeldMountInfo): Promise<void> {
    try {
      const image = await this.#init.source.openImage(remote.ref)
      const layers = image.layers.slice(0, remote.index + 1)
      if (layers[remote.index]?.digest !== remote.layer)
        throw new MountUnavailableError(`${remote.ref} no longer has layer ${remote.layer} at ${remote.index}`)
      const served = await resumeMount({
        image: { layers },
        fetcher: this.#init.source.fetcher,
        holder: this.#holder!,
        held: h,
        onError: (f) => this.#init.log(`snapshotter: read of ${f.path} in ${remote.ref} failed: ${f.error.message}`),
        ...this.#fuse()
      })
      this.#live.set(id, served)
      this.#init.log(
        `snapshotter: serving layers 1-${remote.index + 1} of ${remote.ref} at ${h.mountpoint} again (${h.session.pending} requests waited)`
      )
    } catch (err) {
      this.#init.log(`snapshotter: cannot serve ${h.mountpoint} again (${(err as Error).message}): unmounting it`)
      await this.#discard(h)
    }
  }

  async #discard(h: HeldMountInfo): Promise<void> {
    await discardMount(this.#holder!, h).catch((err: Error) => {
      this.#init.log(`snapshotter: unmounting ${h.mountpoint} failed: ${err.message}`)
    })
  }

  /**
   * The mountpoint of the merged root of layers 0..remote.index of the remote layer's image, mounted when it
   * is not (or no longer: a mount whose server died is replaced). MountUnavailableError when it cannot be made.
   */
  ensure(id: number, remote: ImageChain, options?: AbortOptions): Promise<string> {
    return this.#serial(id, () => this.#ensure(id, remote, options))
  }

  async #ensure(id: number, remote: ImageChain, options?: AbortOptions): Promise<string> {
    const path = this.path(id)
    const served = this.#live.get(id)
    if (served !== undefined) {
      if (await healthy(path)) return path
      this.#init.log(`snapshotter: the mount of ${remote.ref} at ${path} stopped answering; mounting it again`)
      this.#live.delete(id)
      await served.unmount().catch(() => {})
    }
    if (await mountedOrDead(path)) await forceUnmount(path).catch(() => {})
    let image: Image
    try {
      image = await this.#init.source.openImage(remote.ref, options)
    } catch (err) {
      throw new MountUnavailableError(`cannot open ${remote.ref} to mount it: ${(err as Error).message}`, {
        cause: err
      })
    }
    const layers = image.layers.slice(0, remote.index + 1)
    if (layers[remote.index]?.digest !== remote.layer) {
      throw new MountUnavailableError(`${remote.ref} no longer has layer ${remote.layer} at ${remote.index}`)
    }
    await mkdir(path, { recursive: true, mode: 0o700 })
    let mount: ServedMount
    try {
      mount = await serveMount(
        {
          image: { layers },
          fetcher: this.#init.source.fetcher,
          mountpoint: path,
          ...(this.#holder !== undefined && {
            holder: this.#holder,
            meta: {
              kind: KIND,
              id,
              ref: remote.ref,
              manifest: remote.manifest,
              layer: remote.layer,
              index: remote.index
            } satisfies MountMeta
          }),
          onError: (f) => this.#init.log(`snapshotter: read of ${f.path} in ${remote.ref} failed: ${f.error.message}`),
          ...this.#fuse()
        },
        options
      )
    } catch (err) {
      throw new MountUnavailableError(`cannot mount ${remote.ref} at ${path}: ${(err as Error).message}`, {
        cause: err
      })
    }
    try {
      await allowSetuid(path)
    } catch (err) {
      await mount.unmount().catch(() => {})
      throw new MountUnavailableError(`cannot allow setuid programs on ${path}: ${(err as Error).message}`, {
        cause: err
      })
    }
    this.#live.set(id, mount)
    this.#init.log(`snapshotter: mounted layers 1-${remote.index + 1} of ${remote.ref} at ${path}`)
    if (this.#init.prefetch !== false) this.#prefetch({ ...image, layers }, remote.ref)
    return path
  }

  /** The prioritized files of the image's eStargz layers into the store, in the background. */
  #prefetch(image: Image, ref: string): void {
    if (!image.layers.some((l) => l.toc.prioritized.length > 0)) return
    const started = Date.now()
    const p = this.#init.source.fetcher
      .prefetch(image, { signal: this.#stop.signal })
      .then(
        () => this.#init.log(`snapshotter: prefetched the prioritized files of ${ref} in ${Date.now() - started} ms`),
        (err) => {
          if (!this.#stop.signal.aborted) this.#init.log(`snapshotter: prefetch of ${ref} failed: ${err.message}`)
        }
      )
      .finally(() => this.#prefetching.delete(p))
    this.#prefetching.add(p)
  }

  /**
   * Unmounts the mount of `id` (lazily when busy) and removes its directory, unless `needed(id)` says, when its
   * turn comes, that a snapshot prepared meanwhile stands on it.
   */
  release(id: number, needed: (id: number) => boolean = () => false): Promise<void> {
    return this.#serial(id, async () => {
      if (needed(id)) return
      const served = this.#live.get(id)
      this.#live.delete(id)
      await detach(this.path(id), served)
    })
  }

  /** Unmounts and removes every mount directory `needed` does not want (asked for each when its turn comes). */
  async prune(needed: (id: number) => boolean): Promise<void> {
    for (const id of [...this.#live.keys()]) await this.release(id, needed)
    let names: string[] = []
    try {
      names = await readdir(this.#init.dir)
    } catch {}
    for (const name of names) {
      if (/^\d+$/.test(name)) await this.release(Number(name), needed)
      else await detach(join(this.#init.dir, name), undefined)
    }
  }

  /** Runs `fn` after whatever else is under way for the mount of `id`. */
  #serial<T>(id: number, fn: () => Promise<T>): Promise<T> {
    const before = this.#queue.get(id) ?? Promise.resolve()
    const run = before.then(fn)
    const tail = run.then(
      () => {},
      () => {}
    )
    this.#queue.set(id, tail)
    void tail.then(() => {
      if (this.#queue.get(id) === tail) this.#queue.delete(id)
    })
    return run
  }

  /**
   * Stops prefetches. With a holder the mounts stay, kept by it for the next p2pd (the containers on them keep
   * their root); without one they cannot outlive this process's FUSE server, and are unmounted.
   */
  async close(): Promise<void> {
    this.#stop.abort(new Error('the snapshotter is stopping'))
    await Promise.allSettled([...this.#prefetching])
    await Promise.allSettled([...this.#queue.values()])
    if (this.#holder !== undefined) {
      for (const served of this.#live.values()) await served.detach?.().catch(() => {})
      this.#live.clear()
      await this.#holder.detach().catch(() => {})
      return
    }
    for (const id of [...this.#live.keys()]) await this.release(id).catch(() => {})
  }
}

/** Unmounts what is (or was) mounted at `path` and removes the directory; failures are left for the next try. */
async function detach(path: string, served: ServedMount | undefined): Promise<void> {
  if (served !== undefined) await served.unmount().catch(() => {})
  if (await mountedOrDead(path)) await forceUnmount(path).catch(() => {})
  await rmdir(path).catch(() => {})
}

/** A mount that answers (not one whose server died: "transport endpoint is not connected"). */
async function healthy(path: string): Promise<boolean> {
  try {
    await stat(path)
    return await isMounted(path)
  } catch {
    return false
  }
}

async function mountedOrDead(path: string): Promise<boolean> {
  try {
    await stat(path)
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ENOTCONN'
  }
  return isMounted(path)
}

/**
 * serveMount mounts `nosuid,nodev`, right for a user's p2p-mount but not under a container's root file system:
 * a setuid program of the image (sudo, ping, su) must work in the container. The per-mount flags are changed by
 * a bind remount; the FUSE mount stays read-only.
 */
async function allowSetuid(path: string): Promise<void> {
  await exec('mount', ['-i', '-n', '-o', 'remount,bind,ro,suid,dev', path], { timeout: 30_000 })
}
