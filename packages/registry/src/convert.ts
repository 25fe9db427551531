import { createReadStream, createWriteStream } from 'node:fs'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join, posix } from 'node:path'
import { pipeline } from 'node:stream/promises'
import { createGunzip } from 'node:zlib'
import { TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION } from '@strata/base'
import { buildEstargz, fileReader, openLayer } from '@strata/stargz'
import { type Manifest, sha256 } from './client.js'
import { LayerNotConvertibleError, ManifestInvalidError, PrioritizedFileMissingError } from './errors.js'
import {
  type Descriptor,
  formatPlatform,
  type ImageIndex,
  type ImageManifest,
  isIndexType,
  isManifestType,
  MediaType,
  parsePlatform,
  selectPlatform
} from './manifest.js'
import type { ImageRepo } from './repo.js'
import { cleanTarName, tarEntryNames } from './tar-names.js'

export interface ConvertOptions {
  /** Convert only this platform of an index (`os/arch[/variant]`); the result is then that one image. */
  platform?: string
  /** Largest chunk of a file in one gzip member (the builder's default: 4 MiB). */
  chunkSize?: number
  /** Paths to put first in the layer that holds each of them (the topmost one). */
  prioritizedFiles?: string[]
  gzipLevel?: number
  /** Where layers are downloaded and built (default os.tmpdir()); needs about twice the image's size. */
  tmpDir?: string
  signal?: AbortSignal
  onEvent?(event: ConvertEvent): void
}

export type ConvertEvent =
  | { type: 'image'; platform?: string; digest: string; layers: number }
  | { type: 'download'; digest: string; size: number; bytes: number }
  | { type: 'convert-start'; digest: string; size: number }
  | { type: 'convert'; digest: string; bytes: number }
  | { type: 'layer'; layer: LayerResult }
  | { type: 'skip'; digest: string; reason: string }
  | { type: 'write'; what: string; digest: string }

export interface LayerResult {
  sourceDigest: string
  digest: string
  size: number
  mediaType: string
  tocDigest: string
  uncompressedSize?: number
  /** False for a layer that was eStargz already and is kept as it is. */
  converted: boolean
  prioritizedFiles: string[]
}

export interface ImageResult {
  platform?: string
  sourceDigest: string
  digest: string
  config: string
  layers: LayerResult[]
}

export interface ConvertResult {
  source: string
  destination: string
  /** Digest and media type of what was written under the destination's tag. */
  digest: string
  mediaType: string
  images: ImageResult[]
}

const CONVERTIBLE = new Set<string>([
  MediaType.ociLayerGzip,
  MediaType.dockerLayerGzip,
  MediaType.ociLayer,
  'application/vnd.docker.image.rootfs.diff.tar'
])

interface Output {
  descriptor: Descriptor
  path: string
  result: LayerResult
  diffId?: string
}

interface Pending {
  manifest: Manifest
  platform?: string
  configBytes: Uint8Array
  layers: Output[]
  manifestBytes: Uint8Array
  result: ImageResult
}

function json(value: unknown): Uint8Array {
  return new TextEncoder().encode(JSON.stringify(value))
}

/**
 * Converts every layer of an image (or of every platform of an index) to eStargz, the way the seed's
 * stargzify does: layers that are eStargz already are kept, the rest are rebuilt with the stargz builder and
 * get the TOC-digest and uncompressed-size annotations; configs get the new diff_ids. Everything is built in
 * temporary files first; only then are blobs, manifests and finally the tagged manifest or index written to
 * `dst`, so a bad input leaves `dst` untouched.
 */
