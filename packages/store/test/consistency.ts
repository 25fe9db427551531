import { createHash } from 'node:crypto'
import { readdir } from 'node:fs/promises'
import { join } from 'node:path'
import { expect } from 'vitest'
import type { ChunkStore } from '../src/index.js'

/** Every file under chunks/: [fan-out dir, name]. */
export async function chunkFiles(dir: string): Promise<Array<[string, string]>> {
  const out: Array<[string, string]> = []
  for (const fan of await readdir(join(dir, 'chunks'))) {
    for (const name of await readdir(join(dir, 'chunks', fan))) out.push([fan, name])
  }
  return out
}

/**
 * Asserts a disk store is consistent: no temp files, the index lists exactly the chunk files, and every
 * indexed chunk reads back and hashes to its digest. Returns the digests.
 */
export async function expectConsistent(dir: string, store: ChunkStore): Promise<string[]> {
  const files = await chunkFiles(dir)
  expect(files.filter(([, name]) => name.startsWith('.tmp-'))).toEqual([])
  const keys: string[] = []
  for await (const digest of store.keys()) keys.push(digest)
  expect(files.map(([, name]) => `sha256:${name}`).sort()).toEqual([...keys].sort())
  for (const [fan, name] of files) expect(name.startsWith(fan)).toBe(true)
  let bytes = 0
  for (const digest of keys) {
    const got = await store.get(digest)
    expect(got, `${digest} reads`).toBeDefined()
    expect(`sha256:${createHash('sha256').update(got!).digest('hex')}`).toBe(digest)
    bytes += got!.length
  }
  expect((await store.stats()).bytes).toBe(bytes)
  return keys
}
