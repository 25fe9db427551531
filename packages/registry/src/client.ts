import { createHash, randomBytes } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { open, rename, rm, stat } from 'node:fs/promises'
import type { AbortOptions, ReadAt } from '@strata/stargz'
import { basicHeader, type Challenge, CredentialStore, type Credentials, parseChallenge } from './auth.js'
import {
  BlobUnknown,
  Denied,
  DigestMismatch,
  type ErrorSubject,
  IndexTooDeep,
  ManifestTooLarge,
  ManifestUnknown,
  NameUnknown,
  RangeNotSatisfiable,
  RETRYABLE,
  RegistryDeadlineExceeded,
  RegistryError,
  RegistryTimeout,
  RegistryUnavailable,
  ShortRead,
  TooManyRequests,
  Unauthorized,
  UnexpectedResponse,
  UnsupportedMediaType
} from './errors.js'
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
import {
  apiHost,
  ignoredRange,
  insecureByDefault,
  keepAuthorization,
  manifestMediaType,
  mountHonoured,
  storageUrlExpired,
  tokenFromResponse,
  uploadUrl
} from './quirks.js'
import { parseReference, type Reference, withDigest } from './reference.js'

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
  /** Longest Retry-After honoured; a longer one fails at once with TooManyRequests (default 60 s). */
  maxRetryAfterMs?: number
  /** Largest manifest accepted (default 4 MiB). */
  maxManifestBytes?: number
  /** Largest single request readRanges makes when coalescing adjacent ranges (default 16 MiB). */
  maxCoalesceBytes?: number
}

export interface Options {
  signal?: AbortSignal
}

export interface Range {
  offset: number
  length: number
}

type ReadOptions = AbortOptions & { onProgress?(bytes: number): void }

export interface BlobOptions {
  /** Each read of the blob must end within the client's deadlineMs (true) or this many ms: for small reads. */
  deadline?: boolean | number
  /** What the reads are of, for the deadline's error (default `a range of the blob`), e.g. `the TOC`. */
  what?: string
}

/** A remote blob read with HTTP Range requests. `size` is NaN until known (pass it, or after a first read). */
export interface RemoteBlob extends ReadAt {
  /** As ReadAt; `onProgress` hears the length of each piece of the body as it arrives (a slow read is moving). */
  readAt(offset: number, length: number, options?: ReadOptions): Promise<Uint8Array>
  readRanges(ranges: Range[], options?: AbortOptions): Promise<Uint8Array[]>
}

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

export type BlobSource = Uint8Array | { path: string }

export interface RegistryClient {
  /** Any manifest or index, digest-checked when the reference has a digest. */
  getManifest(ref: Reference | string, options?: Options): Promise<Manifest>
  /** Resolves a tag or index to one platform's image manifest (default: this machine's; `os/arch[/variant]`). */
  getImage(ref: Reference | string, options?: Options & { platform?: string }): Promise<Image>
  /** Reads of a blob by Range; `options.deadline` bounds each (for a TOC; never for chunks or whole layers). */
  blob(ref: Reference | string, digest: string | Descriptor, size?: number, options?: BlobOptions): RemoteBlob
  /** Many ranges of one blob: adjacent ones coalesced into one request (at most maxCoalesceBytes each). */
  readRanges(
    ref: Reference | string,
    digest: string | Descriptor,
    ranges: Range[],
    options?: Options & { size?: number }
  ): Promise<Uint8Array[]>
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
  /** The blob's size from a HEAD request; BlobUnknown when missing. */
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
  return new Client(init)
}

export function sha256(bytes: Uint8Array): string {
  return `sha256:${createHash('sha256').update(bytes).digest('hex')}`
}

function hashFor(digest: string) {
  const algo = digest.slice(0, digest.indexOf(':'))
  if (algo !== 'sha256' && algo !== 'sha512') {
    throw new UnsupportedMediaType(`unsupported digest algorithm '${algo}' in ${digest}`)
  }
  return { algo, hash: createHash(algo) }
}

function digestOf(bytes: Uint8Array, like: string): string {
  const { algo, hash } = hashFor(like)
  return `${algo}:${hash.update(bytes).digest('hex')}`
}

const toRef = (r: Reference | string): Reference => (typeof r === 'string' ? parseReference(r) : r)

interface RequestSpec {
  ref: Reference
  method: 'GET' | 'HEAD' | 'POST' | 'PUT' | 'PATCH' | 'DELETE'
  /** Path after `/v2/<repository>/`; or `url` for upload locations. */
  path?: string
  url?: URL
  headers?: Record<string, string>
  /** Makes the body afresh for each attempt. */
  body?: () => Uint8Array | AsyncIterable<Uint8Array>
  push?: boolean
  mountFrom?: string
  subject: ErrorSubject
  /** Remember where this blob redirects, and go there directly next time. */
  blobKey?: string
  signal?: AbortSignal | undefined
}

/** One response, with its body read under the idle timeout. */
class Reply {
  constructor(
    readonly res: Response,
    private readonly timer: IdleTimer,
    private readonly subject: ErrorSubject
  ) {}

  header(name: string): string | null {
    return this.res.headers.get(name)
  }

