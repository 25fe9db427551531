import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { type AbortOptions, digestHasher, META, sha256Digest, TOC_DIGEST_ANNOTATION } from '@strata/base'
import {
  makeReference,
  type Reference,
  type RegistryClient,
  type Image as RegistryImage,
  repositoryOf
} from '@strata/registry'
import { type Layer, openLayer, parseTOC, TOCDigestMismatchError } from '@strata/stargz'
import type { ChunkStore } from '@strata/store'
import { LayerDigestMismatchError, UnsupportedLayerError, UnverifiedLayerError } from './errors.js'
import { type BlobCompression, decompressedStream, detectCompression, indexTar } from './indexed.js'
import type { Descriptor, FetchEvent, Image, ImageLayer, ImageLayerFormat } from './types.js'

export interface ResolveImageInit {
  client: RegistryClient
  store: ChunkStore
  ref: Reference | string
  /** `os/arch[/variant]` for multi-platform images; the client's default otherwise. */
  platform?: string
  /** The manifest request, when the caller started it already (while it opened the store). */
  pending?: Promise<RegistryImage>
  signal?: AbortSignal
  onProgress?: (event: FetchEvent) => void
}

/** How a TOC that is not the one its manifest annotates is reported: the manifest vouches, so the blob is wrong. */
const MISMATCH = {
  what: "TOC digest (the manifest's annotation)",
  hint: 'the layer blob or its manifest was altered or mis-converted: re-convert the image and push it again'
}

/** Registry failures that say nothing about a reference: it may well still name what it named. */
const OUTAGES = new Set([
  'RegistryUnavailableError',
  'RegistryTimeoutError',
  'RegistryDeadlineExceededError',
  'TooManyRequestsError'
])

/** The registry could not be reached (an outage, a rate limit), as opposed to refusing: a fallback may serve. */
export function isRegistryOutage(err: unknown): boolean {
  return OUTAGES.has((err as Error)?.name)
}

/** What the store keeps of the image a reference last named (`image/<platform>@<ref>`). */
interface ImageRecord {
  ref: { registry: string; repository: string; tag?: string; digest: string }
  mediaType: string
  /** base64 */
  manifest: string
}

/**
 * The image `ref` names now, from the registry (a tag moves: ask every time). The answer is kept in the store,
 * so that when the registry cannot be reached (an outage or a rate limit, not a refusal) the image the
 * reference named last time is used instead, with an `image:stale` event saying so: a node keeps starting the
 * images it holds while the registry is down.
 */
export async function resolveImage(init: ResolveImageInit): Promise<RegistryImage> {
  const { store, ref, platform, signal } = init
  const key = META.image(String(ref), platform)
  let image: RegistryImage
  try {
    image = await (init.pending ?? init.client.getImage(ref, { platform, signal }))
  } catch (err) {
    if (signal?.aborted === true || !isRegistryOutage(err)) throw err
    const before = await recallImage(store, key, { signal }).catch(() => undefined)
    if (before === undefined) throw err
    init.onProgress?.({
      type: 'image:stale',
      ref: String(ref),
      digest: before.digest,
      message: `the registry cannot be reached (${(err as Error).message}): using ${before.digest}, what ${String(ref)} named when it was last opened here`
    })
    return before
  }
  const { registry, repository, tag } = image.ref
  const record: ImageRecord = {
    ref: { registry, repository, ...(tag !== undefined && { tag }), digest: image.digest },
    mediaType: image.mediaType,
    manifest: Buffer.from(image.manifestBytes).toString('base64')
  }
  // Only a fallback: a store that cannot keep it costs nothing now.
  await store.putMeta(key, new TextEncoder().encode(JSON.stringify(record)), { signal }).catch(() => {})
  return image
}

/** The image kept by resolveImage, checked against its digest; undefined when none or damaged. */
async function recallImage(store: ChunkStore, key: string, options: AbortOptions): Promise<RegistryImage | undefined> {
  const bytes = await store.getMeta(key, options)
  if (bytes === undefined) return undefined
  const record = JSON.parse(new TextDecoder().decode(bytes)) as ImageRecord
  const manifestBytes = new Uint8Array(Buffer.from(record.manifest, 'base64'))
  if (sha256Digest(manifestBytes) !== record.ref.digest) return undefined
  const manifest = JSON.parse(new TextDecoder().decode(manifestBytes)) as RegistryImage['manifest']
  if (!Array.isArray(manifest.layers) || manifest.config === undefined) return undefined
  return {
    ref: makeReference(record.ref),
    digest: record.ref.digest,
    mediaType: record.mediaType,
    manifestBytes,
    manifest,
    config: manifest.config,
    layers: manifest.layers
  }
}

