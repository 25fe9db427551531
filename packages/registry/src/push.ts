import { createReadStream } from 'node:fs'
import { open, stat } from 'node:fs/promises'
import type { AbortOptions } from '@strata/base'
import type { Blobs } from './blobs.js'
import { digestOf } from './blobs.js'
import { DigestMismatchError, type ErrorSubject, UnexpectedResponseError } from './errors.js'
import type { HttpCore, Reply, RequestSpec } from './http.js'
import { mountHonoured, uploadUrl } from './quirks.js'
import type { Reference } from './reference.js'

// Writes to a registry: blob uploads (monolithic or chunked), cross-repository mounts, manifests.

export type BlobSource = Uint8Array | { path: string }

export class Push {
  constructor(
    private readonly http: HttpCore,
    private readonly blobs: Blobs
  ) {}

  /** Uploads a blob unless the repository has it; `chunkSize` switches to a chunked (PATCH) upload. */
  async pushBlob(
    ref: Reference,
    digest: string,
    source: BlobSource,
    options: AbortOptions & { chunkSize?: number }
  ): Promise<void> {
    if (await this.blobs.blobExists(ref, digest, options)) return
    const subject = { registry: ref.registry, repository: ref.repository, digest }
    const spec = (s: Partial<RequestSpec>): RequestSpec => ({
      ref,
      method: 'GET',
      subject,
      push: true,
      signal: options.signal,
      ...s
    })
    const base = this.http.base(ref.registry)
    await this.http.withRetry(options.signal, async () => {
      const started = await this.http.request(spec({ method: 'POST', path: 'blobs/uploads/' }), [202])
      await started.discard()
      let location = uploadLocation(started, base, subject)
      const octets = { 'content-type': 'application/octet-stream' }
      if (options.chunkSize === undefined) {
        const url = new URL(location)
        url.searchParams.set('digest', digest)
        const body = () => ('path' in source ? createReadStream(source.path) : source)
        const length: Record<string, string> =
          'path' in source ? { 'content-length': String((await stat(source.path)).size) } : {}
        const done = await this.http.request(
          spec({ method: 'PUT', url, headers: { ...octets, ...length }, body }),
          [201]
        )
        await done.discard()
        return
      }
      const size = 'path' in source ? (await stat(source.path)).size : source.length
      for (let off = 0; off < size; off += options.chunkSize) {
        const n = Math.min(options.chunkSize, size - off)
        const data = await readSlice(source, off, n)
        const patched = await this.http.request(
          spec({
            method: 'PATCH',
            url: new URL(location),
            headers: { ...octets, 'content-range': `${off}-${off + n - 1}` },
            body: () => data
          }),
          [202]
        )
        await patched.discard()
        location = uploadLocation(patched, base, subject)
      }
      const url = new URL(location)
      url.searchParams.set('digest', digest)
      const done = await this.http.request(spec({ method: 'PUT', url, headers: octets }), [201])
      await done.discard()
    })
  }

  /** Cross-repository mount from another repository of the same registry; false when the registry declined. */
  async mountBlob(ref: Reference, digest: string, fromRepository: string, options: AbortOptions): Promise<boolean> {
    const subject = { registry: ref.registry, repository: ref.repository, digest }
    const path = `blobs/uploads/?mount=${encodeURIComponent(digest)}&from=${encodeURIComponent(fromRepository)}`
    const reply = await this.http.withRetry(options.signal, () =>
      this.http.request(
        { ref, method: 'POST', path, push: true, mountFrom: fromRepository, subject, signal: options.signal },
        [201, 202]
      )
    )
    await reply.discard()
    if (mountHonoured(reply.res.status)) return true
    // The registry started an ordinary upload instead: cancel it rather than leave it open.
    const location = reply.header('location')
    if (location !== null) {
      await this.http
        .send({
          ref,
          method: 'DELETE',
          url: uploadUrl(location, this.http.base(ref.registry)),
          push: true,
          subject,
          signal: options.signal
        })
        .then((r) => r.discard())
        .catch(() => {})
    }
    return false
  }

  /** Puts a manifest under the reference's tag (or digest); returns its digest. */
  async putManifest(ref: Reference, bytes: Uint8Array, mediaType: string, options: AbortOptions): Promise<string> {
    const digest = digestOf(bytes, ref.digest ?? 'sha256:')
    const subject = { registry: ref.registry, repository: ref.repository, digest }
    if (ref.digest !== undefined && ref.digest !== digest) {
      throw new DigestMismatchError(`the manifest to push has digest ${digest}, not ${ref.digest}`, subject)
    }
    return this.http.withRetry(options.signal, async () => {
      const reply = await this.http.request(
        {
          ref,
          method: 'PUT',
          path: `manifests/${ref.tag ?? digest}`,
          headers: { 'content-type': mediaType },
          body: () => bytes,
          push: true,
          subject,
          signal: options.signal
        },
        [201]
      )
      await reply.discard()
      const echoed = reply.header('docker-content-digest')
      if (echoed !== null && echoed !== digest) {
        throw new DigestMismatchError(`the registry stored the manifest as ${echoed}`, subject)
      }
      return digest
    })
  }
}

function uploadLocation(reply: Reply, base: URL, subject: ErrorSubject): string {
  const location = reply.header('location')
  if (location === null) throw new UnexpectedResponseError('upload response without a Location header', subject)
  return uploadUrl(location, base).toString()
}

async function readSlice(source: BlobSource, offset: number, length: number): Promise<Uint8Array> {
  if (!('path' in source)) return source.subarray(offset, offset + length)
  const f = await open(source.path, 'r')
  try {
    const buf = Buffer.alloc(length)
    const { bytesRead } = await f.read(buf, 0, length, offset)
    if (bytesRead !== length) throw new Error(`${source.path} shrank while uploading`)
    return buf
  } finally {
    await f.close()
  }
}
