import type { Image } from '@strata/fetcher'
import { makeReference, parseReference } from '@strata/registry/reference'
import type { ImageSource } from './source.js'

/**
 * The image a mount was made of, again, by digest (a tag may have moved since); from what the store kept of the
 * reference when the registry cannot be reached.
 */
export async function openPinned(source: ImageSource, image: string, digest: string): Promise<Image> {
  const ref = parseReference(image)
  const pinned = makeReference({ registry: ref.registry, repository: ref.repository, digest }).toString()
  try {
    return await source.openImage(pinned)
  } catch (err) {
    const named = await source.openImage(image).catch(() => undefined)
    if (named?.digest === digest) return named
    throw err
  }
}
