// The layer store's file system (see layer-store.ts): the store's directories and files as nodes, made as
// lookups find them (an image per base64 reference, its layers by key, each layer's diff, info and blob), and
// the requests that need no transport. The FUSE side is layer-store-session.ts.
import { constants as fsConstants } from 'node:fs'
import { isSha256Digest, UNCOMPRESSED_SIZE_ANNOTATION } from '@strata/base'
import { FsError } from './errors.js'
import { diffTree } from './layer-diff.js'
import type { LayerStoreInit, LayerStoreStats, StoreImage, StoreLayer } from './layer-store-types.js'
import { createOperations, type Operations, type Stat } from './operations.js'
import type { Tree } from './tree.js'

/** A layer's compression as containers-storage's archive.Compression numbers it. */
const COMPRESSION: Record<string, number> = { none: 0, gzip: 2, zstd: 4 }

/**
 * The `info` file: what containers-storage decodes into its Layer record. Keyed by layer digest (1.43-1.53):
 * the compressed and uncompressed digests and sizes, and the compression. Keyed by TOC digest (1.54+): the TOC
 * digest, and the diff ID only as the value the image claims (`flags.expected-layer-diffid`): strata serves the
 * files the TOC lists and never saw the tar whose digest that is. `diff-size` is the size the layer's
 * annotation states, or -1 (unknown) in the newer layout, and left out in the older.
 */
export function infoOf(layer: StoreLayer, diffId: string, byToc: boolean): Record<string, unknown> {
  const stated = Number(layer.descriptor.annotations?.[UNCOMPRESSED_SIZE_ANNOTATION] ?? Number.NaN)
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

const enc = new TextEncoder()

/** The store's file system: its nodes, and the requests that need no transport. */
export class StoreFs<L extends StoreLayer> {
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
    if (key === USE || !isSha256Digest(key)) return undefined
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