  async *chunks(onPiece?: (bytes: number) => void): AsyncGenerator<Uint8Array> {
    const body = this.res.body
    if (body === null) return
    const reader = body.getReader()
    try {
      for (;;) {
        this.timer.arm()
        let r: Awaited<ReturnType<typeof reader.read>>
        try {
          r = await reader.read()
        } catch (err) {
          throw this.timer.translate(err, this.subject, 'the response body')
        } finally {
          this.timer.disarm()
        }
        if (r.done) return
        onPiece?.(r.value.length)
        yield r.value
      }
    } finally {
      reader.releaseLock()
      await body.cancel().catch(() => {})
    }
  }

  /** The whole body; `onTooLarge` throws when it exceeds `max`. */
  async bytes(
    max = 64 * 1024 * 1024,
    onTooLarge?: () => Error,
    onPiece?: (bytes: number) => void
  ): Promise<Uint8Array> {
    const parts: Uint8Array[] = []
    let n = 0
    for await (const c of this.chunks(onPiece)) {
      n += c.length
      if (n > max) throw onTooLarge?.() ?? new UnexpectedResponse(`response body over ${max} bytes`, this.subject)
      parts.push(c)
    }
    const out = Buffer.concat(parts, n)
    const declared = this.res.headers.get('content-length')
    if (declared !== null && this.res.headers.get('content-encoding') === null && Number(declared) !== n) {
      throw new ShortRead(`the body ended after ${n} of ${declared} bytes`, this.subject)
    }
    return out
  }

  async discard(): Promise<void> {
    await this.res.body?.cancel().catch(() => {})
  }
}

/** Aborts a request when headers, or the next body chunk, take longer than the timeout. */
class IdleTimer {
  readonly controller = new AbortController()
  private handle?: NodeJS.Timeout
  fired = false

  constructor(
    private readonly ms: number,
    private readonly user?: AbortSignal
  ) {}

  get signal(): AbortSignal {
    return this.user !== undefined ? AbortSignal.any([this.controller.signal, this.user]) : this.controller.signal
  }

  arm(): void {
    this.disarm()
    this.handle = setTimeout(() => {
      this.fired = true
      this.controller.abort(new Error('timeout'))
    }, this.ms)
  }

  disarm(): void {
    if (this.handle !== undefined) clearTimeout(this.handle)
    this.handle = undefined
  }

  /** Maps a fetch/read failure to the error the caller should see. */
  translate(err: unknown, subject: ErrorSubject, what: string): unknown {
    if (this.user?.aborted) return this.user.reason
    if (this.fired) {
      return new RegistryTimeout(`no answer for ${what} within ${this.ms} ms`, {
        ...subject,
        hint: 'the registry or network is slow; retry, or raise the timeout'
      })
    }
    if (err instanceof RegistryError) return err
    if (what === 'the response body') {
      return new ShortRead('the connection closed before the body ended', { ...subject, cause: err })
    }
    return new RegistryUnavailable(`cannot reach the registry: ${(err as Error)?.message ?? String(err)}`, {
      ...subject,
      cause: err,
      hint: 'check the registry address, DNS, proxy settings and --insecure-registry for plain-HTTP registries'
    })
  }
}

const BODY_PIECE = 1024 * 1024

/**
 * A request body that re-arms the idle timer each time the connection takes another piece, so a large upload on a
 * slow link counts as progress, not as a wait for the response; the wait for headers starts after the last piece.
 */
async function* paced(body: Uint8Array | AsyncIterable<Uint8Array>, timer: IdleTimer): AsyncGenerator<Uint8Array> {
  if (body instanceof Uint8Array) {
    for (let off = 0; off < body.length; off += BODY_PIECE) {
      timer.arm()
      yield body.subarray(off, off + BODY_PIECE)
    }
  } else {
    for await (const piece of body) {
      timer.arm()
      yield piece
    }
  }
  timer.arm()
}

function parseRetryAfter(h: string | null): number | undefined {
  if (h === null) return undefined
  if (/^\d+$/.test(h.trim())) return Number(h) * 1000
  const t = Date.parse(h)
  return Number.isNaN(t) ? undefined : Math.max(0, t - Date.now())
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason)
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort)
      resolve()
    }, ms)
    const onAbort = () => {
      clearTimeout(t)
      reject(signal?.reason)
    }
    signal?.addEventListener('abort', onAbort, { once: true })
  })
}

/** Indexes followed from the one a reference names to an image manifest (OCI allows indexes in indexes). */
const MAX_INDEX_DEPTH = 8
/** The longest timer Node keeps: a longer deadline is none. */
const MAX_TIMER_MS = 2 ** 31 - 1

function formatMs(ms: number): string {
  return ms >= 1000 ? `${Math.round(ms / 100) / 10} s` : `${ms} ms`
}

/**
 * Runs `read` (every attempt of it) under a deadline: past it, the read is aborted and fails with
 * RegistryDeadlineExceeded naming `what`. The caller's own abort still wins.
 */
