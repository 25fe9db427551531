import { execFile } from 'node:child_process'
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { promisify } from 'node:util'
import type { AbortOptions, Entry, TOC } from '@strata/stargz'
import { MountError, UnmountError } from './errors.js'
import { type FuseMountInit, type Mount, mountFuse } from './fuse.js'
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
  const { image, fetcher, mountpoint } = init
  const tree = treeOf(image)
  const recorder = init.recordFile !== undefined ? createReadRecorder(init.recordFile) : undefined
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

  if (init.writableDir === undefined) return served(await mountFuse(ops, mountpoint, init.fuse, options), false)

  const lower = join(init.writableDir, 'lower')
  const upper = join(init.writableDir, 'upper')
  const work = join(init.writableDir, 'work')
  for (const dir of [lower, upper, work]) await mkdir(dir, { recursive: true })
  const fuseMount = await mountFuse(ops, lower, init.fuse, options)
  try {
    await mountOverlay({ lower, upper, work, mountpoint }, options)
  } catch (err) {
    await fuseMount.unmount()
    throw err
  }
  return served(fuseMount, true)
}

async function mountOverlay(
  dirs: { lower: string; upper: string; work: string; mountpoint: string },
  options?: AbortOptions
): Promise<void> {
  for (const dir of [dirs.lower, dirs.upper, dirs.work]) {
    if (/[,:\\]/.test(dir)) {
      throw new MountError(
        dirs.mountpoint,
        `overlayfs cannot use '${dir}' (it has ',', ':' or '\\')`,
        'use another --data-dir'
      )
    }
  }
  const opts = `lowerdir=${dirs.lower},upperdir=${dirs.upper},workdir=${dirs.work}`
  try {
    await exec('mount', ['-t', 'overlay', 'overlay', '-o', opts, dirs.mountpoint], {
      timeout: 30_000,
      signal: options?.signal
    })
  } catch (err) {
    const stderr = ((err as { stderr?: string }).stderr ?? '').trim()
    throw new MountError(
      dirs.mountpoint,
      `overlayfs mount failed: ${stderr || (err as Error).message}`,
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
