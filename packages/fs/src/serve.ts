import { execFile } from 'node:child_process'
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { promisify } from 'node:util'
import type { AbortOptions, Entry, TOC } from '@strata/stargz'
import { MountError, UnmountError } from './errors.js'
import { type FuseMountInit, type Mount, mountFuse, withFds } from './fuse.js'
import { type HeldDirectory, holdMountpoint, type MountpointPolicy } from './mountpoint.js'
import { createOperations, type ReadFailure } from './operations.js'
import { createReadRecorder, type ReadRecorder } from './record.js'
import { buildTree, type Tree } from './tree.js'

/** What a mount reads through: the fetcher's `readFile` (structurally; fs does not import the fetcher). */
export interface LayerReader<L> {
  readFile(layer: L, entry: Entry, offset: number, length: number, options?: AbortOptions): Promise<Uint8Array>
  /** The fetcher's fast path for chunks in the store (see ReadStored). */
  readStored?(
    layer: L,
    entry: Entry,
    offset: number,
    into: Uint8Array,
    options?: AbortOptions
  ): Promise<number | undefined>
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
}

export interface ServedMount extends Mount {
  readonly tree: Tree
  /** Present with `recordFile`. */
  readonly recorder?: ReadRecorder
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

async function mountAt<L extends { toc: TOC }>(
  init: ServeMountInit<L>,
  tree: Tree,
  target: HeldDirectory,
  recorder: ReadRecorder | undefined,
  options?: AbortOptions
): Promise<ServedMount> {
  const { image, fetcher, mountpoint } = init
  const ops = createOperations(
    tree,
    (layer, entry, offset, length, opts) => fetcher.readFile(image.layers[layer]!, entry, offset, length, opts),
    {
      ...(fetcher.readStored !== undefined && {
        readStored: (layer, entry, offset, into, opts) =>
          fetcher.readStored!(image.layers[layer]!, entry, offset, into, opts)
      }),
      ...(init.onError !== undefined && { onError: init.onError }),
      ...(recorder !== undefined && { onRead: (path: string) => recorder.record(path) })
    }
  )

  let closing: Promise<void> | undefined
  const served = (fuseMount: Mount, overlay: boolean): ServedMount => ({
    mountpoint,
    tree,
    ...(recorder && { recorder }),
    unmount() {
      closing ??= (async () => {
        if (overlay) await unmountOverlay(mountpoint)
        await fuseMount.unmount()
        await recorder?.close()
      })()
      return closing
    }
  })

  if (init.writableDir === undefined) {
    return served(await mountFuse(ops, target, init.fuse, options), false)
  }

  const lower = join(init.writableDir, 'lower')
  const upper = join(init.writableDir, 'upper')
  const work = join(init.writableDir, 'work')
  for (const dir of [lower, upper, work]) await mkdir(dir, { recursive: true })
  const fuseMount = await mountFuse(ops, lower, init.fuse, options)
  try {
    await mountOverlay({ lower, upper, work }, target, options)
  } catch (err) {
    await fuseMount.unmount()
    throw err
  }
  return served(fuseMount, true)
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