async function withDeadline<T>(
  ms: number,
  what: string,
  subject: ErrorSubject,
  signal: AbortSignal | undefined,
  read: (signal: AbortSignal | undefined) => Promise<T>
): Promise<T> {
  if (!(ms > 0 && ms <= MAX_TIMER_MS)) return read(signal)
  const deadline = new AbortController()
  const timer = setTimeout(() => {
    deadline.abort(
      new RegistryDeadlineExceeded(`${what} took longer than the deadline of ${formatMs(ms)}`, {
        ...subject,
        hint: 'the registry, or a proxy in between, sends it too slowly to be usable (a broken or hostile server, or a very slow link): try again, use another registry or mirror, or raise the registry deadline (deadlineMs)'
      })
    )
  }, ms)
  try {
    return await read(signal === undefined ? deadline.signal : AbortSignal.any([signal, deadline.signal]))
  } catch (err) {
    if (deadline.signal.aborted && signal?.aborted !== true) throw deadline.signal.reason
    throw err
  } finally {
    clearTimeout(timer)
  }
}

const REDIRECTS = new Set([301, 302, 303, 307, 308])
const MAX_REDIRECTS = 5

class Client implements RegistryClient {
  private readonly insecure: Set<string>
  private readonly creds: CredentialStore
  private readonly userAgent: string
  private readonly timeoutMs: number
  private readonly deadlineMs: number
  private readonly retries: number
  private readonly backoffMs: number
  private readonly maxRetryAfterMs: number
  private readonly maxManifestBytes: number
  private readonly maxCoalesceBytes: number
  /** Bearer tokens by `registry|scopes`. */
  private readonly tokens = new Map<string, { header: string; expires: number }>()
  /** The last Bearer challenge per registry, to fetch tokens for new scopes without a 401 first. */
  private readonly challenges = new Map<string, Challenge>()
  private readonly tokenFlights = new Map<string, Promise<string>>()
  private readonly basic = new Map<string, string>()
  /** Where blobs redirected to (signed storage URLs), by `registry/repository@digest`. */
  private readonly locations = new Map<string, URL>()
  /** Registries seen answering a Range request with the whole blob. */
  private readonly rangeRefused = new Set<string>()

  constructor(init: RegistryClientInit) {
    this.insecure = new Set(init.insecure ?? [])
    this.creds = new CredentialStore(init.credentials ?? {}, init.dockerConfig)
    this.userAgent = init.userAgent ?? 'strata/0.1'
    this.timeoutMs = init.timeoutMs ?? 30_000
    this.deadlineMs = init.deadlineMs ?? 60_000
    this.retries = init.retries ?? 3
    this.backoffMs = init.backoffMs ?? 250
    this.maxRetryAfterMs = init.maxRetryAfterMs ?? 60_000
    this.maxManifestBytes = init.maxManifestBytes ?? 4 * 1024 * 1024
    this.maxCoalesceBytes = init.maxCoalesceBytes ?? 16 * 1024 * 1024
  }

  private base(registry: string): URL {
    const scheme = this.insecure.has(registry) || insecureByDefault(registry) ? 'http' : 'https'
    return new URL(`${scheme}://${apiHost(registry)}/v2/`)
  }

  private scopes(spec: RequestSpec): string[] {
    const s = [`repository:${spec.ref.repository}:${spec.push === true ? 'pull,push' : 'pull'}`]
    if (spec.mountFrom !== undefined) s.push(`repository:${spec.mountFrom}:pull`)
    return s
  }

  // ---- HTTP core: one attempt, with auth round trips and redirects -------------------------------------------

  private async send(spec: RequestSpec): Promise<Reply> {
    const registry = spec.ref.registry
    const base = this.base(registry)
    const scopes = this.scopes(spec)
    const origin = spec.url ?? new URL(`${spec.ref.repository}/${spec.path ?? ''}`, base)
    const cached = spec.blobKey !== undefined ? this.locations.get(spec.blobKey) : undefined
    let url = cached ?? origin
    // Two fresh authentications at most: the first answers the challenge (or replaces a cached token the registry
    // no longer accepts), the second covers a token rejected although just issued (clock skew, key rotation).
    let authAttempts = 0
    let reresolved = false
    for (let hops = 0; ; ) {
      const toRegistry = keepAuthorization(base, url)
      const headers: Record<string, string> = { 'user-agent': this.userAgent, ...spec.headers }
      if (toRegistry) {
        const auth = await this.authorization(registry, scopes, spec)
        if (auth !== undefined) headers.authorization = auth
      }
      const timer = new IdleTimer(this.timeoutMs, spec.signal)
      let res: Response
      timer.arm()
      try {
        const raw = spec.body?.()
        if (raw instanceof Uint8Array) headers['content-length'] = String(raw.length)
        const body = raw !== undefined ? paced(raw, timer) : undefined
        res = await fetch(url, {
          method: spec.method,
          headers,
          redirect: 'manual',
          signal: timer.signal,
          ...(body !== undefined ? { body, duplex: 'half' } : {})
        } as RequestInit)
      } catch (err) {
        throw timer.translate(err, spec.subject, `${spec.method} ${url.pathname}`)
      } finally {
        timer.disarm()
      }
      const reply = new Reply(res, timer, spec.subject)
      if (res.status === 401 && toRegistry && authAttempts < 2) {
        await reply.discard()
        authAttempts++
        await this.authenticate(registry, scopes, res.headers.get('www-authenticate'), headers.authorization, spec)
        continue
      }
      if (!toRegistry && storageUrlExpired(res.status) && !reresolved) {
        await reply.discard()
        reresolved = true
        if (spec.blobKey !== undefined) this.locations.delete(spec.blobKey)
        url = origin
        continue
      }
      const location = res.headers.get('location')
      if (REDIRECTS.has(res.status) && location !== null && (spec.method === 'GET' || spec.method === 'HEAD')) {
        await reply.discard()
        if (++hops > MAX_REDIRECTS) {
          throw new UnexpectedResponse(`more than ${MAX_REDIRECTS} redirects`, spec.subject)
        }
        url = new URL(location, url)
        if (spec.blobKey !== undefined && spec.method === 'GET' && !keepAuthorization(base, url)) {
          this.locations.set(spec.blobKey, url)
        }
        continue
      }
      return reply
    }
  }

