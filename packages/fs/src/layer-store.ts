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
import { close, constants as fsConstants, open, write } from 'node:fs'
import { mkdir, readFile } from 'node:fs/promises'
import { constants } from 'node:os'
import { resolve } from 'node:path'
import type { AbortOptions, TOC } from '@strata/stargz'
import { FsError, MountError, UnmountError } from './errors.js'
import { isMounted, lazyUnmount, MAX_READ, Relay, setReadAhead, withFds } from './fuse.js'
import { diffTree } from './layer-diff.js'
import { holdMountpoint } from './mountpoint.js'
import { createOperations, type Operations, type ReadFailure, type Stat } from './operations.js'
// The reply encoders are protocol.ts's: this session answers other requests, in the same wire format.
import {
  cString,
  frame,
  message,
  Op,
  OUT_HEADER,
  parseRequest,
  type Request,
  sized,
  view,
  writeAttr
} from './protocol.js'
import type { LayerReader } from './serve.js'
import type { Tree } from './tree.js'

/** One layer of an opened image, as the fetcher's ImageLayer has it (structurally: fs does not import the fetcher). */
export interface StoreLayer {
  digest: string
  descriptor: { size: number; annotations?: Record<string, string> }
  format: string
  toc: TOC
  tocDigest: string
  /** The manifest vouches for the TOC. */
  verified: boolean
  compression: string
}

export interface StoreImage<L extends StoreLayer> {
  digest: string
  config: { digest: string }
  layers: readonly L[]
}

/** What the store reads through: in p2pd, its node (images, chunks) and the registry (the config, the blob). */
export interface LayerStoreSource<L extends StoreLayer> {
  /** Opens the image a reference names now (p2pd: as a local caller). */
  openImage(ref: string, options?: AbortOptions): Promise<StoreImage<L>>
  /** A small blob read whole and digest-checked: the image config, for its diff IDs. */
  fetchBlob(ref: string, digest: string, options?: AbortOptions): Promise<Uint8Array>
  /** `length` bytes of the compressed layer blob from `offset` (fewer at its end). */
  readBlob(ref: string, layer: L, offset: number, length: number, options?: AbortOptions): Promise<Uint8Array>
  fetcher: LayerReader<L>
}

export interface LayerStoreInit<L extends StoreLayer> {
  source: LayerStoreSource<L>
  /** The directory to mount the store on (created when missing; a store left mounted there is unmounted). */
  mountpoint: string
  /** What happened: images opened, layers used and released, failures (one line each). */
  log?: (message: string) => void
  /** A read of a layer's file failed and the reader got EIO. */
  onError?: (failure: ReadFailure) => void
  /** Each FUSE request, one line on stderr. */
  debug?: boolean
  /**
   * How long opening an image for a lookup may take (default 5 min: layers that are not eStargz are downloaded
   * whole first). podman's stat waits that long; when it fails, podman pulls the layers itself.
   */
  openTimeoutMs?: number
}

export interface LayerStoreStats {
  /** Images opened for lookups. */
  images: number
  /** Layer directories looked up. */
  layers: number
  /** `use` files podman created (layers it took) and layer directories it removed (let go). */
  uses: number
  releases: number
  /** Bytes read from `blob` files, and from files under `diff`. */
  blobBytes: number
  diffBytes: number
}

export interface LayerStore {
  readonly mountpoint: string
  stats(): LayerStoreStats
  /** Unmounts (lazily: a store in use by containers goes too; their reads fail from then on). */
  unmount(): Promise<void>
}

/** A layer's compression as containers-storage's archive.Compression numbers it. */
const COMPRESSION: Record<string, number> = { none: 0, gzip: 2, zstd: 4 }
const UNCOMPRESSED_SIZE = 'io.containers.estargz.uncompressed-size'