export async function convertImage(
  src: ImageRepo,
  dst: ImageRepo,
  options: ConvertOptions = {}
): Promise<ConvertResult> {
  const signal = options.signal
  const work = await mkdtemp(join(options.tmpDir ?? tmpdir(), 'strata-convert-'))
  try {
    const root = await src.root({ signal })
    const targets: { manifest: Manifest; platform?: string; descriptor?: Descriptor }[] = []
    if (isIndexType(root.mediaType)) {
      const index = root.manifest as ImageIndex
      let entries = index.manifests.filter((d) => isManifestType(d.mediaType))
      if (options.platform !== undefined) {
        entries = [selectPlatform(index, parsePlatform(options.platform), { registry: src.name, digest: root.digest })]
      }
      for (const d of entries) {
        // Attestations (buildx's unknown/unknown entries) sign the source image, not the converted one.
        if (d.platform?.os === 'unknown') {
          options.onEvent?.({ type: 'skip', digest: d.digest, reason: 'attestation manifest (unknown/unknown)' })
          continue
        }
        const manifest = await src.manifest(d.digest, { signal })
        if (!isManifestType(manifest.mediaType)) {
          throw new LayerNotConvertibleError(
            `index entry ${d.digest} is a ${manifest.mediaType}, not an image manifest`,
            {
              registry: src.name
            }
          )
        }
        targets.push({
          manifest,
          descriptor: d,
          ...(d.platform !== undefined ? { platform: formatPlatform(d.platform) } : {})
        })
      }
    } else {
      targets.push({ manifest: root })
    }
    if (targets.length === 0) {
      throw new LayerNotConvertibleError('the index holds no image manifest to convert', {
        registry: src.name,
        digest: root.digest
      })
    }

    const builtLayers = new Map<string, Promise<Output>>()
    const pending: Pending[] = []
    for (const t of targets)
      pending.push(await convertManifest(src, t.manifest, t.platform, work, builtLayers, options))

    // Nothing has been written so far. Now blobs, then manifests, then what the tag names.
    const asIndex = isIndexType(root.mediaType) && options.platform === undefined
    for (const p of pending) {
      for (const l of p.layers) {
        options.onEvent?.({ type: 'write', what: 'layer', digest: l.descriptor.digest })
        await dst.putBlob(l.descriptor.digest, l.path, { signal })
      }
      const configPath = join(work, `config-${p.result.config.slice(7)}`)
      await writeFile(configPath, p.configBytes)
      options.onEvent?.({ type: 'write', what: 'config', digest: p.result.config })
      await dst.putBlob(p.result.config, configPath, { signal })
      options.onEvent?.({ type: 'write', what: 'manifest', digest: p.result.digest })
      await dst.putManifest(p.manifestBytes, MediaType.ociManifest, !asIndex, { signal })
    }
    let digest = pending[0]?.result.digest ?? ''
    let mediaType: string = MediaType.ociManifest
    if (asIndex) {
      const index = root.manifest as ImageIndex
      const out: Record<string, unknown> = {
        schemaVersion: 2,
        mediaType: MediaType.ociIndex,
        manifests: pending.map((p, i) => {
          const d: Descriptor = {
            mediaType: MediaType.ociManifest,
            digest: p.result.digest,
            size: p.manifestBytes.length
          }
          const from = targets[i]!.descriptor
          if (from?.platform !== undefined) d.platform = from.platform
          if (from?.annotations !== undefined) d.annotations = from.annotations
          return d
        })
      }
      if (index.annotations !== undefined) out.annotations = index.annotations
      const bytes = json(out)
      digest = sha256(bytes)
      mediaType = MediaType.ociIndex
      options.onEvent?.({ type: 'write', what: 'index', digest })
      await dst.putManifest(bytes, MediaType.ociIndex, true, { signal })
    }
    return { source: src.name, destination: dst.name, digest, mediaType, images: pending.map((p) => p.result) }
  } finally {
    await rm(work, { recursive: true, force: true })
  }
}

