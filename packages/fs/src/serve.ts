import { execFile } from 'node:child_process'
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { promisify } from 'node:util'
import type { AbortOptions } from '@strata/base'
import type { Entry, TOC } from '@strata/stargz'
import { MountError, UnmountError } from './errors.js'
import { type FuseMountInit, type Mount, mountFuse } from './fuse.js'
import { isMounted, withFds } from './fuse-mount.js'
import {
  discardHeld,
  type FuseHolder,
  type HeldMount,
  type HeldSession,
  mountThroughHolder,
  resumeHeld
} from './held.js'
import { type Caller, type HeldDirectory, holdMountpoint, type MountpointPolicy, thisProcess } from './mountpoint.js'
import { createOperations, type Operations, type ReadFailure } from './operations.js'
import { createReadRecorder, type ReadRecorder } from './record.js'
import { buildTree, type Tree } from './tree.js'

/**
 * What a mount reads through: the fetcher's file reader (structurally; fs does not import the fetcher). It owns
 * everything below the tree: chunks, the store's in-place path, the chunk buffer, read-ahead.
 */
export interface LayerReader<L> {
  /** The fetcher's readRange: the bytes at `offset` of a file copied into `into` (see ReadRange); the count. */
  readRange(layer: L, entry: Entry, offset: number, into: Uint8Array, options?: AbortOptions): Promise<number>
  /** The fetcher's storedFile: the verified chunk file of a single-chunk file, for FUSE passthrough. */
  storedFile?(layer: L, entry: Entry, options?: AbortOptions): Promise<string | undefined>
}

export interface ServeMountInit<L extends { toc: TOC }> {
  /** The opened image (the fetcher's Image): its layers, lowest first. */
  image: { layers: readonly L[] }
  fetcher: LayerReader<L>
  mountpoint: string
  /**
   * Mount writable: an overlayfs on `mountpoint` whose lower is the FUSE mount (at `DIR/lower`) and whose
   * upper and work directories are `DIR/upper` and `DIR/work`. Changes stay in `DIR/upper` after unmount.
   */
  writableDir?: string
  /** Write the paths read, in first-read order, to this file (periodically and on unmount). */
  recordFile?: string
  /** A read failed and the reader got EIO: log why. */
  onError?: (failure: ReadFailure) => void
  /**
   * Who asked for the mount, and what it must not touch: the mountpoint and the record file's directory must be
   * the caller's (see holdMountpoint). Default: this process, protecting nothing more.
   */
  policy?: MountpointPolicy
  fuse?: FuseMountInit
  /**
   * Serve the FUSE session through this holder (p2pd's): it outlives this process, and `resumeMount` serves it
   * again from the next one. `meta` is kept with it: what the caller needs to open the image again.
   */
  holder?: FuseHolder
  meta?: unknown
}

export interface ServedMount extends Mount {
  readonly tree: Tree
  /** Present with `recordFile`. */
  readonly recorder?: ReadRecorder
  /**
   * Mounts through a holder: stops serving the mount and leaves it held (the record is written first), for the
   * next process to serve with `resumeMount`.
   */
  detach?(): Promise<void>
  /** Mounts through a holder: replaces the caller's `meta` kept with it. */
  update?(meta: unknown): Promise<void>
}

/** A mount the holder keeps, as `heldMounts` finds it: what `resumeMount` needs besides the image. */
export interface HeldMountInfo {
  readonly session: HeldSession
  /** The caller's mountpoint (a writable mount's overlay; the FUSE session is under `writableDir`). */
  readonly mountpoint: string
  readonly writableDir?: string
  readonly recordFile?: string
  readonly owner?: Caller
  /** The caller's `meta`. */
  readonly meta: unknown
}

/** What the holder keeps of a mount serveMount made through it. */
interface HeldRecord {
  strata: 1
  mountpoint: string
  writableDir?: string
  recordFile?: string
  owner?: Caller
  /** Node ids are inode numbers: the tree that serves the session again must number alike (Tree.numbering). */
  numbering: string
  meta: unknown
}

export interface ResumeMountInit<L extends { toc: TOC }> {
  /** The same image (by digest) as the mount was made of. */
  image: { layers: readonly L[] }
  fetcher: LayerReader<L>
  holder: FuseHolder
  held: HeldMountInfo
  onError?: (failure: ReadFailure) => void
  fuse?: FuseMountInit
}

const exec = promisify(execFile)

/**
 * Merged trees by image object: a p2pd keeps an opened image (one object per manifest digest) for as long as a
 * reference names it, so mounting it again skips the merge (tens of ms for a distribution's root file system).
 * A tree is read-only once built, and goes with its image.
 */
const trees = new WeakMap<object, Tree>()

