import { type ElfDependencies, readElfDependencies } from './elf.js'
import type { Node, Tree } from './tree.js'

/**
 * Library prefetch: when a program or shared library is first read, its dynamic section tells which
 * libraries the loader will open next; their first chunks are read at once, in the background (the fetcher's
 * read-ahead takes the rest of each file), and each of them is looked at in turn. Starting python3 from a
 * cold lazy mount opens six ELF files one after another: without this, six registry round trips in a row.
 * Everything here is a hint: a failure only means the loader's own reads fetch what they need.
 */
export interface LibraryPrefetch {
  /** A regular file was read: look at it once, if it may be ELF. */
  touched(path: string, node: Node): void
}

/** Reads `length` bytes at `offset` of a regular file's node, verified (as a mount read does). */
export type NodeReader = (node: Node, offset: number, length: number) => Promise<Uint8Array>

/** The multiarch directory of the Debian/Ubuntu library paths, by e_machine. */
const MULTIARCH: Record<number, string> = {
  3: 'i386-linux-gnu',
  21: 'powerpc64le-linux-gnu',
  22: 's390x-linux-gnu',
  40: 'arm-linux-gnueabihf',
  62: 'x86_64-linux-gnu',
  183: 'aarch64-linux-gnu',
  243: 'riscv64-linux-gnu'
}
const MAX_SYMLINKS = 40

export function createLibraryPrefetch(tree: Tree, read: NodeReader): LibraryPrefetch {
  const seen = new Set<number>()

  const look = async (path: string, node: Node): Promise<void> => {
    const deps = await readElfDependencies((offset, length) => read(node, offset, length), node.size)
    if (deps === undefined) return
    const origin = dirname(path)
    const wanted: string[][] = deps.needed.map((soname) =>
      soname.includes('/')
        ? [soname.startsWith('/') ? soname : `${origin}/${soname}`]
        : searchPath(deps, origin).map((dir) => `${dir}/${soname}`)
    )
    if (deps.interpreter !== undefined) wanted.unshift([deps.interpreter])
    // The first library of each list that exists. Reading its header fetches its first chunk (the fetcher
    // reads ahead the rest of the file), and its own dependencies are looked at in turn.
    for (const candidates of wanted) {
      for (const candidate of candidates) {
        const lib = resolveFile(tree, candidate)
        if (lib === undefined) continue
        touch(candidate, lib)
        break
      }
    }
  }

  const touch = (path: string, node: Node): void => {
    if (seen.has(node.ino)) return
    seen.add(node.ino)
    look(path, node).catch(() => {})
  }

  return {
    touched(path, node) {
      if (seen.has(node.ino) || node.type !== 'reg' || node.size < 64) return
      const name = path.slice(path.lastIndexOf('/') + 1)
      // Programs have an execute bit; libraries often do not, but are named *.so or *.so.N.
      if ((node.mode & 0o111) === 0 && !/\.so(\.|$)/.test(name)) return
      touch(path, node)
    }
  }
}

/** Where ld.so looks for a soname: RUNPATH/RPATH (with $ORIGIN), then the usual system directories. */
function searchPath(deps: ElfDependencies, origin: string): string[] {
  const dirs = (deps.runpath ?? '')
    .split(':')
    .filter((d) => d !== '')
    .map((d) => d.replace(/\$(ORIGIN|\{ORIGIN\})/g, origin))
  const arch = MULTIARCH[deps.machine]
  if (arch !== undefined) dirs.push(`/lib/${arch}`, `/usr/lib/${arch}`)
  dirs.push('/lib64', '/usr/lib64', '/lib', '/usr/lib', '/usr/local/lib')
  return dirs
}

function dirname(path: string): string {
  const slash = path.lastIndexOf('/')
  return slash <= 0 ? '/' : path.slice(0, slash)
}

/** The regular file at `path`, following symlinks in every component (as open(2) would), else undefined. */
export function resolveFile(tree: Tree, path: string): Node | undefined {
  const todo = path.split('/').filter((p) => p !== '' && p !== '.')
  const at: string[] = []
  let hops = 0
  while (todo.length > 0) {
    const name = todo.shift()!
    if (name === '..') {
      at.pop()
      continue
    }
    const node = tree.lookup([...at, name].join('/'))
    if (node === undefined) return undefined
    if (node.type === 'symlink') {
      if (++hops > MAX_SYMLINKS || node.linkName === undefined) return undefined
      if (node.linkName.startsWith('/')) at.length = 0
      todo.unshift(...node.linkName.split('/').filter((p) => p !== '' && p !== '.'))
      continue
    }
    if (todo.length > 0 && node.type !== 'dir') return undefined
    at.push(name)
  }
  const node = tree.lookup(at.join('/'))
  return node?.type === 'reg' && node.source !== undefined ? node : undefined
}