async function convertManifest(
  src: ImageRepo,
  source: Manifest,
  platform: string | undefined,
  work: string,
  builtLayers: Map<string, Promise<Output>>,
  options: ConvertOptions
): Promise<Pending> {
  const signal = options.signal
  const m = source.manifest as ImageManifest
  options.onEvent?.({
    type: 'image',
    digest: source.digest,
    layers: m.layers.length,
    ...(platform !== undefined ? { platform } : {})
  })
  const subject = { registry: src.name, digest: source.digest }
  const configBytes = await src.fetchBlob(m.config.digest, { signal })
  let config: { rootfs?: { diff_ids?: unknown } } & Record<string, unknown>
  try {
    config = JSON.parse(Buffer.from(configBytes).toString('utf8')) as typeof config
  } catch (err) {
    throw new ManifestInvalidError(`image config ${m.config.digest} is not JSON`, { ...subject, cause: err })
  }
  const diffIds = config.rootfs?.diff_ids
  if (!Array.isArray(diffIds) || diffIds.length !== m.layers.length) {
    throw new ManifestInvalidError(
      `image config ${m.config.digest} lists ${Array.isArray(diffIds) ? diffIds.length : 'no'} diff_ids for ${m.layers.length} layers`,
      subject
    )
  }
  for (const l of m.layers) {
    if (l.annotations?.[TOC_DIGEST_ANNOTATION] === undefined && !CONVERTIBLE.has(l.mediaType)) {
      throw new LayerNotConvertibleError(
        `layer ${l.digest} has media type ${l.mediaType}, which cannot be converted to eStargz`,
        {
          ...subject,
          hint: 'convert takes tar and tar+gzip layers (zstd, foreign and non-tar layers are not supported)'
        }
      )
    }
  }

  // Every layer is downloaded (digest-checked) before anything is built.
  const paths: string[] = []
  for (const l of m.layers) {
    const path = join(work, `src-${l.digest.replace(':', '-')}`)
    if (!paths.includes(path)) {
      await src.downloadBlob(l.digest, path, {
        signal,
        onProgress: (bytes) => options.onEvent?.({ type: 'download', digest: l.digest, size: l.size, bytes })
      })
    }
    paths.push(path)
  }
  const assigned = await assignPrioritized(m.layers, paths, options.prioritizedFiles ?? [], subject, signal)

  const layers: Output[] = []
  for (const [i, l] of m.layers.entries()) {
    const files = assigned[i] ?? []
    const key = `${l.digest}|${files.join('\n')}`
    let built = builtLayers.get(key)
    if (built === undefined) {
      built = buildLayer(l, paths[i]!, files, work, options)
      builtLayers.set(key, built)
    }
    const out = await built
    layers.push(out)
    if (out.diffId !== undefined) diffIds[i] = out.diffId
  }
  const newConfig = json(config)
  const configDigest = sha256(newConfig)
  const manifest: Record<string, unknown> = {
    schemaVersion: 2,
    mediaType: MediaType.ociManifest,
    config: { mediaType: MediaType.ociConfig, digest: configDigest, size: newConfig.length },
    layers: layers.map((l) => l.descriptor)
  }
  if (m.annotations !== undefined) manifest.annotations = m.annotations
  const manifestBytes = json(manifest)
  return {
    manifest: source,
    configBytes: newConfig,
    layers,
    manifestBytes,
    ...(platform !== undefined ? { platform } : {}),
    result: {
      ...(platform !== undefined ? { platform } : {}),
      sourceDigest: source.digest,
      digest: sha256(manifestBytes),
      config: configDigest,
      layers: layers.map((l) => l.result)
    }
  }
}

async function buildLayer(
  l: Descriptor,
  path: string,
  files: string[],
  work: string,
  options: ConvertOptions
): Promise<Output> {
  const toc = l.annotations?.[TOC_DIGEST_ANNOTATION]
  if (toc !== undefined) {
    await checkKeptLayer(path, toc, options.signal)
    const size = l.annotations?.[UNCOMPRESSED_SIZE_ANNOTATION]
    const result: LayerResult = {
      sourceDigest: l.digest,
      digest: l.digest,
      size: l.size,
      mediaType: l.mediaType,
      tocDigest: toc,
      converted: false,
      prioritizedFiles: [],
      ...(size !== undefined ? { uncompressedSize: Number(size) } : {})
    }
    options.onEvent?.({ type: 'layer', layer: result })
    return { descriptor: l, path, result }
  }
  const existing = await existingLazyLayer(path, options.signal)
  if (existing !== undefined) {
    if (files.length > 0) {
      throw new PrioritizedFileMissingError(
        `prioritized files ${files.join(', ')} are in layer ${l.digest}, which is ${existing.format} already and kept as it is`,
        { hint: 'convert the original (non-eStargz) image to prioritize files' }
      )
    }
    // eStargz without the manifest annotations (pushed by a tool that dropped them): keep it, annotate it.
    const annotations: Record<string, string> = { ...l.annotations }
    if (existing.format === 'estargz') {
      annotations[TOC_DIGEST_ANNOTATION] = existing.tocDigest
      annotations[UNCOMPRESSED_SIZE_ANNOTATION] = String(existing.uncompressedSize)
    }
    const result: LayerResult = {
      sourceDigest: l.digest,
      digest: l.digest,
      size: l.size,
      mediaType: l.mediaType,
      tocDigest: existing.tocDigest,
      uncompressedSize: existing.uncompressedSize,
      converted: false,
      prioritizedFiles: []
    }
    options.onEvent?.({ type: 'layer', layer: result })
    return { descriptor: { ...l, annotations }, path, result }
  }
  options.onEvent?.({ type: 'convert-start', digest: l.digest, size: l.size })
  const out = join(work, `out-${l.digest.replace(':', '-')}-${files.length}`)
  const built = await buildEstargz(createReadStream(path), createWriteStream(out), {
    ...(options.chunkSize !== undefined ? { chunkSize: options.chunkSize } : {}),
    ...(options.gzipLevel !== undefined ? { gzipLevel: options.gzipLevel } : {}),
    prioritizedFiles: files,
    tmpDir: work,
    ...(options.signal !== undefined ? { signal: options.signal } : {}),
    onProgress: (bytes) => options.onEvent?.({ type: 'convert', digest: l.digest, bytes })
  })
  const annotations = {
    ...l.annotations,
    ...built.annotations,
    [TOC_DIGEST_ANNOTATION]: built.tocDigest,
    [UNCOMPRESSED_SIZE_ANNOTATION]: String(built.uncompressedSize)
  }
  const result: LayerResult = {
    sourceDigest: l.digest,
    digest: built.blobDigest,
    size: built.blobSize,
    mediaType: MediaType.ociLayerGzip,
    tocDigest: built.tocDigest,
    uncompressedSize: built.uncompressedSize,
    converted: true,
    prioritizedFiles: files
  }
  options.onEvent?.({ type: 'layer', layer: result })
  return {
    descriptor: { mediaType: MediaType.ociLayerGzip, digest: built.blobDigest, size: built.blobSize, annotations },
    path: out,
    result,
    diffId: built.diffId
  }
}