export interface OpenImageInit {
  client: RegistryClient
  store: ChunkStore
  ref: Reference | string
  /** `os/arch[/variant]` for multi-platform images; the client's default otherwise. */
  platform?: string
  /** The image's manifest when the caller has fetched it already (`client.getImage(ref)`): one round trip less. */
  image?: RegistryImage
  /** Refuse eStargz layers whose TOC the manifest does not vouch for (no TOC-digest annotation). */
  requireVerified?: boolean
  signal?: AbortSignal
  onProgress?: (event: FetchEvent) => void
  /** Layers opened at once. Default 4. */
  concurrency?: number
}

/** What is cached in the store meta next to the TOC bytes (`toc/<layer digest>`), under `layer/<layer digest>`. */
interface LayerRecord {
  format: ImageLayerFormat
  compression: BlobCompression
  tocDigest: string
  tocOffset: number
  /** The size parseTOC checks offsets against: the blob for eStargz, the decompressed tar for indexed layers. */
  blobSize: number
}

/**
 * Whether the manifest vouches for the layer's TOC: by the TOC-digest annotation (checked equal before this is
 * asked), or, for indexed layers, by the layer digest the whole download was checked against.
 */
function isVerified(record: LayerRecord, descriptor: Descriptor): boolean {
  return record.format === 'indexed' || descriptor.annotations?.[TOC_DIGEST_ANNOTATION] !== undefined
}

function toImageLayer(
  descriptor: Descriptor,
  repository: string,
  record: LayerRecord,
  tocBytes: Uint8Array
): ImageLayer {
  const toc = parseTOC(tocBytes, {
    format: record.format === 'indexed' ? 'estargz' : record.format,
    tocOffset: record.tocOffset,
    blobSize: record.blobSize
  })
  return {
    descriptor,
    digest: descriptor.digest,
    ref: { digest: descriptor.digest, repository },
    format: record.format,
    toc,
    tocDigest: record.tocDigest,
    verified: isVerified(record, descriptor),
    compression: record.compression
  }
}

/**
 * Opens an image for lazy reading: its manifest, and per layer the TOC (footer + TOC by Range reads, checked
 * against the manifest's TOC-digest annotation) or, for layers that are not eStargz, a local index made from
 * one whole download. TOCs are cached in the store, so opening the image again asks the registry for the
 * manifest only.
 */
export async function openImage(init: OpenImageInit): Promise<Image> {
  const { client, store, ref, signal } = init
  const emit = init.onProgress ?? (() => {})
  const image = init.image ?? (await resolveImage({ ...init, store }))
  const name = String(image.ref)
  const repository = repositoryOf(image.ref)

  const openOne = async (descriptor: Descriptor): Promise<ImageLayer> => {
    const digest = descriptor.digest
    const annotation = descriptor.annotations?.[TOC_DIGEST_ANNOTATION]
    const check = (record: LayerRecord) => {
      if (annotation !== undefined && record.format !== 'indexed' && record.tocDigest !== annotation) {
        throw new TOCDigestMismatchError(annotation, record.tocDigest, { ...MISMATCH, layer: digest, image: name })
      }
      if (!isVerified(record, descriptor)) {
        if (init.requireVerified === true) throw new UnverifiedLayerError(name, digest)
        emit({
          type: 'layer:unverified',
          layer: digest,
          message: `layer ${digest} of ${name} has no ${TOC_DIGEST_ANNOTATION} annotation: its TOC is used unverified (file chunks are still checked against it)`
        })
      }
    }

    const cached = await readRecord(store, digest, { signal })
    if (cached !== undefined) {
      check(cached.record)
      emit({ type: 'layer:toc', layer: digest, format: cached.record.format, cached: true })
      return toImageLayer(descriptor, repository, cached.record, cached.tocBytes)
    }

    let layer: Layer | undefined
    try {
      // The footer and TOC are small reads: under the client's deadline, unlike chunk reads and whole layers.
      const blob = client.blob(ref, digest, descriptor.size, { deadline: true, what: 'the footer and TOC' })
      layer = await openLayer(blob, {
        ...(annotation !== undefined ? { tocDigest: annotation } : {}),
        signal
      })
    } catch (err) {
      const e = err as { name?: string; actual?: string }
      if (e.name === 'TOCDigestMismatchError' && annotation !== undefined) {
        throw new TOCDigestMismatchError(annotation, e.actual ?? '(unknown)', {
          ...MISMATCH,
          layer: digest,
          image: name,
          cause: err
        })
      }
      if (e.name !== 'InvalidFooterError') throw err
    }

    if (layer !== undefined) {
      const record: LayerRecord = {
        format: layer.format,
        compression: layer.compression,
        tocDigest: layer.tocDigest,
        tocOffset: layer.tocOffset,
        blobSize: layer.size
      }
      check(record)
      await writeRecord(store, digest, record, layer.tocBytes, { signal })
      emit({ type: 'layer:toc', layer: digest, format: layer.format, cached: false })
      return {
        descriptor,
        digest,
        ref: { digest, repository },
        format: layer.format,
        toc: layer.toc,
        tocDigest: layer.tocDigest,
        verified: isVerified(record, descriptor),
        compression: layer.compression
      }
    }

    const { record, tocBytes } = await indexLayer(init, name, descriptor, emit)
    emit({ type: 'layer:toc', layer: digest, format: 'indexed', cached: false })
    return toImageLayer(descriptor, repository, record, tocBytes)
  }

  const layers = new Array<ImageLayer>(image.layers.length)
  let next = 0
  const worker = async () => {
    while (next < image.layers.length) {
      const i = next++
      layers[i] = await openOne(image.layers[i]!)
    }
  }
  await Promise.all(Array.from({ length: Math.min(init.concurrency ?? 4, image.layers.length) }, worker))
  return { ref: name, digest: image.digest, config: image.config, layers }
}