function treeOf(image: { layers: readonly { toc: TOC }[] }): Tree {
  let tree = trees.get(image)
  if (tree === undefined) {
    tree = buildTree(image.layers)
    trees.set(image, tree)
  }
  return tree
}

/**
 * Mounts an opened image at `mountpoint`: builds the merged tree from the layers' TOCs and serves
 * reads through the fetcher. One call for p2p-mount and for p2pd's control API alike.
 */
export async function serveMount<L extends { toc: TOC }>(
  init: ServeMountInit<L>,
  options?: AbortOptions
): Promise<ServedMount> {
  const { image, mountpoint } = init
  const tree = treeOf(image)
  const policy = init.policy ?? {}
  // The caller's mountpoint and record file are checked (and held) before anything is mounted.
  const target = await holdMountpoint(mountpoint, policy)
  let recorder: ReadRecorder | undefined
  try {
    if (init.recordFile !== undefined) {
      recorder = await createReadRecorder(init.recordFile, policy.caller !== undefined ? { owner: policy.caller } : {})
    }
    return await mountAt(init, tree, target, recorder, options)
  } catch (err) {
    await recorder?.close().catch(() => {})
    throw err
  } finally {
    await target.close()
  }
}

function operationsOf<L extends { toc: TOC }>(
  image: { layers: readonly L[] },
  fetcher: LayerReader<L>,
  tree: Tree,
  onError: ((failure: ReadFailure) => void) | undefined,
  recorder: ReadRecorder | undefined
): Operations {
  return createOperations(
    tree,
    (layer, entry, offset, into, opts) => fetcher.readRange(image.layers[layer]!, entry, offset, into, opts),
    {
      ...(fetcher.storedFile !== undefined && {
        storedFile: (layer, entry, opts) => fetcher.storedFile!(image.layers[layer]!, entry, opts)
      }),
      ...(onError !== undefined && { onError }),
      ...(recorder !== undefined && { onRead: (path: string) => recorder.record(path) })
    }
  )
}

/** The mount as its caller sees it: the FUSE mount, the overlay on it (writable), the recorder. */
function served(
  mountpoint: string,
  tree: Tree,
  fuseMount: Mount | HeldMount,
  overlay: boolean,
  recorder: ReadRecorder | undefined
): ServedMount {
  let closing: Promise<void> | undefined
  const mount: ServedMount = {
    mountpoint,
    tree,
    ...(recorder && { recorder }),
    ...(fuseMount.fuse !== undefined && { fuse: fuseMount.fuse }),
    unmount() {
      closing ??= (async () => {
        if (overlay) await unmountOverlay(mountpoint)
        await fuseMount.unmount()
        await recorder?.close()
      })()
      return closing
    }
  }
  if ('detach' in fuseMount) {
    return Object.assign(mount, {
      detach() {
        closing ??= (async () => {
          await fuseMount.detach()
          await recorder?.close()
        })()
        return closing
      },
      update: (meta: unknown) => fuseMount.update(meta)
    })
  }
  return mount
}

async function mountAt<L extends { toc: TOC }>(
  init: ServeMountInit<L>,
  tree: Tree,
  target: HeldDirectory,
  recorder: ReadRecorder | undefined,
  options?: AbortOptions
): Promise<ServedMount> {
  const { image, fetcher, mountpoint, holder } = init
  const ops = operationsOf(image, fetcher, tree, init.onError, recorder)
  const record = (): HeldRecord => ({
    strata: 1,
    mountpoint,
    ...(init.writableDir !== undefined && { writableDir: init.writableDir }),
    ...(init.recordFile !== undefined && { recordFile: init.recordFile }),
    // The next process writes the record on: it must know for whom.
    owner: init.policy?.caller ?? thisProcess(),
    numbering: tree.numbering,
    meta: init.meta
  })
  const mountOn = async (dir: HeldDirectory | string): Promise<Mount | HeldMount> => {
    if (holder === undefined) return mountFuse(ops, dir, init.fuse, options)
    const held = typeof dir === 'string' ? await holdMountpoint(dir) : dir
    try {
      return await mountThroughHolder(ops, held, holder, record(), init.fuse, options)
    } finally {
      if (typeof dir === 'string') await held.close()
    }
  }

  if (init.writableDir === undefined) return served(mountpoint, tree, await mountOn(target), false, recorder)

  const lower = join(init.writableDir, 'lower')
  const upper = join(init.writableDir, 'upper')
  const work = join(init.writableDir, 'work')
  for (const dir of [lower, upper, work]) await mkdir(dir, { recursive: true })
  const fuseMount = await mountOn(lower)
  try {
    await mountOverlay({ lower, upper, work }, target, options)
  } catch (err) {
    await fuseMount.unmount()
    throw err
  }
  return served(mountpoint, tree, fuseMount, true, recorder)
}