/**
 * A layer kept as it is because it is eStargz already is published only if strata could mount it: its TOC must
 * match the annotation and keep the rules of the TOC parser (no entry named, or hardlinked, out of the layer),
 * which are the rules the builder applies to the layers it makes. A layer with no footer is left to the reader.
 */
async function checkKeptLayer(path: string, tocDigest: string, signal?: AbortSignal): Promise<void> {
  const reader = await fileReader(path)
  try {
    await openLayer(reader, { tocDigest, ...(signal !== undefined ? { signal } : {}) })
  } catch (err) {
    if ((err as Error).name !== 'InvalidFooterError') throw err
  } finally {
    await reader.close()
  }
}

/** The format, TOC digest and uncompressed size of a downloaded layer that has a stargz footer; else undefined. */
async function existingLazyLayer(
  path: string,
  signal?: AbortSignal
): Promise<{ format: string; tocDigest: string; uncompressedSize: number } | undefined> {
  const reader = await fileReader(path)
  let layer: Awaited<ReturnType<typeof openLayer>>
  try {
    layer = await openLayer(reader, signal !== undefined ? { signal } : {})
  } catch (err) {
    if ((err as Error).name === 'InvalidFooterError') return undefined
    throw err
  } finally {
    await reader.close()
  }
  let uncompressedSize = 0
  await pipeline(
    createReadStream(path),
    createGunzip(),
    async (chunks: AsyncIterable<Buffer>) => {
      for await (const c of chunks) uncompressedSize += c.length
    },
    { signal }
  )
  return { format: layer.format, tocDigest: layer.tocDigest, uncompressedSize }
}

/**
 * Gives each prioritized file to the topmost layer that has it, checking that no layer above deletes it (a
 * `.wh.` whiteout of it or of a parent, or an opaque parent directory).
 */
async function assignPrioritized(
  layers: Descriptor[],
  paths: string[],
  files: string[],
  subject: { registry: string; digest: string },
  signal?: AbortSignal
): Promise<string[][]> {
  const assigned: string[][] = layers.map(() => [])
  if (files.length === 0) return assigned
  const names: Set<string>[] = []
  for (const p of paths) names.push(await tarEntryNames(p, { signal }))
  for (const file of files) {
    const clean = cleanTarName(file)
    let found = -1
    for (let i = layers.length - 1; i >= 0 && found < 0; i--) {
      const n = names[i]!
      if (n.has(clean)) {
        found = i
        break
      }
      const deleted = ancestors(clean).find(
        (p) =>
          n.has(posix.join(posix.dirname(p), `.wh.${posix.basename(p)}`)) || (p !== clean && n.has(`${p}/.wh..wh..opq`))
      )
      if (deleted !== undefined) {
        throw new PrioritizedFileMissingError(
          `prioritized file ${file} is deleted by layer ${i} (${layers[i]!.digest})`,
          {
            ...subject,
            hint: 'list only files that exist in the final image'
          }
        )
      }
    }
    if (found < 0) {
      throw new PrioritizedFileMissingError(`prioritized file ${file} is in no layer of the image`, {
        ...subject,
        hint: 'list paths as they are inside the image, e.g. usr/bin/env or /usr/bin/env, one per line'
      })
    }
    if (layers[found]!.annotations?.[TOC_DIGEST_ANNOTATION] !== undefined) {
      throw new PrioritizedFileMissingError(
        `prioritized file ${file} is in layer ${found}, which is eStargz already and kept as it is`,
        {
          ...subject,
          hint: 'convert the original (non-eStargz) image to prioritize files'
        }
      )
    }
    assigned[found]!.push(clean)
  }
  return assigned
}

/** `a/b/c` -> [`a/b/c`, `a/b`, `a`]. */
function ancestors(path: string): string[] {
  const out: string[] = []
  for (let p = path; p !== '' && p !== '.'; p = posix.dirname(p)) out.push(p)
  return out
}
