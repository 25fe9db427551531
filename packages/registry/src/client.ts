import { sha256Digest } from '@strata/base'
import { CredentialStore, type Credentials } from './auth.js'
import { type BlobOptions, Blobs, type RemoteBlob } from './blobs.js'
import { HttpCore } from './http.js'
import type { Descriptor } from './manifest.js'
import { type Image, type Manifest, ManifestReads } from './manifest-reads.js'
import { type BlobSource, Push } from './push.js'
import { parseReference, type Reference } from './reference.js'
import { TokenFlow } from './token-flow.js'

// The registry client: the composition of its parts, each in its own file: the HTTP core (http.ts: requests,
// redirects, typed errors, retries, timeouts), the token flow (token-flow.ts), blobs (blobs.ts: ranges, whole
// blobs, sizes), push (push.ts) and manifest reads (manifest-reads.ts).

export type { BlobOptions, Range, ReadOptions, RemoteBlob } from './blobs.js'
export type { Image, Manifest } from './manifest-reads.js'
export type { BlobSource } from './push.js'

export interface RegistryClientInit {
  /** Registries (host[:port]) spoken to over plain HTTP. Loopback registries always are. */
  insecure?: string[]
  /** Explicit credentials per registry host; they win over the docker config. */
  credentials?: Record<string, Credentials>
  /** Path of a docker `config.json`; default `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`; false: none. */
  dockerConfig?: string | false
  userAgent?: string
  /** Longest wait for response headers or for the next piece of a body (default 30 s). */
  timeoutMs?: number
  /**
   * Longest a small read may take in all, retries included (default 60 s): a manifest or index, a blob read whole
   * (fetchBlob: configs), and the reads of a blob opened with `{ deadline: true }` (a TOC). A registry that
   * trickles bytes never trips the idle timeout; this ends such a read. Whole-layer downloads and chunk reads
   * have no deadline: they may be big on a slow link, and the idle timeout stops one that stalls.
   */
  deadlineMs?: number
  /** Further attempts after a 5xx, 429, timeout, network error or short body (default 3). */
  retries?: number
  /** First backoff between attempts, doubled each time (default 250 ms); Retry-After wins when given. */
  backoffMs?: number
  /** Longest Retry-After honoured; a longer one fails at once with TooManyRequestsError (default 60 s). */
  maxRetryAfterMs?: number
  /** Largest manifest accepted (default 4 MiB). */
  maxManifestBytes?: number
  /** The `fetch` every request goes through (default the global one): unit tests answer with a fake. */
  fetch?: typeof fetch
}

export interface Options {
  signal?: AbortSignal
}

export interface RegistryClient {
  /** Any manifest or index, digest-checked when the reference has a digest. */
  getManifest(ref: Reference | string, options?: Options): Promise<Manifest>
  /** Resolves a tag or index to one platform's image manifest (default: this machine's; `os/arch[/variant]`). */
  getImage(ref: Reference | string, options?: Options & { platform?: string }): Promise<Image>
  /** Reads of a blob by Range; `options.deadline` bounds each (for a TOC; never for chunks or whole layers). */
  blob(ref: Reference | string, digest: string | Descriptor, size?: number, options?: BlobOptions): RemoteBlob
  /** A small blob (a config) read whole and digest-checked (default cap 64 MiB), within the deadline. */
  fetchBlob(ref: Reference | string, digest: string, options?: Options & { maxBytes?: number }): Promise<Uint8Array>
  /** Streams a blob to `path` (via a temp file, renamed once the digest checks). `onProgress` gets bytes so far. */
  downloadBlob(
    ref: Reference | string,
    digest: string,
    path: string,
    options?: Options & { onProgress?(bytes: number): void }
  ): Promise<void>
  blobExists(ref: Reference | string, digest: string, options?: Options): Promise<boolean>
  /** The blob's size from a HEAD request; BlobUnknownError when missing. */
  blobSize(ref: Reference | string, digest: string, options?: Options): Promise<number>
  /** Uploads a blob unless the repository has it; `chunkSize` switches to a chunked (PATCH) upload. */
  pushBlob(
    ref: Reference | string,
    digest: string,
    source: BlobSource,
    options?: Options & { chunkSize?: number }
  ): Promise<void>
  /** Cross-repository mount from another repository of the same registry; false when the registry declined. */
  mountBlob(ref: Reference | string, digest: string, fromRepository: string, options?: Options): Promise<boolean>
  /** Puts a manifest under the reference's tag (or digest); returns its digest. */
  putManifest(ref: Reference | string, bytes: Uint8Array, mediaType: string, options?: Options): Promise<string>
}

export function createRegistryClient(init: RegistryClientInit = {}): RegistryClient {
  const fetcher = init.fetch ?? ((input, options) => fetch(input, options))
  const userAgent = init.userAgent ?? 'strata/0.1'
  const timeoutMs = init.timeoutMs ?? 30_000
  const deadlineMs = init.deadlineMs ?? 60_000
  const auth = new TokenFlow({
    creds: new CredentialStore(init.credentials ?? {}, init.dockerConfig),
    fetch: fetcher,
    userAgent,
    timeoutMs
  })
  const http = new HttpCore({
    fetch: fetcher,
    insecure: new Set(init.insecure ?? []),
    userAgent,
    timeoutMs,
    retries: init.retries ?? 3,
    backoffMs: init.backoffMs ?? 250,
    maxRetryAfterMs: init.maxRetryAfterMs ?? 60_000,
    auth
  })
  const blobs = new Blobs(http, deadlineMs)
  const push = new Push(http, blobs)
  const manifests = new ManifestReads(http, { deadlineMs, maxManifestBytes: init.maxManifestBytes ?? 4 * 1024 * 1024 })
  const toRef = (r: Reference | string): Reference => (typeof r === 'string' ? parseReference(r) : r)
  return {
    getManifest: (ref, options = {}) => manifests.getManifest(toRef(ref), options),
    getImage: (ref, options = {}) => manifests.getImage(toRef(ref), options),
    blob: (ref, digest, size, options) => blobs.blob(toRef(ref), digest, size, options),
    fetchBlob: (ref, digest, options = {}) => blobs.fetchBlob(toRef(ref), digest, options),
    downloadBlob: (ref, digest, path, options = {}) => blobs.downloadBlob(toRef(ref), digest, path, options),
    blobExists: (ref, digest, options = {}) => blobs.blobExists(toRef(ref), digest, options),
    blobSize: (ref, digest, options = {}) => blobs.blobSize(toRef(ref), digest, options),
    pushBlob: (ref, digest, source, options = {}) => push.pushBlob(toRef(ref), digest, source, options),
    mountBlob: (ref, digest, from, options = {}) => push.mountBlob(toRef(ref), digest, from, options),
    putManifest: (ref, bytes, mediaType, options = {}) => push.putManifest(toRef(ref), bytes, mediaType, options)
  }
}

/** `sha256:<hex>` of the bytes (@strata/base's sha256Digest, kept under this name for the package's callers). */
export const sha256: (bytes: Uint8Array) => string = sha256Digest