async function readRecord(
  store: ChunkStore,
  digest: string,
  options: { signal?: AbortSignal | undefined }
): Promise<{ record: LayerRecord; tocBytes: Uint8Array } | undefined> {
  const [raw, tocBytes] = await Promise.all([
    store.getMeta(META.layer(digest), options),
    store.getMeta(META.toc(digest), options)
  ])
  if (raw === undefined || tocBytes === undefined) return undefined
  const record = JSON.parse(new TextDecoder().decode(raw)) as LayerRecord
  // A cached TOC that no longer hashes to what was recorded is ignored and fetched again.
  return sha256Digest(tocBytes) === record.tocDigest ? { record, tocBytes } : undefined
}

async function writeRecord(
  store: ChunkStore,
  digest: string,
  record: LayerRecord,
  tocBytes: Uint8Array,
  options: { signal?: AbortSignal | undefined }
): Promise<void> {
  await store.putMeta(META.toc(digest), tocBytes, options)
  await store.putMeta(META.layer(digest), new TextEncoder().encode(JSON.stringify(record)), options)
}

/** A layer that is not eStargz: one whole download (digest checked), indexed into the store, its chunks pinned. */
async function indexLayer(
  init: OpenImageInit,
  name: string,
  descriptor: Descriptor,
  emit: (event: FetchEvent) => void
): Promise<{ record: LayerRecord; tocBytes: Uint8Array }> {
  const { client, store, ref, signal } = init
  const digest = descriptor.digest
  const dir = await mkdtemp(join(tmpdir(), 'strata-layer-'))
  try {
    const path = join(dir, 'blob')
    await client.downloadBlob(ref, digest, path, {
      signal,
      onProgress: (bytes) => emit({ type: 'layer:download', layer: digest, bytes, total: descriptor.size })
    })
    const compression = await detectCompression(path)
    const hash = digestHasher()
    let indexed: Awaited<ReturnType<typeof indexTar>>
    try {
      indexed = await indexTar(
        decompressedStream(path, compression, (b) => hash.update(b), { signal }),
        { store, layer: digest },
        { signal }
      )
    } catch (err) {
      if ((err as Error).name === 'AbortError') throw err
      throw new UnsupportedLayerError(name, digest, `it is neither eStargz nor a readable tar (${compression})`, {
        cause: err
      })
    }
    const actual = hash.digest()
    if (actual !== digest) throw new LayerDigestMismatchError(name, digest, actual)
    await store.pin(digest, indexed.digests, { signal })
    const record: LayerRecord = {
      format: 'indexed',
      compression,
      tocDigest: sha256Digest(indexed.tocBytes),
      tocOffset: indexed.tarSize,
      blobSize: indexed.tarSize
    }
    await writeRecord(store, digest, record, indexed.tocBytes, { signal })
    emit({ type: 'layer:indexed', layer: digest, files: indexed.files, chunks: indexed.digests.length })
    return { record, tocBytes: indexed.tocBytes }
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
}