/**
 * The `info` file: what containers-storage decodes into its Layer record. Keyed by layer digest (1.43-1.53):
 * the compressed and uncompressed digests and sizes, and the compression. Keyed by TOC digest (1.54+): the TOC
 * digest, and the diff ID only as the value the image claims (`flags.expected-layer-diffid`): strata serves the
 * files the TOC lists and never saw the tar whose digest that is. `diff-size` is the size the layer's
 * annotation states, or -1 (unknown) in the newer layout, and left out in the older.
 */
export function infoOf(layer: StoreLayer, diffId: string, byToc: boolean): Record<string, unknown> {
  const stated = Number(layer.descriptor.annotations?.[UNCOMPRESSED_SIZE] ?? Number.NaN)
  const size = Number.isSafeInteger(stated) && stated >= 0 ? stated : undefined
  const compression = COMPRESSION[layer.compression] ?? 0
  if (byToc) {
    return {
      'compressed-size': layer.descriptor.size,
      'diff-size': size ?? -1,
      compression,
      'toc-digest': layer.tocDigest,
      flags: { 'expected-layer-diffid': diffId }
    }
  }
  return {
    'compressed-diff-digest': layer.digest,
    'compressed-size': layer.descriptor.size,
    'diff-digest': diffId,
    ...(size !== undefined && { 'diff-size': size }),
    compression
  }
}

/** The layers a TOC digest may name: lazily served ones whose TOC the manifest vouches for (as 1.54 wants). */
function tocKeyed(layer: StoreLayer): boolean {
  return layer.verified && layer.format !== 'indexed'
}

const DIGEST = /^sha256:[0-9a-f]{64}$/
const USE = 'use'
const DAY = 86_400
/** Diff trees' node ids: instance k numbers its inodes from k * 2^32 (store nodes are below 2^32). */
const SPAN = 2 ** 32

interface RefNode<L extends StoreLayer> {
  kind: 'ref'
  id: number
  ref: string
  image: StoreImage<L>
  diffIds: string[]
  /** Layer directories by key. */
  layers: Map<string, LayerNode<L>>
  refreshing?: Promise<void>
}

interface LayerNode<L extends StoreLayer> {
  kind: 'layer'
  id: number
  key: string
  parent: RefNode<L>
  layer: L
  info: InfoNode
  blob: BlobNode<L>
  diff?: DiffInstance
}

interface InfoNode {
  kind: 'info'
  id: number
  bytes: Uint8Array
}

interface BlobNode<L extends StoreLayer> {
  kind: 'blob'
  id: number
  owner: LayerNode<L>
}

interface DiffInstance {
  base: number
  /** The layer directory's node id. */
  owner: number
  tree: Tree
  ops: Operations
}

/** A layer of an image a key names, before its directory is made. */
interface Found<L extends StoreLayer> {
  layer: L
  diffId: string
  byToc: boolean
}

type StoreNode<L extends StoreLayer> = { kind: 'root'; id: 1 } | RefNode<L> | LayerNode<L> | InfoNode | BlobNode<L>

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

const enc = new TextEncoder()

/** The store's file system: its nodes, and the requests that need no transport. */
class StoreFs<L extends StoreLayer> {
  readonly counts: LayerStoreStats = { images: 0, layers: 0, uses: 0, releases: 0, blobBytes: 0, diffBytes: 0 }
  readonly #init: LayerStoreInit<L>
  readonly #nodes = new Map<number, StoreNode<L>>([[1, { kind: 'root', id: 1 }]])
  readonly #refs = new Map<string, Promise<RefNode<L>>>()
  readonly #diffs = new Map<number, DiffInstance>()
  #nextId = 2
  #nextDiff = 1

  constructor(init: LayerStoreInit<L>) {
    this.#init = init
  }