/** The mounts a holder keeps that serveMount made (others are not strata's: left alone). */
export async function heldMounts(holder: FuseHolder, options?: AbortOptions): Promise<HeldMountInfo[]> {
  const found: HeldMountInfo[] = []
  for (const session of await holder.sessions(options)) {
    const r = session.meta as Partial<HeldRecord> | undefined
    if (r?.strata !== 1 || typeof r.mountpoint !== 'string') continue
    found.push({
      session,
      mountpoint: r.mountpoint,
      ...(typeof r.writableDir === 'string' && { writableDir: r.writableDir }),
      ...(typeof r.recordFile === 'string' && { recordFile: r.recordFile }),
      ...(r.owner !== undefined && { owner: r.owner }),
      meta: r.meta
    })
  }
  return found
}

/**
 * Serves a mount the holder kept (made by serveMount in an earlier process, which died or stopped) with the same
 * image: at once, so the requests it kept (a read in progress) and those that wait are answered. The record, if
 * any, goes on from the file the earlier process wrote.
 */
export async function resumeMount<L extends { toc: TOC }>(
  init: ResumeMountInit<L>,
  options?: AbortOptions
): Promise<ServedMount> {
  const { held } = init
  const tree = treeOf(init.image)
  const numbering = (held.session.meta as HeldRecord).numbering
  if (tree.numbering !== numbering) {
    throw new MountError(
      held.mountpoint,
      "the image's files are numbered differently from when it was mounted (another strata version?): the kernel's node ids would name other files",
      `unmount it: p2p-mount --unmount ${held.mountpoint}`
    )
  }
  if (held.writableDir !== undefined && !(await isMounted(held.mountpoint))) {
    throw new MountError(held.mountpoint, 'its overlay is no longer mounted', 'mount it again')
  }
  const recorder =
    held.recordFile !== undefined
      ? await createReadRecorder(held.recordFile, {
          ...(held.owner !== undefined && { owner: held.owner }),
          resume: true
        })
      : undefined
  try {
    const ops = operationsOf(init.image, init.fetcher, tree, init.onError, recorder)
    const fuseMount = await resumeHeld(ops, init.holder, held.session, init.fuse, options)
    return served(held.mountpoint, tree, fuseMount, held.writableDir !== undefined, recorder)
  } catch (err) {
    await recorder?.close().catch(() => {})
    throw err
  }
}

/** Ends a held mount that will not be served again (its image cannot be opened): unmounted, lazily. */
export async function discardMount(holder: FuseHolder, held: HeldMountInfo): Promise<void> {
  if (held.writableDir !== undefined && (await isMounted(held.mountpoint))) await unmountOverlay(held.mountpoint)
  await discardHeld(holder, held.session)
}

/**
 * The overlay is `nosuid,nodev` like the FUSE mount under it: a setuid program or a device node of the image
 * must not give a local user more than the user has. (Containers, which need setuid, are mounted elsewhere.)
 */
async function mountOverlay(
  dirs: { lower: string; upper: string; work: string },
  target: HeldDirectory,
  options?: AbortOptions
): Promise<void> {
  for (const dir of [dirs.lower, dirs.upper, dirs.work]) {
    if (/[,:\\]/.test(dir)) {
      throw new MountError(
        target.path,
        `overlayfs cannot use '${dir}' (it has ',', ':' or '\\')`,
        'use another --data-dir'
      )
    }
  }
  const opts = `nosuid,nodev,lowerdir=${dirs.lower},upperdir=${dirs.upper},workdir=${dirs.work}`
  try {
    options?.signal?.throwIfAborted()
    await withFds([target.handle.fd], 'mount', ['-c', '-t', 'overlay', 'overlay', '-o', opts, '/proc/self/fd/3'])
  } catch (err) {
    throw new MountError(
      target.path,
      `overlayfs mount failed: ${(err as Error).message}`,
      'writable mounts need root and a kernel with overlayfs (modprobe overlay); check `dmesg`',
      { cause: err }
    )
  }
}

/** Unmounts the overlay; lazily when it is busy, so the FUSE mount under it can go too. */
async function unmountOverlay(mountpoint: string): Promise<void> {
  try {
    await exec('umount', [mountpoint], { timeout: 30_000 })
  } catch {
    try {
      await exec('umount', ['-l', mountpoint], { timeout: 30_000 })
    } catch (err) {
      throw new UnmountError(mountpoint, ((err as { stderr?: string }).stderr ?? String(err)).trim(), undefined, {
        cause: err
      })
    }
  }
}
