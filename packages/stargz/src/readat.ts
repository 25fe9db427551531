import { open } from 'node:fs/promises'
import type { AbortOptions } from '@strata/base'
import { BlobReadError } from './errors.js'
import type { ReadAt } from './types.js'

/** A ReadAt over a local file; close it when done. */
export interface FileReadAt extends ReadAt {
  readonly path: string
  close(): Promise<void>
}

/** Opens a local file for random reads. */
export async function fileReader(path: string, options?: AbortOptions): Promise<FileReadAt> {
  options?.signal?.throwIfAborted()
  let handle: Awaited<ReturnType<typeof open>>
  let size: number
  try {
    handle = await open(path, 'r')
  } catch (err) {
    throw new BlobReadError(`cannot open blob ${path}: ${(err as Error).message}`, { cause: err })
  }
  try {
    const st = await handle.stat()
    if (!st.isFile()) throw new Error('not a regular file')
    size = st.size
  } catch (err) {
    await handle.close()
    throw new BlobReadError(`cannot read blob ${path}: ${(err as Error).message}`, { cause: err })
  }
  return {
    path,
    size,
    async readAt(offset, length, opts) {
      opts?.signal?.throwIfAborted()
      const [start, n] = clamp(size, offset, length)
      const buf = new Uint8Array(n)
      let done = 0
      try {
        while (done < n) {
          const { bytesRead } = await handle.read(buf, done, n - done, start + done)
          if (bytesRead === 0) break
          done += bytesRead
        }
      } catch (err) {
        throw new BlobReadError(`reading ${n} bytes at offset ${start} of ${path} failed: ${(err as Error).message}`, {
          cause: err
        })
      }
      return done === n ? buf : buf.subarray(0, done)
    },
    close: () => handle.close()
  }
}

/** A ReadAt over bytes in memory (no copy: the returned views share `bytes`). */
export function bufferReader(bytes: Uint8Array): ReadAt {
  return {
    size: bytes.length,
    async readAt(offset, length, opts) {
      opts?.signal?.throwIfAborted()
      const [start, n] = clamp(bytes.length, offset, length)
      return bytes.subarray(start, start + n)
    }
  }
}

/** [start, length] of the part of [offset, offset + length) inside a blob of `size` bytes. */
function clamp(size: number, offset: number, length: number): [number, number] {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new RangeError(`invalid read range: offset ${offset}, length ${length}`)
  }
  const start = Math.min(offset, size)
  return [start, Math.min(length, size - start)]
}