  #log(message: string): void {
    this.#init.log?.(`layer store: ${message}`)
  }

  /** The node a node id names: a store node, or a node of a layer's diff tree with its instance and path. */
  node(id: number): StoreNode<L> | { kind: 'diff'; diff: DiffInstance; path: string } {
    if (id >= SPAN) {
      const diff = this.#diffs.get(Math.floor(id / SPAN))
      const path = diff?.tree.pathOf(id - diff.base)
      if (diff === undefined || path === undefined) throw new FsError('ESTALE', `unknown node ${id}`)
      return { kind: 'diff', diff, path }
    }
    const node = this.#nodes.get(id)
    if (node === undefined) throw new FsError('ESTALE', `unknown node ${id}`)
    return node
  }

  attr(id: number): Stat {
    const node = this.node(id)
    if (node.kind === 'diff') return this.#diffStat(node.diff, node.path)
    const base = { ino: id, nlink: 1, uid: 0, gid: 0, rdev: 0, blksize: 4096, mtimeMs: 0 }
    if (node.kind === 'info' || node.kind === 'blob') {
      const size = node.kind === 'info' ? node.bytes.length : node.owner.layer.descriptor.size
      return { ...base, mode: fsConstants.S_IFREG | 0o400, size, blocks: Math.ceil(size / 512) }
    }
    return { ...base, mode: fsConstants.S_IFDIR | 0o700, nlink: 2, size: 4096, blocks: 8 }
  }

  #diffStat(diff: DiffInstance, path: string): Stat {
    const s = diff.ops.getattr(path)
    return { ...s, ino: diff.base + s.ino }
  }

  /** A child's node id, or undefined when there is none (ENOENT, never cached). */
  async lookup(parent: number, name: string, signal: AbortSignal): Promise<number | undefined> {
    const node = this.node(parent)
    switch (node.kind) {
      case 'root':
        return (await this.#ref(name, signal))?.id
      case 'ref':
        return (await this.#layer(node, name, signal))?.id
      case 'layer':
        if (name === 'info') return node.info.id
        if (name === 'blob') return node.blob.id
        if (name === 'diff') return this.#diff(node).base + 1
        return undefined
      case 'diff': {
        const path = node.path === '/' ? `/${name}` : `${node.path}/${name}`
        try {
          return this.#diffStat(node.diff, path).ino
        } catch (err) {
          if (err instanceof FsError && err.code === 'ENOENT') return undefined
          throw err
        }
      }
      default:
        throw new FsError('ENOTDIR', 'not a directory')
    }
  }

  /** Entries are cached for a day inside layers (they never change), and for a second above them. */
  entryTimeout(id: number): number {
    return id >= SPAN ? DAY : 1
  }

  async #ref(name: string, signal: AbortSignal): Promise<RefNode<L> | undefined> {
    const known = this.#refs.get(name)
    if (known !== undefined) return known.catch(() => undefined)
    const ref = decodeRef(name)
    if (ref === undefined) return undefined
    const opening = this.#open(ref, signal)
    this.#refs.set(name, opening)
    opening.catch((err: Error) => {
      // Asked again, it is opened again: the registry may answer next time, or the image be pushed meanwhile.
      if (this.#refs.get(name) === opening) this.#refs.delete(name)
      this.#log(`cannot open ${ref}: ${err.message}`)
    })
    return opening.catch(() => undefined)
  }

  async #open(ref: string, signal: AbortSignal, into?: RefNode<L>): Promise<RefNode<L>> {
    const timeout = AbortSignal.timeout(this.#init.openTimeoutMs ?? 300_000)
    const options = { signal: AbortSignal.any([signal, timeout]) }
    const image = await this.#init.source.openImage(ref, options)
    const config = JSON.parse(
      new TextDecoder().decode(await this.#init.source.fetchBlob(ref, image.config.digest, options))
    ) as { rootfs?: { diff_ids?: unknown } }
    const diffIds = config.rootfs?.diff_ids
    if (
      !Array.isArray(diffIds) ||
      diffIds.length !== image.layers.length ||
      !diffIds.every((d) => typeof d === 'string')
    ) {
      throw new Error(`the config of ${ref} does not list one diff ID per layer`)
    }
    this.counts.images++
    this.#log(`opened ${ref} (${image.digest}, ${image.layers.length} layers)`)
    if (into !== undefined) {
      into.image = image
      into.diffIds = diffIds
      return into
    }
    const node: RefNode<L> = { kind: 'ref', id: this.#nextId++, ref, image, diffIds, layers: new Map() }
    this.#nodes.set(node.id, node)
    return node
  }

  async #layer(ref: RefNode<L>, key: string, signal: AbortSignal): Promise<LayerNode<L> | undefined> {
    if (key === USE || !DIGEST.test(key)) return undefined
    let found = this.#find(ref, key)
    if (found === undefined) {
      // A tag may have moved since the image was opened: ask the registry what it names now, once at a time.
      ref.refreshing ??= this.#open(ref.ref, signal, ref)
        .then(() => {})
        .finally(() => {
          ref.refreshing = undefined
        })
      await ref.refreshing.catch(() => {})
      found = this.#find(ref, key)
      if (found === undefined) return undefined
    }
    return this.#make(ref, key, found)
  }

  /** The layer directory `key` names (made the first time). */
  #make(ref: RefNode<L>, key: string, found: LayerNode<L> | Found<L>): LayerNode<L> {
    if ('kind' in found) return found
    const { layer, diffId, byToc } = found
    const id = this.#nextId
    this.#nextId += 3
    const info = enc.encode(`${JSON.stringify(infoOf(layer, diffId, byToc))}\n`)
    const node: LayerNode<L> = {
      kind: 'layer',
      id,
      key,
      parent: ref,
      layer,
      info: { kind: 'info', id: id + 1, bytes: info },
      blob: undefined as unknown as BlobNode<L>
    }
    node.blob = { kind: 'blob', id: id + 2, owner: node }
    for (const n of [node, node.info, node.blob]) this.#nodes.set(n.id, n)
    ref.layers.set(key, node)
    this.counts.layers++
    return node
  }

  #find(ref: RefNode<L>, key: string): LayerNode<L> | Found<L> | undefined {
    const known = ref.layers.get(key)
    if (known !== undefined) return known
    const layers = ref.image.layers
    let i = layers.findIndex((l) => l.digest === key)
    if (i >= 0) return { layer: layers[i]!, diffId: ref.diffIds[i]!, byToc: false }
    i = layers.findIndex((l) => tocKeyed(l) && l.tocDigest === key)
    if (i >= 0) return { layer: layers[i]!, diffId: ref.diffIds[i]!, byToc: true }
    return undefined
  }

  #diff(node: LayerNode<L>): DiffInstance {
    if (node.diff !== undefined) return node.diff
    const tree = diffTree(node.layer.toc)
    const { fetcher } = this.#init.source
    const layer = node.layer
    const ops = createOperations(
      tree,
      (_i, entry, offset, into, o) => fetcher.readRange(layer, entry, offset, into, o),
      {
        // The chunk buffer is the reader's, shared by every layer and mount it serves.
        ...(this.#init.onError !== undefined && { onError: this.#init.onError })
      }
    )
    const k = this.#nextDiff++
    node.diff = { base: k * SPAN, owner: node.id, tree, ops }
    this.#diffs.set(k, node.diff)
    return node.diff
  }

  /** Names in a directory with their node ids (`.` and `..` left to the caller). */
  list(id: number): { name: string; id: number }[] {
    const node = this.node(id)
    switch (node.kind) {
      case 'root':
        return []
      case 'ref':
        // The keys of the older layout; a layer directory is made when listed, as when looked up.
        return node.image.layers.map((l) => ({
          name: l.digest,
          id: this.#make(node, l.digest, this.#find(node, l.digest)!).id
        }))
      case 'layer':
        return [
          { name: 'blob', id: node.blob.id },
          { name: 'diff', id: this.#diff(node).base + 1 },
          { name: 'info', id: node.info.id }
        ]
      case 'diff': {
        const { diff, path } = node
        return diff.ops.readdir(path).map((name) => ({
          name,
          id: this.#diffStat(diff, path === '/' ? `/${name}` : `${path}/${name}`).ino
        }))
      }
      default:
        throw new FsError('ENOTDIR', 'not a directory')
    }
  }

  parentOf(id: number): number {
    const node = this.node(id)
    if (node.kind === 'ref') return 1
    if (node.kind === 'layer') return node.parent.id
    if (node.kind === 'diff') {
      if (node.path === '/') return node.diff.owner
      const up = node.path.slice(0, node.path.lastIndexOf('/')) || '/'
      return this.#diffStat(node.diff, up).ino
    }
    return 1
  }

  open(id: number, flags: number): void {
    const node = this.node(id)
    const writing = fsConstants.O_WRONLY | fsConstants.O_RDWR | fsConstants.O_TRUNC | fsConstants.O_APPEND
    if (node.kind === 'diff') node.diff.ops.open(node.path, flags)
    else if ((flags & writing) !== 0) throw new FsError('EROFS', 'the layer store is read-only')
  }

  async read(id: number, offset: number, into: Uint8Array, signal: AbortSignal): Promise<number> {
    const node = this.node(id)
    if (node.kind === 'diff') {
      const n = await node.diff.ops.read(node.path, offset, into, { signal })
      this.counts.diffBytes += n
      return n
    }
    if (node.kind === 'info') {
      const part = node.bytes.subarray(Math.min(offset, node.bytes.length), offset + into.length)
      into.set(part)
      return part.length
    }
    if (node.kind === 'blob') {
      const { layer, parent } = node.owner
      const length = Math.max(0, Math.min(into.length, layer.descriptor.size - offset))
      if (length === 0) return 0
      let bytes: Uint8Array
      try {
        bytes = await this.#init.source.readBlob(parent.ref, layer, offset, length, { signal })
      } catch (err) {
        this.#log(`reading the blob of ${layer.digest} at ${offset}+${length} failed: ${(err as Error).message}`)
        throw new FsError('EIO', `reading the blob of ${layer.digest} failed`, { cause: err })
      }
      into.set(bytes.subarray(0, length))
      this.counts.blobBytes += Math.min(bytes.length, length)
      return Math.min(bytes.length, length)
    }
    throw new FsError('EISDIR', 'is a directory')
  }

  readlink(id: number): string {
    const node = this.node(id)
    if (node.kind !== 'diff') throw new FsError('EINVAL', 'not a symlink')
    return node.diff.ops.readlink(node.path)
  }

  getxattr(id: number, name: string): Uint8Array {
    const node = this.node(id)
    if (node.kind === 'diff') return node.diff.ops.getxattr(node.path, name)
    throw new FsError('ENODATA', `no attribute ${name}`)
  }

  listxattr(id: number): string[] {
    const node = this.node(id)
    return node.kind === 'diff' ? node.diff.ops.listxattr(node.path) : []
  }

  access(id: number, mode: number): void {
    const node = this.node(id)
    if (node.kind === 'diff') node.diff.ops.access(node.path, mode)
  }

  /** podman takes a layer: `use` created in its directory. */
  create(parent: number, name: string): never {
    const node = this.node(parent)
    if (node.kind === 'layer' && name === USE) {
      this.counts.uses++
      this.#log(`podman uses ${node.parent.ref} ${node.key}`)
      throw new FsError('ENOENT', 'noted')
    }
    throw new FsError('EROFS', 'the layer store is read-only')
  }

  unlink(parent: number, name: string): void {
    const node = this.node(parent)
    if (!(node.kind === 'layer' && name === USE)) throw new FsError('EROFS', 'the layer store is read-only')
  }

  /** podman lets a layer go: its directory removed. */
  rmdir(parent: number, name: string): never {
    const node = this.node(parent)
    const layer = node.kind === 'ref' ? node.layers.get(name) : undefined
    if (layer === undefined) throw new FsError('EROFS', 'the layer store is read-only')
    this.counts.releases++
    this.#log(`podman released ${node.kind === 'ref' ? node.ref : ''} ${name}`)
    throw new FsError('ENOENT', 'noted')
  }
}

/** base64(reference) as containers-storage writes it (standard alphabet, padded), or undefined. */
export function decodeRef(name: string): string | undefined {
  if (!/^[A-Za-z0-9+/]+={0,2}$/.test(name) || name.length % 4 !== 0) return undefined
  const ref = Buffer.from(name, 'base64').toString('utf8')
  if (Buffer.from(ref, 'utf8').toString('base64') !== name) return undefined
  if (ref === '' || /[\s\0]/.test(ref)) return undefined
  return ref
}

// ---- The FUSE side -------------------------------------------------------------------------------------------

const ATTR = 88
const Init = { ASYNC_READ: 1 << 0, PARALLEL_DIROPS: 1 << 18, MAX_PAGES: 1 << 22, CACHE_SYMLINKS: 1 << 23 }
const FOPEN_KEEP_CACHE = 1 << 1
const UNANSWERED = new Set<number>([Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT])

/** Answers the kernel's requests for one store. Every answer may wait (a lookup opens an image). */
class StoreSession<L extends StoreLayer> {
  readonly #fs: StoreFs<L>
  readonly #dirs = new Map<bigint, { name: Buffer; id: number; type: number }[]>()
  #nextHandle = 1n
  minor = 0

  constructor(fs: StoreFs<L>) {
    this.#fs = fs
  }

  async answer(req: Request, signal: AbortSignal): Promise<Uint8Array | undefined> {
    if (UNANSWERED.has(req.opcode)) return undefined
    try {
      return frame(await this.#answer(req, signal), req.unique, 0)
    } catch (err) {
      const errno = err instanceof FsError ? err.errno : constants.errno.EIO
      return frame(new Uint8Array(OUT_HEADER), req.unique, errno)
    }
  }

  async #answer(req: Request, signal: AbortSignal): Promise<Uint8Array> {
    const { body, nodeid } = req
    const fs = this.#fs
    switch (req.opcode) {
      case Op.INIT:
        return this.#handshake(body)
      case Op.LOOKUP: {
        const id = await fs.lookup(nodeid, cString(body), signal)
        if (id === undefined) throw new FsError('ENOENT', 'no such entry')
        const t = fs.entryTimeout(id)
        const { bytes, v } = message(40 + ATTR)
        v.setBigUint64(OUT_HEADER, BigInt(id), true)
        v.setBigUint64(OUT_HEADER + 16, BigInt(t), true)
        v.setBigUint64(OUT_HEADER + 24, BigInt(t), true)
        writeAttr(v, OUT_HEADER + 40, fs.attr(id))
        return bytes
      }
      case Op.GETATTR: {
        const { bytes, v } = message(16 + ATTR)
        v.setBigUint64(OUT_HEADER, BigInt(fs.entryTimeout(nodeid)), true)
        writeAttr(v, OUT_HEADER + 16, fs.attr(nodeid))
        return bytes
      }
      case Op.READLINK: {
        const target = Buffer.from(fs.readlink(nodeid))
        const { bytes } = message(target.length)
        bytes.set(target, OUT_HEADER)
        return bytes
      }
      case Op.OPEN: {
        fs.open(nodeid, view(body).getUint32(0, true))
        const { bytes, v } = message(16)
        v.setUint32(OUT_HEADER + 8, FOPEN_KEEP_CACHE, true)
        return bytes
      }
      case Op.READ: {
        const v = view(body)
        const offset = Number(v.getBigUint64(8, true))
        const size = Math.min(v.getUint32(16, true), MAX_READ)
        const out = new Uint8Array(OUT_HEADER + size)
        const n = await fs.read(nodeid, offset, out.subarray(OUT_HEADER), signal)
        return out.subarray(0, OUT_HEADER + n)
      }
      case Op.OPENDIR: {
        const self = fs.attr(nodeid)
        const parent = fs.attr(fs.parentOf(nodeid))
        const type = (s: Stat) => (s.mode >>> 12) & 0xf
        const entries = [
          { name: Buffer.from('.'), id: nodeid, type: type(self) },
          { name: Buffer.from('..'), id: parent.ino, type: type(parent) },
          ...fs.list(nodeid).map((e) => ({ name: Buffer.from(e.name), id: e.id, type: type(fs.attr(e.id)) }))
        ]
        const handle = this.#nextHandle++
        this.#dirs.set(handle, entries)
        const { bytes, v } = message(16)
        v.setBigUint64(OUT_HEADER, handle, true)
        return bytes
      }
      case Op.READDIR:
        return this.#readdir(body)
      case Op.RELEASEDIR:
        this.#dirs.delete(view(body).getBigUint64(0, true))
        return message(0).bytes
      case Op.RELEASE:
      case Op.FLUSH:
      case Op.FSYNC:
      case Op.FSYNCDIR:
      case Op.DESTROY:
        return message(0).bytes
      case Op.STATFS: {
        const { bytes, v } = message(80)
        v.setUint32(OUT_HEADER + 40, 4096, true) // bsize
        v.setUint32(OUT_HEADER + 44, 255, true) // namelen
        v.setUint32(OUT_HEADER + 48, 4096, true) // frsize
        return bytes
      }
      case Op.GETXATTR:
        return sized(fs.getxattr(nodeid, cString(body, 8)), view(body).getUint32(0, true))
      case Op.LISTXATTR: {
        const names = Buffer.from(
          fs
            .listxattr(nodeid)
            .map((n) => `${n}\0`)
            .join('')
        )
        return sized(names, view(body).getUint32(0, true))
      }
      case Op.ACCESS:
        fs.access(nodeid, view(body).getUint32(0, true))
        return message(0).bytes
      case Op.CREATE:
        // fuse_create_in is 16 bytes, then the name.
        return fs.create(nodeid, cString(body, 16))
      case Op.UNLINK:
        fs.unlink(nodeid, cString(body))
        return message(0).bytes
      case Op.RMDIR:
        return fs.rmdir(nodeid, cString(body))
      case Op.SETATTR:
      case Op.SYMLINK:
      case Op.MKNOD:
      case Op.MKDIR:
      case Op.RENAME:
      case Op.RENAME2:
      case Op.LINK:
      case Op.WRITE:
      case Op.SETXATTR:
      case Op.REMOVEXATTR:
      case Op.FALLOCATE:
      case Op.COPY_FILE_RANGE:
      case Op.TMPFILE:
        throw new FsError('EROFS', 'the layer store is read-only')
      default:
        throw new FsError('ENOSYS', `request ${req.opcode} is not implemented`)
    }
  }

  #handshake(body: Uint8Array): Uint8Array {
    const v = view(body)
    const major = v.getUint32(0, true)
    const minor = v.getUint32(4, true)
    if (major !== 7 || minor < 28) throw new FsError('EPROTO', `the kernel speaks FUSE ${major}.${minor}`)
    this.minor = Math.min(minor, 31)
    const wanted = Init.ASYNC_READ | Init.PARALLEL_DIROPS | Init.MAX_PAGES | Init.CACHE_SYMLINKS
    const { bytes, v: out } = message(64)
    const at = OUT_HEADER
    out.setUint32(at, 7, true)
    out.setUint32(at + 4, this.minor, true)
    out.setUint32(at + 8, v.getUint32(8, true), true) // max_readahead: what the kernel offers
    out.setUint32(at + 12, (v.getUint32(12, true) & wanted) >>> 0, true)
    out.setUint16(at + 16, 64, true) // max_background
    out.setUint16(at + 18, 48, true) // congestion_threshold
    out.setUint32(at + 20, 128 * 1024, true) // max_write (nothing is written)
    out.setUint32(at + 24, 1, true) // time_gran
    out.setUint16(at + 28, MAX_READ / 4096, true) // max_pages
    return bytes
  }

  #readdir(body: Uint8Array): Uint8Array {
    const v = view(body)
    const entries = this.#dirs.get(v.getBigUint64(0, true))
    if (entries === undefined) throw new FsError('EBADF', 'unknown directory handle')
    const start = Number(v.getBigUint64(8, true))
    const size = v.getUint32(16, true)
    const direntSize = (e: { name: Buffer }) => (24 + e.name.length + 7) & ~7
    let used = 0
    let end = start
    while (end < entries.length && used + direntSize(entries[end]!) <= size) used += direntSize(entries[end++]!)
    const { bytes, v: out } = message(used)
    let at = OUT_HEADER
    for (let i = start; i < end; i++) {
      const e = entries[i]!
      out.setBigUint64(at, BigInt(e.id), true)
      out.setBigUint64(at + 8, BigInt(i + 1), true)
      out.setUint32(at + 16, e.name.length, true)
      out.setUint32(at + 20, e.type, true)
      bytes.set(e.name, at + 24)
      at += direntSize(e)
    }
    return bytes
  }
}

