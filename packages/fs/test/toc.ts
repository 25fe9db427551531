import type { AbortOptions } from '@strata/base'
import type { Entry, TOC } from '@strata/stargz'
import type { Operations } from '../src/index.js'

/** Regular files of a test TOC are cut into chunks of this many bytes. */
export const CHUNK = 40

/** A TOC from a few entries, as the stargz parser would give it (implicit parents added, root included). */
export function makeToc(entries: (Partial<Entry> & { path: string })[]): { toc: TOC } {
  const map = new Map<string, Entry>()
  const add = (e: Partial<Entry> & { path: string }) => {
    const parent = e.path.includes('/') ? e.path.slice(0, e.path.lastIndexOf('/')) : ''
    if (e.path !== '' && !map.has(parent)) add({ path: parent, type: 'dir' })
    const size = e.size ?? 0
    const chunks = Array.from({ length: (e.type ?? 'reg') === 'reg' ? Math.ceil(size / CHUNK) : 0 }, (_, i) => ({
      digest: `sha256:${e.path}#${i}`,
      fileOffset: i * CHUNK,
      size: Math.min(CHUNK, size - i * CHUNK),
      offset: 0,
      end: 0,
      innerOffset: 0
    }))
    map.set(e.path, {
      type: 'reg',
      mode: e.type === 'dir' ? 0o755 : 0o644,
      uid: 0,
      gid: 0,
      size: 0,
      mtimeMs: 1_700_000_000_000,
      devMajor: 0,
      devMinor: 0,
      xattrs: {},
      chunks,
      ...e
    })
  }
  add({ path: '', type: 'dir' })
  for (const e of entries) add(e)
  return {
    toc: {
      version: 1,
      entries: map,
      children: (path) =>
        [...map.keys()]
          .filter((p) => p !== '' && (p.includes('/') ? p.slice(0, p.lastIndexOf('/')) : '') === path)
          .map((p) => p.slice(p.lastIndexOf('/') + 1))
          .sort(),
      lookup: (path) => map.get(path),
      chunkIndexAt: () => -1,
      prioritized: [],
      prefetchEnd: 0
    }
  }
}

/** File content for a regular entry: its path repeated, so every file's bytes differ and are predictable. */
export function contentOf(entry: Entry): Uint8Array {
  const bytes = new Uint8Array(entry.size)
  const pattern = new TextEncoder().encode(`${entry.path};`)
  for (let i = 0; i < bytes.length; i++) bytes[i] = pattern[i % pattern.length]!
  return bytes
}

/** `length` bytes at `offset` of `path` through `ops.read` (fewer at the end of the file). */
export async function readBytes(
  ops: Operations,
  path: string,
  offset: number,
  length: number,
  options?: AbortOptions
): Promise<Uint8Array> {
  const into = new Uint8Array(length)
  return into.subarray(0, await ops.read(path, offset, into, options))
}
