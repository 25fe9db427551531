import { randomBytes } from 'node:crypto'
import { createReadStream, createWriteStream } from 'node:fs'
import { copyFile, mkdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { pipeline } from 'node:stream/promises'
import { digestHasher, sha256Digest } from '@strata/base'
import type { Manifest, RegistryClient } from './client.js'
import {
  BlobUnknownError,
  DigestMismatchError,
  InvalidReferenceError,
  ManifestInvalidError,
  ManifestUnknownError,
  RegistryError
} from './errors.js'
import { type Descriptor, type ImageIndex, parseManifest } from './manifest.js'
import { manifestMediaType } from './quirks.js'
import { makeReference, parseReference, type Reference, withDigest } from './reference.js'

/**
 * One end of an image copy: a repository in a registry (`host/repo:tag`) or an OCI image layout on disk
 * (`oci:DIR[:TAG]`). Everything read is digest-checked.
 */
export interface ImageRepo {
  /** As the user wrote it, for messages. */
  readonly name: string
  /** The manifest or index the reference names. */
  root(options?: { signal?: AbortSignal }): Promise<Manifest>
  manifest(digest: string, options?: { signal?: AbortSignal }): Promise<Manifest>
  fetchBlob(digest: string, options?: { signal?: AbortSignal }): Promise<Uint8Array>
  downloadBlob(
    digest: string,
    path: string,
    options?: { signal?: AbortSignal; onProgress?(bytes: number): void }
  ): Promise<void>
  /** Stores a blob from a local file whose digest the caller has checked. */
  putBlob(digest: string, path: string, options?: { signal?: AbortSignal }): Promise<void>
  /** Stores a manifest by digest, and under the reference's tag when `tagged`. */
  putManifest(bytes: Uint8Array, mediaType: string, tagged: boolean, options?: { signal?: AbortSignal }): Promise<void>
}

/** Opens `oci:DIR[:TAG]` as an OCI layout, anything else as a registry reference. */
export function openImageRepo(spec: string, client: RegistryClient): ImageRepo {
  if (spec.startsWith('oci:')) return ociLayout(spec)
  return registryRepo(parseReference(spec), client, spec)
}

function registryRepo(ref: Reference, client: RegistryClient, name: string): ImageRepo {
  return {
    name,
    root: (options) => client.getManifest(ref, options),
    manifest: (digest, options) => client.getManifest(withDigest(ref, digest), options),
    fetchBlob: (digest, options) => client.fetchBlob(ref, digest, options),
    downloadBlob: (digest, path, options) => client.downloadBlob(ref, digest, path, options),
    putBlob: (digest, path, options) => client.pushBlob(ref, digest, { path }, options),
    async putManifest(bytes, mediaType, tagged, options) {
      const digest = sha256Digest(bytes)
      const { registry, repository } = ref
      const target =
        tagged && ref.tag !== undefined
          ? makeReference({ registry, repository, tag: ref.tag })
          : makeReference({ registry, repository, digest })
      await client.putManifest(target, bytes, mediaType, options)
    }
  }
}

const REF_NAME = 'org.opencontainers.image.ref.name'

function ociLayout(spec: string): ImageRepo {
  const rest = spec.slice('oci:'.length)
  const colon = rest.lastIndexOf(':')
  const dir = colon > rest.lastIndexOf('/') ? rest.slice(0, colon) : rest
  const tag = colon > rest.lastIndexOf('/') ? rest.slice(colon + 1) : undefined
  if (dir === '')
    throw new InvalidReferenceError(`invalid OCI layout '${spec}': no directory`, { hint: 'use oci:DIR[:TAG]' })
  const blobPath = (digest: string) => {
    const [algo, hex] = digest.split(':')
    if (algo === undefined || hex === undefined || !/^[a-f0-9]+$/.test(hex)) {
      throw new RegistryError(`invalid digest '${digest}' in OCI layout ${dir}`)
    }
    return join(dir, 'blobs', algo, hex)
  }
  const readIndex = async (): Promise<ImageIndex | undefined> => {
    let text: string
    try {
      text = await readFile(join(dir, 'index.json'), 'utf8')
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined
      throw err
    }
    return parseManifest(Buffer.from(text), 'application/vnd.oci.image.index.v1+json', { registry: `oci:${dir}` })
      .manifest as ImageIndex
  }
  const readBlob = async (digest: string): Promise<Uint8Array> => {
    let bytes: Uint8Array
    try {
      bytes = await readFile(blobPath(digest))
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        throw new BlobUnknownError(`blob ${digest} is not in OCI layout ${dir}`, { cause: err })
      }
      throw err
    }
    const got = sha256Digest(bytes)
    if (got !== digest) throw new DigestMismatchError(`blob ${digest} in OCI layout ${dir} has digest ${got}`)
    return bytes
  }
  const loadManifest = async (d: Descriptor): Promise<Manifest> => {
    const bytes = await readBlob(d.digest)
    const parsed = parseManifest(bytes, d.mediaType, { registry: `oci:${dir}`, digest: d.digest })
    const ref = { registry: `oci:${dir}`, repository: '', digest: d.digest, toString: () => `oci:${dir}@${d.digest}` }
    return { ref, digest: d.digest, mediaType: parsed.mediaType, bytes, manifest: parsed.manifest }
  }
  return {
    name: spec,
    async root() {
      const index = await readIndex()
      if (index === undefined) throw new ManifestUnknownError(`no OCI layout at ${dir} (index.json is missing)`)
      const found = index.manifests.filter((m) => (tag === undefined ? true : m.annotations?.[REF_NAME] === tag))
      if (found.length !== 1) {
        const names = index.manifests.map((m) => m.annotations?.[REF_NAME] ?? m.digest).join(', ')
        throw new ManifestUnknownError(
          tag === undefined
            ? `OCI layout ${dir} holds ${index.manifests.length} images: name one as oci:${dir}:TAG (${names})`
            : `no image tagged '${tag}' in OCI layout ${dir} (it has: ${names || 'none'})`
        )
      }
      return loadManifest(found[0]!)
    },
    async manifest(digest) {
      const bytes = await readBlob(digest)
      let body: unknown
      try {
        body = JSON.parse(Buffer.from(bytes).toString('utf8'))
      } catch (err) {
        throw new ManifestInvalidError(`manifest ${digest} in OCI layout ${dir} is not JSON`, { cause: err })
      }
      return loadManifest({ digest, mediaType: manifestMediaType(null, body) ?? '', size: bytes.length })
    },
    fetchBlob: readBlob,
    async downloadBlob(digest, path, options) {
      const hash = digestHasher()
      let n = 0
      await pipeline(
        createReadStream(blobPath(digest)),
        async function* (chunks: AsyncIterable<Buffer>) {
          for await (const c of chunks) {
            hash.update(c)
            n += c.length
            options?.onProgress?.(n)
            yield c
          }
        },
        createWriteStream(path),
        { signal: options?.signal }
      )
      const got = hash.digest()
      if (got !== digest) {
        await rm(path, { force: true })
        throw new DigestMismatchError(`blob ${digest} in OCI layout ${dir} has digest ${got}`)
      }
    },
    async putBlob(digest, path) {
      const target = blobPath(digest)
      if (
        await stat(target).then(
          () => true,
          () => false
        )
      )
        return
      await mkdir(join(target, '..'), { recursive: true })
      const temp = `${target}.${randomBytes(6).toString('hex')}.partial`
      await copyFile(path, temp)
      await rename(temp, target)
    },
    async putManifest(bytes, mediaType, tagged) {
      const digest = sha256Digest(bytes)
      const target = blobPath(digest)
      await mkdir(join(target, '..'), { recursive: true })
      await writeFile(target, bytes)
      if (!tagged) return
      await writeFile(join(dir, 'oci-layout'), '{"imageLayoutVersion":"1.0.0"}')
      const index = (await readIndex()) ?? {
        schemaVersion: 2,
        mediaType: 'application/vnd.oci.image.index.v1+json',
        manifests: []
      }
      const entry: Descriptor = { mediaType, digest, size: bytes.length }
      if (tag !== undefined) entry.annotations = { [REF_NAME]: tag }
      index.manifests = [
        ...index.manifests.filter((m) => tag === undefined || m.annotations?.[REF_NAME] !== tag),
        entry
      ]
      const temp = join(dir, `index.json.${randomBytes(6).toString('hex')}`)
      await writeFile(temp, JSON.stringify(index))
      await rename(temp, join(dir, 'index.json'))
    }
  }
}