/** The store's FUSE connection: requests through fuse.ts's relay, replies written to /dev/fuse here. */
class StoreConnection<L extends StoreLayer> {
  readonly #fd: number
  readonly #relay: Relay
  readonly #session: StoreSession<L>
  readonly #inflight = new AbortController()
  readonly #writes = new Set<Promise<void>>()
  readonly #debug: boolean
  readonly #init = Promise.withResolvers<void>()
  #closed = false
  #ended: Promise<void> | undefined

  constructor(fd: number, fs: StoreFs<L>, debug: boolean) {
    this.#fd = fd
    this.#debug = debug
    this.#session = new StoreSession(fs)
    this.#init.promise.catch(() => {})
    this.#relay = new Relay(fd, (bytes) => this.#dispatch(bytes))
    this.#relay.ended.then((stderr) => {
      this.#init.reject(new Error(`the FUSE connection ended before it started${stderr ? `: ${stderr}` : ''}`))
      return this.#end()
    })
  }

  async started(mountpoint: string, timeoutMs: number): Promise<void> {
    const timer = setTimeout(
      () => this.#init.reject(new Error(`the layer store on ${mountpoint} did not start within ${timeoutMs} ms`)),
      timeoutMs
    )
    try {
      await this.#init.promise
    } finally {
      clearTimeout(timer)
    }
  }

  #dispatch(bytes: Buffer): void {
    // Each message is a buffer of its own (the relay reuses none), so it may wait for a lookup.
    const req = parseRequest(bytes)
    if (this.#debug) process.stderr.write(`layer store: #${req.unique} op ${req.opcode} node ${req.nodeid}\n`)
    void this.#session.answer(req, this.#inflight.signal).then((reply) => {
      if (reply !== undefined) this.#write(reply)
      if (req.opcode === Op.INIT) {
        if (this.#session.minor > 0) this.#init.resolve()
        else this.#init.reject(new Error('the kernel refused the FUSE protocol version'))
      }
    })
  }

  #write(reply: Uint8Array): void {
    if (this.#closed) return
    const done = new Promise<void>((resolve) => write(this.#fd, reply, 0, reply.length, null, () => resolve()))
    this.#writes.add(done)
    done.finally(() => this.#writes.delete(done))
  }

  async close(mountpoint: string): Promise<void> {
    this.#inflight.abort(new Error(`${mountpoint} is being unmounted`))
    const failure = await lazyUnmount(mountpoint)
    this.#relay.kill()
    await this.#end()
    if (failure !== undefined && (await isMounted(mountpoint))) {
      throw new UnmountError(mountpoint, failure, `try 'umount -l ${mountpoint}'`)
    }
  }

  #end(): Promise<void> {
    this.#ended ??= (async () => {
      await this.#relay.ended
      this.#closed = true
      this.#inflight.abort(new Error('the FUSE connection ended'))
      await Promise.allSettled(this.#writes)
      await new Promise<void>((resolve) => close(this.#fd, () => resolve()))
    })()
    return this.#ended
  }
}
