import { mkdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { StrataError, sha256Hex } from '@strata/base'

/** Where a writable mount's layers live: one directory per mountpoint under the data dir. */
export function writableDirOf(dataDir: string, mountpoint: string): string {
  return join(dataDir, 'mounts', sha256Hex(mountpoint).slice(0, 16))
}

/**
 * The upper layer outlives the mount (no write is ever thrown away), so it must belong to the same image:
 * a writable mount of another image at the same mountpoint is refused rather than shown someone else's changes.
 */
export async function writableDir(dataDir: string, mountpoint: string, digest: string): Promise<string> {
  const dir = writableDirOf(dataDir, mountpoint)
  await mkdir(dir, { recursive: true })
  const marker = join(dir, 'image')
  const previous = await readFile(marker, 'utf8').catch(() => undefined)
  if (previous !== undefined && previous.trim() !== digest)
    throw new WritableLayerInUseError(mountpoint, dir, previous.trim())
  await writeFile(marker, `${digest}\n`)
  return dir
}

/** A writable mount would show the changes made to another image. */
export class WritableLayerInUseError extends StrataError {
  override readonly name = 'WritableLayerInUseError'
  override readonly code = 'ERR_WRITABLE_LAYER_IN_USE'
  constructor(mountpoint: string, dir: string, image: string) {
    super(`the writable layer for ${mountpoint} in ${dir} holds changes to another image (${image})`, {
      hint: `mount at another path, or remove ${dir} if its changes are not needed`
    })
  }
}