  private async authorization(registry: string, scopes: string[], options: Options): Promise<string | undefined> {
    const basic = this.basic.get(registry)
    if (basic !== undefined) return basic
    const key = `${registry}|${scopes.join(' ')}`
    const cached = this.tokens.get(key)
    if (cached !== undefined && cached.expires > Date.now()) return cached.header
    const challenge = this.challenges.get(registry)
    if (challenge === undefined) return undefined
    // A token for new scopes, without waiting for a 401: the challenge's own scope was for another request.
    return this.tokenFor(registry, scopes, { ...challenge, params: { ...challenge.params, scope: '' } }, options)
  }

  /** Answers a 401: `sent` is the Authorization the refused request carried. */
  private async authenticate(
    registry: string,
    scopes: string[],
    header: string | null,
    sent: string | undefined,
    options: RequestSpec
  ) {
    const challenge = parseChallenge(header)
    const subject = options.subject
    if (challenge === undefined) {
      throw new Unauthorized(
        'the registry asks for authentication (401) without a usable WWW-Authenticate header',
        subject
      )
    }
    if (challenge.scheme === 'basic') {
      const creds = await this.creds.get(registry, options)
      if (creds === undefined || this.basic.get(registry) === basicHeader(creds)) {
        throw new Unauthorized(
          creds === undefined ? 'authentication required' : 'the registry rejected the credentials',
          {
            ...subject,
            status: 401,
            hint: `log in with 'docker login ${registry}' or pass --creds ${registry}=USER:PASS`
          }
        )
      }
      this.basic.set(registry, basicHeader(creds))
      return
    }
    this.challenges.set(registry, challenge)
    const key = `${registry}|${scopes.join(' ')}`
    const cached = this.tokens.get(key)
    // Another request got a new token while this one was refused: use it rather than fetch yet another.
    if (cached !== undefined && cached.header !== sent && cached.expires > Date.now()) return
    this.tokens.delete(key)
    await this.tokenFor(registry, scopes, challenge, options)
  }

