import { digestHasher } from '@strata/base'
import { type Entry, implicitDir, type TOC } from '@strata/stargz'
import { UnsafePathError } from './errors.js'

export type NodeType = 'dir' | 'reg' | 'symlink' | 'char' | 'block' | 'fifo'

/** One inode of the merged file system. Hardlinked paths share one Node. */
export interface Node {
  /** Stable for the life of the tree; the root is 1. */
  readonly ino: number
  readonly type: NodeType
  mode: number
  uid: number
  gid: number
  /** File size; a symlink's target length; 4096 for directories. */
  readonly size: number
  mtimeMs: number
  readonly linkName?: string
  readonly devMajor: number
  readonly devMinor: number
  xattrs: Record<string, Uint8Array>
  nlink: number
  /** Regular files: the layer (index into the layers given to buildTree) and Entry whose bytes it has. */
  readonly source?: { layer: number; entry: Entry }
  /** Directories: child names, sorted. */
  names?: string[]
}

/** The merged, read-only root file system of an image. */
export interface Tree {
  readonly root: Node
  /** A node by path: `/a/b` (FUSE style) or `a/b`; `/` and `''` are the root. */
  lookup(path: string): Node | undefined
  /** Distinct inodes. */
  readonly inodes: number
  /** Sum of the sizes of distinct regular files. */
  readonly bytes: number
  /** A path of the node with inode number `ino` (FUSE style, `/a/b`; one of them for a hardlinked file). */
  pathOf(ino: number): string | undefined
  /**
   * The digest of the tree's inode numbering (every path with its inode number): a FUSE session made over one
   * tree can be served by another only when both number their files alike (the kernel holds node ids).
   */
  readonly numbering: string
}

const OPAQUE = '.wh..wh..opq'
const WHITEOUT = '.wh.'

interface Building extends Node {
  children?: Map<string, Building>
}

/**
 * Merges the layers' TOCs into one tree, lowest layer first, as an OCI runtime would extract them:
 * `.wh.NAME` deletes NAME of the layers below, `.wh..wh..opq` empties its directory of the layers below,
 * and neither shows in the result. A directory over a directory keeps the children and takes the new
 * attributes; anything else replaces what was there.
 */
export function buildTree(layers: readonly { toc: TOC }[]): Tree {
  let nextIno = 1
  const root: Building = newNode(nextIno++, implicitDir(''), undefined)

  const find = (path: string): Building | undefined => {
    let node: Building | undefined = root
    if (path === '') return node
    for (const name of path.split('/')) {
      node = node?.children?.get(name)
      if (node === undefined) return undefined
    }
    return node
  }

  const release = (node: Building): void => {
    if (node.children !== undefined) for (const child of node.children.values()) release(child)
    else node.nlink--
  }

  layers.forEach(({ toc }, layer) => {
    const entries = [...toc.entries.values()]
    for (const e of entries) checkPath(layer, e.path)

    // Whiteouts first: they apply to the layers below, never to this layer's own entries.
    for (const e of entries) {
      const { parent, name } = split(e.path)
      if (name === OPAQUE) {
        const dir = find(parent)
        if (dir?.children !== undefined) {
          for (const child of dir.children.values()) release(child)
          dir.children.clear()
        }
      } else if (name.startsWith(WHITEOUT) && !name.startsWith(`${WHITEOUT}${WHITEOUT}`)) {
        const dir = find(parent)
        const victim = name.slice(WHITEOUT.length)
        const child = dir?.children?.get(victim)
        if (child !== undefined) {
          release(child)
          dir!.children!.delete(victim)
        }
      }
    }

    const applied = new Set<string>()
    const ensureDir = (path: string): Building => {
      if (path === '') return root
      if (!applied.has(path)) {
        const e = toc.lookup(path)
        if (e !== undefined) apply(e)
        else {
          const { parent, name } = split(path)
          const dir = ensureDir(parent)
          if (dir.children!.get(name)?.type !== 'dir') place(dir, name, newNode(nextIno++, implicitDir(path), layer))
          applied.add(path)
        }
      }
      const dir = find(path)
      if (dir?.type !== 'dir') throw new UnsafePathError(layer, path, 'a parent of an entry is not a directory')
      return dir
    }

    const place = (dir: Building, name: string, node: Building): void => {
      const old = dir.children!.get(name)
      if (old !== undefined) release(old)
      dir.children!.set(name, node)
    }

    const apply = (e: Entry): void => {
      if (applied.has(e.path)) return
      applied.add(e.path)
      if (e.path === '') {
        updateDir(root, e)
        return
      }
      const { parent, name } = split(e.path)
      const dir = ensureDir(parent)
      const old = dir.children!.get(name)
      if (e.type === 'dir' && old?.type === 'dir') updateDir(old, e)
      else place(dir, name, newNode(nextIno++, e, layer))
    }

    const hardlinks: Entry[] = []
    for (const e of entries) {
      if (split(e.path).name.startsWith(WHITEOUT)) continue
      if (e.type === 'hardlink') hardlinks.push(e)
      else apply(e)
    }
    // After the layer's other entries, so a link finds a target that comes later in the TOC too.
    for (const e of hardlinks) {
      const target = e.linkName ?? ''
      checkPath(layer, target)
      const node = find(target)
      if (node === undefined || node.type === 'dir') {
        throw new UnsafePathError(layer, e.path, `hardlink target '${target}' is missing or a directory`)
      }
      const { parent, name } = split(e.path)
      const dir = ensureDir(parent)
      if (dir.children!.get(name) === node) continue
      place(dir, name, node)
      node.nlink++
      applied.add(e.path)
    }
  })

  return finish(root)
}

