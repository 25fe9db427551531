import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

/** Deterministic incompressible bytes (xorshift32 from `seed`). */
export function noise(size: number, seed: number): Buffer {
  const words = new Uint32Array(Math.ceil(size / 4))
  let x = seed >>> 0 || 1
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13
    x ^= x >>> 17
    x ^= x << 5
    words[i] = x >>> 0
  }
  return Buffer.from(words.buffer, 0, size)
}

/** Writes `files` files of noise, `root/d<i % 100>/f<i>` of `size(i)` bytes, distinct for each `seed`; returns root. */
export async function noiseTree(
  root: string,
  files: number,
  size: (i: number) => number,
  seed: number
): Promise<string> {
  for (let i = 0; i < files; i++) {
    const dir = join(root, `d${i % 100}`)
    await mkdir(dir, { recursive: true })
    await writeFile(join(dir, `f${i}`), noise(size(i), seed * 1_000_000 + i))
  }
  return root
}