  /** One token request at a time per registry and scopes: concurrent requests that need it share it. */
  private tokenFor(registry: string, scopes: string[], challenge: Challenge, options: Options): Promise<string> {
    const key = `${registry}|${scopes.join(' ')}`
    let flight = this.tokenFlights.get(key)
    if (flight === undefined) {
      // Shared, so not tied to one caller's signal: it has its own timeout.
      flight = this.fetchToken(registry, scopes, challenge, {}).finally(() => this.tokenFlights.delete(key))
      this.tokenFlights.set(key, flight)
    }
    const signal = options.signal
    if (signal === undefined) return flight
    return new Promise<string>((resolve, reject) => {
      const onAbort = () => reject(signal.reason)
      if (signal.aborted) return onAbort()
      signal.addEventListener('abort', onAbort, { once: true })
      flight.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort))
    })
  }

  /** Bearer token flow: GET realm?service=...&scope=..., with Basic credentials when there are any. */
  private async fetchToken(
    registry: string,
    scopes: string[],
    challenge: Challenge,
    options: Options
  ): Promise<string> {
    const realm = challenge.params.realm
    if (realm === undefined) throw new Unauthorized('the Bearer challenge has no realm', { registry })
    const url = new URL(realm)
    if (challenge.params.service !== undefined) url.searchParams.set('service', challenge.params.service)
    const wanted = new Set([...(challenge.params.scope?.split(' ') ?? []), ...scopes].filter((s) => s !== ''))
    for (const s of wanted) url.searchParams.append('scope', s)
    const creds = await this.creds.get(registry, options)
    const headers: Record<string, string> = { 'user-agent': this.userAgent }
    if (creds !== undefined) headers.authorization = basicHeader(creds)
    const subject = { registry }
    const timer = new IdleTimer(this.timeoutMs, options.signal)
    let res: Response
    timer.arm()
    try {
      res = await fetch(url, { headers, signal: timer.signal })
    } catch (err) {
      throw timer.translate(err, subject, `the token server ${url.origin}`)
    } finally {
      timer.disarm()
    }
    const reply = new Reply(res, timer, subject)
    const text = Buffer.from(await reply.bytes(1024 * 1024)).toString('utf8')
    if (res.status === 401 || res.status === 403) {
      throw new Unauthorized(
        `the token server ${url.origin} refused ${creds !== undefined ? 'the credentials' : 'anonymous access'} (${res.status})`,
        {
          ...subject,
          status: res.status,
          hint: `log in with 'docker login ${registry}' or pass --creds ${registry}=USER:PASS`
        }
      )
    }
    let body: unknown
    try {
      body = JSON.parse(text)
    } catch {
      body = undefined
    }
    const token = res.ok ? tokenFromResponse(body) : undefined
    if (token === undefined) {
      throw new Unauthorized(
        `the token server ${url.origin} answered ${res.status} without a token: ${text.slice(0, 200)}`,
        subject
      )
    }
    const header = `Bearer ${token.token}`
    // Renew a little early so a token does not expire between sending and the registry's check.
    this.tokens.set(`${registry}|${scopes.join(' ')}`, {
      header,
      expires: Date.now() + Math.max(1000, token.expiresInMs - 5000)
    })
    return header
  }

  /** Turns an unwanted status into its typed error. */
  private async check(reply: Reply, ok: number[], spec: RequestSpec): Promise<void> {
    const status = reply.res.status
    if (ok.includes(status)) return
    const text =
      spec.method === 'HEAD'
        ? ''
        : Buffer.from(await reply.bytes(64 * 1024).catch(() => new Uint8Array())).toString('utf8')
    let codes: { code?: string; message?: string }[] = []
    try {
      codes = (JSON.parse(text) as { errors?: { code?: string; message?: string }[] }).errors ?? []
    } catch {
      codes = []
    }
    const detail = codes.map((c) => `${c.code}: ${c.message}`).join('; ') || text.slice(0, 200) || reply.res.statusText
    const s = { ...spec.subject, status }
    const code = codes[0]?.code
    const kind = spec.url !== undefined ? 'upload' : (spec.path?.split('/')[0] ?? '')
    if (status === 404 || code === 'MANIFEST_UNKNOWN' || code === 'BLOB_UNKNOWN' || code === 'NAME_UNKNOWN') {
      if (code === 'NAME_UNKNOWN')
        throw new NameUnknown('repository not found', { ...s, hint: 'check the repository name' })
      if (code === 'MANIFEST_UNKNOWN' || kind === 'manifests') {
        throw new ManifestUnknown(`manifest ${spec.subject.digest ?? spec.path?.split('/')[1] ?? ''} not found`, {
          ...s,
          hint: 'check the tag or digest, e.g. with skopeo list-tags'
        })
      }
      throw new BlobUnknown('blob not found', { ...s, hint: 'the image refers to a blob its repository does not have' })
    }
    if (status === 401) {
      const rejected = this.basic.has(spec.ref.registry) ? 'the registry rejected the credentials: ' : ''
      throw new Unauthorized(`${rejected}not authorised (${detail})`, {
        ...s,
        hint: `log in with 'docker login ${spec.ref.registry}' or pass --creds ${spec.ref.registry}=USER:PASS`
      })
    }
    if (status === 403) {
      throw new Denied(`access denied (${detail})`, {
        ...s,
        hint: 'the credentials lack permission for this repository (push needs write access)'
      })
    }
    if (status === 416) throw new RangeNotSatisfiable(`range not satisfiable (${spec.headers?.range ?? ''})`, s)
    if (status === 429) {
      const e = new TooManyRequests('too many requests (429)', {
        ...s,
        hint: 'the registry rate-limits this client: wait, log in for a higher limit, or use a mirror'
      })
      const after = parseRetryAfter(reply.header('retry-after'))
      if (after !== undefined) e.retryAfterMs = after
      throw e
    }
    if (status >= 500) {
      const e = new RegistryUnavailable(`the registry failed with ${status} (${detail})`, s)
      const after = parseRetryAfter(reply.header('retry-after'))
      if (after !== undefined) e.retryAfterMs = after
      throw e
    }
    throw new UnexpectedResponse(`${spec.method} answered ${status} (${detail})`, s)
  }

  /** Runs one attempt again after retryable failures, with exponential backoff or the server's Retry-After. */
  private async withRetry<T>(signal: AbortSignal | undefined, attempt: () => Promise<T>): Promise<T> {
    for (let i = 0; ; i++) {
      try {
        return await attempt()
      } catch (err) {
        const e = err as RegistryError & { retryAfterMs?: number }
        if (!RETRYABLE.has(e?.name) || i >= this.retries || signal?.aborted) {
          if (RETRYABLE.has(e?.name) && i > 0) e.message += ` (after ${i + 1} attempts)`
          throw err
        }
        const backoff = this.backoffMs * 2 ** i * (0.5 + Math.random() / 2)
        const wait = e.retryAfterMs ?? backoff
        if (wait > this.maxRetryAfterMs) {
          e.message += ` (the registry asks to wait ${Math.round(wait / 1000)} s)`
          throw err
        }
        await sleep(wait, signal)
      }
    }
  }

  /** GET of a blob (whole, or the range in `headers`), remembering where its storage redirect goes. */
  private getBlob(
    ref: Reference,
    digest: string,
    subject: ErrorSubject,
    ok: number[],
    signal: AbortSignal | undefined,
    headers?: Record<string, string>
  ): Promise<Reply> {
    const blobKey = `${ref.registry}/${ref.repository}@${digest}`
    return this.request(
      { ref, method: 'GET', path: `blobs/${digest}`, ...(headers ? { headers } : {}), subject, blobKey, signal },
      ok
    )
  }

  private async request(spec: RequestSpec, ok: number[]): Promise<Reply> {
    const reply = await this.send(spec)
    await this.check(reply, ok, spec)
    return reply
  }

  // ---- Manifests ---------------------------------------------------------------------------------------------

  async getManifest(input: Reference | string, options: Options = {}): Promise<Manifest> {
    const ref = toRef(input)
    const subject = { registry: ref.registry, repository: ref.repository, digest: ref.digest }
    const tooLarge = () =>
      new ManifestTooLarge(`manifest is over the ${this.maxManifestBytes} byte cap`, {
        ...subject,
        hint: 'a manifest that large is almost certainly not an image manifest'
      })
    const name = ref.digest ?? ref.tag ?? 'latest'
    const what = ref.digest !== undefined ? 'reading the manifest' : `reading the manifest of tag ${name}`
    return withDeadline(this.deadlineMs, what, subject, options.signal, (signal) =>
      this.withRetry(signal, async () => {
        const reply = await this.request(
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
        if (Number(reply.header('content-length') ?? 0) > this.maxManifestBytes) {
          await reply.discard()
          throw tooLarge()
        }
        const bytes = await reply.bytes(this.maxManifestBytes, tooLarge)
        const digest = digestOf(bytes, ref.digest ?? 'sha256:')
        if (ref.digest !== undefined && ref.digest !== digest) {
          throw new DigestMismatch(`manifest bytes have digest ${digest}, not the requested one`, {
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

  async getImage(input: Reference | string, options: Options & { platform?: string } = {}): Promise<Image> {
    const ref = toRef(input)
    let m = await this.getManifest(ref, options)
    let index: Manifest | undefined
    let platform: Platform | undefined
    const top = m.digest
    // An index may name indexes (OCI nested indexes): follow the platform's entry down to an image manifest.
    for (let depth = 1; isIndexType(m.mediaType); depth++) {
      const subject = { registry: ref.registry, repository: ref.repository, digest: top }
      if (depth > MAX_INDEX_DEPTH) {
        throw new IndexTooDeep(
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

  async putManifest(
    input: Reference | string,
    bytes: Uint8Array,
    mediaType: string,
    options: Options = {}
  ): Promise<string> {
    const ref = toRef(input)
    const digest = digestOf(bytes, ref.digest ?? 'sha256:')
    const subject = { registry: ref.registry, repository: ref.repository, digest }
    if (ref.digest !== undefined && ref.digest !== digest) {
      throw new DigestMismatch(`the manifest to push has digest ${digest}, not ${ref.digest}`, subject)
    }
    return this.withRetry(options.signal, async () => {
      const reply = await this.request(
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
        throw new DigestMismatch(`the registry stored the manifest as ${echoed}`, subject)
      }
      return digest
    })
  }

  // ---- Blobs -------------------------------------------------------------------------------------------------

  blob(input: Reference | string, d: string | Descriptor, size?: number, blobOptions: BlobOptions = {}): RemoteBlob {
    const ref = toRef(input)
    const digest = typeof d === 'string' ? d : d.digest
    const known = { size: size ?? (typeof d === 'string' ? Number.NaN : d.size) }
    const { deadline, what = 'a range of the blob' } = blobOptions
    const ms = deadline === true ? this.deadlineMs : typeof deadline === 'number' ? deadline : 0
    const subject = { registry: ref.registry, repository: ref.repository, digest }
    const readRange = (offset: number, length: number, options: ReadOptions = {}) =>
      ms === 0
        ? this.readRange(ref, digest, known, offset, length, options)
        : withDeadline(ms, `reading ${what} (${length} bytes at offset ${offset})`, subject, options.signal, (signal) =>
            this.readRange(ref, digest, known, offset, length, { ...options, signal })
          )
    const client = this
    return {
      get size() {
        return known.size
      },
      async readAt(offset: number, length: number, options?: ReadOptions) {
        return readRange(offset, length, options)
      },
      async readRanges(ranges: Range[], options: AbortOptions = {}) {
        return client.coalescedRead(ref, ranges, readRange, options)
      }
    }
  }

  readRanges(
    ref: Reference | string,
    digest: string | Descriptor,
    ranges: Range[],
    options: Options & { size?: number } = {}
  ): Promise<Uint8Array[]> {
    return this.blob(ref, digest, options.size).readRanges(ranges, options)
  }

  private async readRange(
    ref: Reference,
    digest: string,
    known: { size: number },
    offset: number,
    length: number,
    options: ReadOptions
  ): Promise<Uint8Array> {
    const subject = { registry: ref.registry, repository: ref.repository, digest }
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new RangeNotSatisfiable(`invalid range offset ${offset} length ${length}`, subject)
    }
    if (!Number.isNaN(known.size)) length = Math.max(0, Math.min(length, known.size - offset))
    if (length === 0) return new Uint8Array(0)
    const range = `bytes=${offset}-${offset + length - 1}`
    return this.withRetry(options.signal, async () => {
      const reply = await this.getBlob(ref, digest, subject, [200, 206], options.signal, { range })
      if (ignoredRange(reply.res.status)) {
        this.rangeRefused.add(ref.registry)
        const total = Number(reply.header('content-length') ?? Number.NaN)
        if (!Number.isNaN(total)) known.size = total
        return sliceStream(reply, offset, length, subject, options.onProgress)
      }
      const cr = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(reply.header('content-range') ?? '')
      if (cr === null || Number(cr[1]) !== offset) {
        await reply.discard()
        throw new UnexpectedResponse(`206 with Content-Range '${reply.header('content-range')}' for ${range}`, subject)
      }
      if (cr[3] !== '*') known.size = Number(cr[3])
      const want = Number(cr[2]) - offset + 1
      if (want > length) {
        await reply.discard()
        throw new UnexpectedResponse(
          `206 with more bytes than asked (${reply.header('content-range')} for ${range})`,
          subject
        )
      }
      const bytes = await reply.bytes(want, undefined, options.onProgress)
      if (bytes.length !== want) {
        throw new ShortRead(`range ${range} returned ${bytes.length} of ${want} bytes`, subject)
      }
      if (want < length && !(Number.isFinite(known.size) && offset + want >= known.size)) {
        throw new ShortRead(`range ${range} returned only ${want} bytes before the end of the blob`, subject)
      }
      return bytes
    })
  }

  /** Coalesces adjacent or overlapping ranges into requests of at most maxCoalesceBytes, then slices. */
  private async coalescedRead(
    ref: Reference,
    ranges: Range[],
    readRange: (offset: number, length: number, options: AbortOptions) => Promise<Uint8Array>,
    options: AbortOptions
  ): Promise<Uint8Array[]> {
    const order = ranges.map((r, i) => ({ ...r, i })).sort((a, b) => a.offset - b.offset)
    const groups: { offset: number; end: number; members: typeof order }[] = []
    // When the registry ignores Range, every request streams the whole blob: make it one request.
    const refused = this.rangeRefused.has(ref.registry)
    for (const r of order) {
      const last = groups[groups.length - 1]
      const end = r.offset + r.length
      const fits =
        last !== undefined && r.offset <= last.end && Math.max(last.end, end) - last.offset <= this.maxCoalesceBytes
      if (last !== undefined && (refused || fits)) {
        last.end = Math.max(last.end, end)
        last.members.push(r)
      } else {
        groups.push({ offset: r.offset, end, members: [r] })
      }
    }
    const out: Uint8Array[] = new Array(ranges.length)
    let next = 0
    const worker = async () => {
      while (next < groups.length) {
        const g = groups[next++]!
        const bytes = await readRange(g.offset, g.end - g.offset, options)
        for (const m of g.members) out[m.i] = bytes.subarray(m.offset - g.offset, m.offset - g.offset + m.length)
      }
    }
    await Promise.all(Array.from({ length: Math.min(4, groups.length) }, worker))
    return out
  }

  async fetchBlob(
    input: Reference | string,
    digest: string,
    options: Options & { maxBytes?: number } = {}
  ): Promise<Uint8Array> {
    const ref = toRef(input)
    const subject = { registry: ref.registry, repository: ref.repository, digest }
    return withDeadline(this.deadlineMs, 'reading the blob (a config, read whole)', subject, options.signal, (signal) =>
      this.withRetry(signal, async () => {
        const reply = await this.getBlob(ref, digest, subject, [200], signal)
        const bytes = await reply.bytes(options.maxBytes ?? 64 * 1024 * 1024)
        const got = digestOf(bytes, digest)
        if (got !== digest) {
          throw new DigestMismatch(`blob content has digest ${got}`, {
            ...subject,
            hint: 'the registry served corrupt data'
          })
        }
        return bytes
      })
    )
  }

  async downloadBlob(
    input: Reference | string,
    digest: string,
    path: string,
    options: Options & { onProgress?(bytes: number): void } = {}
  ): Promise<void> {
    const ref = toRef(input)
    const subject = { registry: ref.registry, repository: ref.repository, digest }
    await this.withRetry(options.signal, async () => {
      const reply = await this.getBlob(ref, digest, subject, [200], options.signal)
      const temp = `${path}.${randomBytes(6).toString('hex')}.partial`
      const file = await open(temp, 'wx')
      try {
        const { algo, hash } = hashFor(digest)
        let n = 0
        for await (const chunk of reply.chunks()) {
          hash.update(chunk)
          await file.write(chunk)
          n += chunk.length
          options.onProgress?.(n)
        }
        const declared = reply.header('content-length')
        if (declared !== null && Number(declared) !== n)
          throw new ShortRead(`the body ended after ${n} of ${declared} bytes`, subject)
        const got = `${algo}:${hash.digest('hex')}`
        if (got !== digest) {
          throw new DigestMismatch(`downloaded content has digest ${got}`, {
            ...subject,
            hint: 'the registry served corrupt data'
          })
        }
        await file.sync()
        await file.close()
        await rename(temp, path)
      } catch (err) {
        await file.close().catch(() => {})
        await rm(temp, { force: true })
        throw err
      }
    })
  }

  async blobExists(input: Reference | string, digest: string, options: Options = {}): Promise<boolean> {
    try {
      await this.blobSize(input, digest, options)
      return true
    } catch (err) {
      if ((err as Error).name === 'BlobUnknown') return false
      throw err
    }
  }

  async blobSize(input: Reference | string, digest: string, options: Options = {}): Promise<number> {
    const ref = toRef(input)
    const subject = { registry: ref.registry, repository: ref.repository, digest }
    return this.withRetry(options.signal, async () => {
      const reply = await this.request(
        { ref, method: 'HEAD', path: `blobs/${digest}`, subject, signal: options.signal },
        [200]
      )
      await reply.discard()
      const n = Number(reply.header('content-length'))
      if (!Number.isSafeInteger(n)) throw new UnexpectedResponse('HEAD of the blob has no Content-Length', subject)
      return n
    })
  }

  async pushBlob(
    input: Reference | string,
    digest: string,
    source: BlobSource,
    options: Options & { chunkSize?: number } = {}
  ): Promise<void> {
    const ref = toRef(input)
    if (await this.blobExists(ref, digest, options)) return
    const subject = { registry: ref.registry, repository: ref.repository, digest }
    const spec = (s: Partial<RequestSpec>): RequestSpec => ({
      ref,
      method: 'GET',
      subject,
      push: true,
      signal: options.signal,
      ...s
    })
    const base = this.base(ref.registry)
    await this.withRetry(options.signal, async () => {
      const started = await this.request(spec({ method: 'POST', path: 'blobs/uploads/' }), [202])
      await started.discard()
      let location = uploadLocation(started, base, subject)
      const octets = { 'content-type': 'application/octet-stream' }
      if (options.chunkSize === undefined) {
        const url = new URL(location)
        url.searchParams.set('digest', digest)
        const body = () => ('path' in source ? createReadStream(source.path) : source)
        const length: Record<string, string> =
          'path' in source ? { 'content-length': String((await stat(source.path)).size) } : {}
        const done = await this.request(spec({ method: 'PUT', url, headers: { ...octets, ...length }, body }), [201])
        await done.discard()
        return
      }
      const size = 'path' in source ? (await stat(source.path)).size : source.length
      for (let off = 0; off < size; off += options.chunkSize) {
        const n = Math.min(options.chunkSize, size - off)
        const data = await readSlice(source, off, n)
        const patched = await this.request(
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
      const done = await this.request(spec({ method: 'PUT', url, headers: octets }), [201])
      await done.discard()
    })
  }

  async mountBlob(
    input: Reference | string,
    digest: string,
    fromRepository: string,
    options: Options = {}
  ): Promise<boolean> {
    const ref = toRef(input)
    const subject = { registry: ref.registry, repository: ref.repository, digest }
    const path = `blobs/uploads/?mount=${encodeURIComponent(digest)}&from=${encodeURIComponent(fromRepository)}`
    const reply = await this.withRetry(options.signal, () =>
      this.request(
        { ref, method: 'POST', path, push: true, mountFrom: fromRepository, subject, signal: options.signal },
        [201, 202]
      )
    )
    await reply.discard()
    if (mountHonoured(reply.res.status)) return true
    // The registry started an ordinary upload instead: cancel it rather than leave it open.
    const location = reply.header('location')
    if (location !== null) {
      await this.send({
        ref,
        method: 'DELETE',
        url: uploadUrl(location, this.base(ref.registry)),
        push: true,
        subject,
        signal: options.signal
      })
        .then((r) => r.discard())
        .catch(() => {})
    }
    return false
  }
}

function uploadLocation(reply: Reply, base: URL, subject: ErrorSubject): string {
  const location = reply.header('location')
  if (location === null) throw new UnexpectedResponse('upload response without a Location header', subject)
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

/** Takes [offset, offset+length) from a whole-blob 200 response, and stops reading once it has them. */
async function sliceStream(
  reply: Reply,
  offset: number,
  length: number,
  subject: ErrorSubject,
  onPiece?: (bytes: number) => void
): Promise<Uint8Array> {
  const out = Buffer.alloc(length)
  let pos = 0
  let got = 0
  for await (const c of reply.chunks(onPiece)) {
    const from = Math.max(0, offset - pos)
    const to = Math.min(c.length, offset + length - pos)
    if (to > from) {
      out.set(c.subarray(from, to), pos + from - offset)
      got += to - from
    }
    pos += c.length
    if (got === length) return out
  }
  const total = Number(reply.header('content-length') ?? pos)
  if (pos < total) throw new ShortRead(`the body ended after ${pos} of ${total} bytes`, subject)
  return out.subarray(0, got)
}