function finish(root: Building): Tree {
  const byPath = new Map<string, Node>()
  const seen = new Set<Node>()
  let bytes = 0
  const walk = (path: string, node: Building): void => {
    byPath.set(path, node)
    if (!seen.has(node)) {
      seen.add(node)
      if (node.type === 'reg') bytes += node.size
    }
    if (node.children === undefined) return
    node.names = [...node.children.keys()].sort()
    let subdirs = 0
    for (const name of node.names) {
      const child = node.children.get(name)!
      if (child.type === 'dir') subdirs++
      walk(path === '' ? name : `${path}/${name}`, child)
    }
    node.nlink = 2 + subdirs
    delete node.children
  }
  walk('', root)
  let byIno: Map<number, string> | undefined
  let numbering: string | undefined
  return {
    root,
    inodes: seen.size,
    bytes,
    lookup(path: string): Node | undefined {
      return byPath.get(path.startsWith('/') ? path.slice(1) : path)
    },
    pathOf(ino: number): string | undefined {
      if (byIno === undefined) {
        byIno = new Map()
        for (const [path, node] of byPath) if (!byIno.has(node.ino)) byIno.set(node.ino, `/${path}`)
      }
      return byIno.get(ino)
    },
    get numbering(): string {
      if (numbering === undefined) {
        const hash = digestHasher()
        for (const [path, node] of byPath) hash.update(`${node.ino} ${path}\0`)
        numbering = hash.digest()
      }
      return numbering
    }
  }
}

function newNode(ino: number, e: Entry, layer: number | undefined): Building {
  const type = e.type as NodeType // hardlinks never become nodes: they share their target's
  const size = type === 'dir' ? 4096 : type === 'symlink' ? Buffer.byteLength(e.linkName ?? '') : e.size
  const node: Building = {
    ino,
    type,
    // Linux has no mode for a symlink: lstat shows 0777 whatever the tar header says (an extraction does too).
    mode: type === 'symlink' ? 0o777 : e.mode,
    uid: e.uid,
    gid: e.gid,
    size: type === 'reg' || type === 'dir' || type === 'symlink' ? size : 0,
    mtimeMs: e.mtimeMs,
    devMajor: e.devMajor,
    devMinor: e.devMinor,
    xattrs: e.xattrs,
    nlink: 1
  }
  if (type === 'symlink') Object.assign(node, { linkName: e.linkName ?? '' })
  if (type === 'reg' && layer !== undefined) Object.assign(node, { source: { layer, entry: e } })
  if (type === 'dir') node.children = new Map()
  return node
}

function updateDir(dir: Building, e: Entry): void {
  dir.mode = e.mode
  dir.uid = e.uid
  dir.gid = e.gid
  dir.mtimeMs = e.mtimeMs
  dir.xattrs = e.xattrs
}

function split(path: string): { parent: string; name: string } {
  const i = path.lastIndexOf('/')
  return i < 0 ? { parent: '', name: path } : { parent: path.slice(0, i), name: path.slice(i + 1) }
}

/** Paths are normalised by the TOC parser already; this is the second line of defence. */
function checkPath(layer: number, path: string): void {
  if (path === '') return
  if (path.startsWith('/')) throw new UnsafePathError(layer, path, 'absolute path')
  if (path.includes('\0')) throw new UnsafePathError(layer, path, 'NUL byte in path')
  for (const part of path.split('/')) {
    if (part === '' || part === '.' || part === '..') {
      throw new UnsafePathError(layer, path, `path component '${part}' is not allowed`)
    }
  }
}
