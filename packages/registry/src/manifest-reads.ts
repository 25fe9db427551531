import type { AbortOptions } from '@strata/base'
import { digestOf } from './blobs.js'
import { DigestMismatchError, IndexTooDeepError, ManifestTooLargeError } from './errors.js'
import { type HttpCore, withDeadline } from './http.js'
import {
  type Descriptor,
  hostPlatform,
  type ImageIndex,
  type ImageManifest,
  isIndexType,
  MANIFEST_ACCEPT,
  type Platform,
  parseManifest,
  parsePlatform,
  selectPlatform
} from './manifest.js'
import { manifestMediaType } from './quirks.js'
import { type Reference, withDigest } from './reference.js'

// Manifest and index reads: any manifest (digest-checked, size-capped, within the deadline), and an image
// resolved through (nested) indexes to one platform's manifest.

export interface Manifest {
  ref: Reference
  digest: string
  mediaType: string
  bytes: Uint8Array
  manifest: ImageManifest | ImageIndex
}

export interface Image {
  /** The reference pinned to the image manifest's digest. */
  ref: Reference
  digest: string
  mediaType: string
  manifestBytes: Uint8Array
  manifest: ImageManifest
  config: Descriptor
  layers: Descriptor[]
  /** The index the image was chosen from, when the reference named one (the innermost, when indexes nest). */
  index?: Manifest
  /** The platform of the index entry chosen. */
  platform?: Platform
}

/** Indexes followed from the one a reference names to an image manifest (OCI allows indexes in indexes). */
const MAX_INDEX_DEPTH = 8

export class ManifestReads {
  constructor(
    private readonly http: HttpCore,
    private readonly limits: { deadlineMs: number; maxManifestBytes: number }
  ) {}

  async getManifest(ref: Reference, options: AbortOptions): Promise<Manifest> {
    const { deadlineMs, maxManifestBytes } = this.limits
    const subject = { registry: ref.registry, repository: ref.repository, digest: ref.digest }
    const tooLarge = () =>
      new ManifestTooLargeError(`manifest is over the ${maxManifestBytes} byte cap`, {
        ...subject,
        hint: 'a manifest that large is almost certainly not an image manifest'
      })
    const name = ref.digest ?? ref.tag ?? 'latest'
    const what = ref.digest !== undefined ? 'reading the manifest' : `reading the manifest of tag ${name}`
    return withDeadline(deadlineMs, what, subject, options.signal, (signal) =>
      this.http.withRetry(signal, async () => {
        const reply = await this.http.request(
          {
            ref,
            method: 'GET',
            path: `manifests/${name}`,
            headers: { accept: MANIFEST_ACCEPT.join(', ') },
            subject,
            signal
          },
          [200]
        )
        if (Number(reply.header('content-length') ?? 0) > maxManifestBytes) {
          await reply.discard()
          throw tooLarge()
        }
        const bytes = await reply.bytes(maxManifestBytes, tooLarge)
        const digest = digestOf(bytes, ref.digest ?? 'sha256:')
        if (ref.digest !== undefined && ref.digest !== digest) {
          throw new DigestMismatchError(`manifest bytes have digest ${digest}, not the requested one`, {
            ...subject,
            hint: 'the registry (or a proxy in between) served different content; do not use it'
          })
        }
        let parsedBody: unknown
        try {
          parsedBody = JSON.parse(Buffer.from(bytes).toString('utf8'))
        } catch {
          parsedBody = undefined
        }
        const type = manifestMediaType(reply.header('content-type'), parsedBody)
        const parsed = parseManifest(bytes, type, { ...subject, digest })
        return { ref: withDigest(ref, digest), digest, mediaType: parsed.mediaType, bytes, manifest: parsed.manifest }
      })
    )
  }

  async getImage(ref: Reference, options: AbortOptions & { platform?: string | undefined }): Promise<Image> {
    let m = await this.getManifest(ref, options)
    let index: Manifest | undefined
    let platform: Platform | undefined
    const top = m.digest
    // An index may name indexes (OCI nested indexes): follow the platform's entry down to an image manifest.
    for (let depth = 1; isIndexType(m.mediaType); depth++) {
      const subject = { registry: ref.registry, repository: ref.repository, digest: top }
      if (depth > MAX_INDEX_DEPTH) {
        throw new IndexTooDeepError(
          `image indexes nested more than ${MAX_INDEX_DEPTH} levels deep (level ${depth} is the index ${m.digest})`,
          {
            ...subject,
            hint: 'an index names image manifests, or indexes of them a level or two deep; this one is malformed or hostile: ask its publisher, or name an image manifest by digest'
          }
        )
      }
      index = m
      const want = options.platform !== undefined ? parsePlatform(options.platform) : hostPlatform()
      const chosen = selectPlatform(m.manifest as ImageIndex, want, { ...subject, digest: m.digest })
      platform = chosen.platform ?? platform
      m = await this.getManifest(withDigest(ref, chosen.digest), options)
    }
    const manifest = m.manifest as ImageManifest
    const image: Image = {
      ref: m.ref,
      digest: m.digest,
      mediaType: m.mediaType,
      manifestBytes: m.bytes,
      manifest,
      config: manifest.config,
      layers: manifest.layers
    }
    if (index !== undefined) image.index = index
    if (platform !== undefined) image.platform = platform
    return image
  }
}
