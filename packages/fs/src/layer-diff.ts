// One layer's own files as overlayfs wants a lower directory: what containers-storage's additional layer store
// links a layer's `diff` to. Unlike the merged tree (tree.ts), whiteouts stay, in overlay's form: `.wh.NAME`
// becomes NAME, a character device 0:0, and `.wh..wh..opq` becomes the xattr `trusted.overlay.opaque` = `y` on
// its directory. Regular files keep their TOC entries, so reads go through the fetcher as in a merged mount.
import type { Entry, TOC } from '@strata/stargz'
import { buildTree, type Tree } from './tree.js'

const OPAQUE = '.wh..wh..opq'
const WHITEOUT = '.wh.'
export const OPAQUE_XATTR = 'trusted.overlay.opaque'

/** A TOC with the layer's whiteouts turned into overlay's whiteouts and opaque markers. */
export function overlayTOC(toc: TOC): TOC {
  const entries = new Map<string, Entry>()
  const opaque = new Set<string>()
  const whiteouts: Entry[] = []
  for (const e of toc.entries.values()) {
    const i = e.path.lastIndexOf('/')
    const parent = i < 0 ? '' : e.path.slice(0, i)
    const name = e.path.slice(i + 1)
    if (name === OPAQUE) opaque.add(parent)
    // Other `.wh..wh.` names are aufs's own bookkeeping (hardlink dirs): no file of the image.
    else if (name.startsWith(`${WHITEOUT}${WHITEOUT}`)) continue
    else if (name.startsWith(WHITEOUT) && name.length > WHITEOUT.length) whiteouts.push(e)
    else entries.set(e.path, e)
  }
  for (const w of whiteouts) {
    const i = w.path.lastIndexOf('/')
    const path = `${w.path.slice(0, i + 1)}${w.path.slice(i + 1 + WHITEOUT.length)}`
    // A layer that has both NAME and its whiteout replaces the NAME below with its own: a directory hides what the
    // layers below have in it only when opaque (a file or link hides it anyway).
    const own = entries.get(path)
    if (own !== undefined) {
      if (own.type === 'dir') opaque.add(path)
      continue
    }
    entries.set(path, {
      path,
      type: 'char',
      mode: 0,
      uid: 0,
      gid: 0,
      size: 0,
      mtimeMs: w.mtimeMs,
      devMajor: 0,
      devMinor: 0,
      xattrs: {},
      chunks: []
    })
  }
  for (const dir of opaque) {
    const e = entries.get(dir) ?? toc.lookup(dir)
    if (e === undefined || e.type !== 'dir') continue
    // A copy: the TOC's own entry is shared with merged trees, which must not show the marker.
    entries.set(dir, { ...e, xattrs: { ...e.xattrs, [OPAQUE_XATTR]: new TextEncoder().encode('y') } })
  }
  return {
    version: toc.version,
    entries,
    children(path) {
      const prefix = path === '' ? '' : `${path}/`
      const names: string[] = []
      for (const p of entries.keys()) {
        if (p !== '' && p.startsWith(prefix) && !p.slice(prefix.length).includes('/'))
          names.push(p.slice(prefix.length))
      }
      return names.sort()
    },
    lookup: (path) => entries.get(path),
    chunkIndexAt: (entry, offset) => toc.chunkIndexAt(entry, offset),
    prioritized: toc.prioritized,
    prefetchEnd: toc.prefetchEnd
  }
}

const diffs = new WeakMap<TOC, Tree>()

/** The tree of one layer's `diff` directory (built once per TOC object: p2pd keeps opened images' layers). */
export function diffTree(toc: TOC): Tree {
  let tree = diffs.get(toc)
  if (tree === undefined) {
    tree = buildTree([{ toc: overlayTOC(toc) }])
    diffs.set(toc, tree)
  }
  return tree
}
