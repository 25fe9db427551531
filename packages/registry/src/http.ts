import {
  BlobUnknownError,
  DeniedError,
  type ErrorSubject,
  ManifestUnknownError,
  NameUnknownError,
  RangeNotSatisfiableError,
  RETRYABLE,
  RegistryDeadlineExceededError,
  RegistryError,
  RegistryTimeoutError,
  RegistryUnavailableError,
  ShortReadError,
  TooManyRequestsError,
  UnauthorizedError,
  UnexpectedResponseError
} from './errors.js'
import { apiHost, insecureByDefault, keepAuthorization, storageUrlExpired } from './quirks.js'
import type { Reference } from './reference.js'

// The HTTP core of the registry client: one request with its auth round trips and redirects (send), typed
// errors from statuses (check), retries with backoff (withRetry), idle timeouts and deadlines. `fetch` is
// injected, so unit tests can answer with a fake one.

export interface RequestSpec {
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

/** What the HTTP core asks of the token flow (token-flow.ts) around each request to the registry. */
export interface Authorizer {
  /** The Authorization header for a request needing `scopes`, when one is known or can be got without a 401. */
  authorization(
    registry: string,
    scopes: string[],
    options: { signal?: AbortSignal | undefined }
  ): Promise<string | undefined>
  /** Answers a 401: `sent` is the Authorization the refused request carried. */
  authenticate(
    registry: string,
    scopes: string[],
    header: string | null,
    sent: string | undefined,
    spec: RequestSpec
  ): Promise<void>
  /** Whether Basic credentials are in use for the registry (a 401 then means they were rejected). */
  usesBasic(registry: string): boolean
}

export interface HttpInit {
  fetch: typeof fetch
  insecure: ReadonlySet<string>
  userAgent: string
  timeoutMs: number
  retries: number
  backoffMs: number
  maxRetryAfterMs: number
  auth: Authorizer
}

/** One response, with its body read under the idle timeout. */
export class Reply {
  constructor(
    readonly res: Response,
    private readonly timer: IdleTimer,
    readonly subject: ErrorSubject
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
      if (n > max) throw onTooLarge?.() ?? new UnexpectedResponseError(`response body over ${max} bytes`, this.subject)
      parts.push(c)
    }
    const out = Buffer.concat(parts, n)
    const declared = this.res.headers.get('content-length')
    if (declared !== null && this.res.headers.get('content-encoding') === null && Number(declared) !== n) {
      throw new ShortReadError(`the body ended after ${n} of ${declared} bytes`, this.subject)
    }
    return out
  }

  async discard(): Promise<void> {
    await this.res.body?.cancel().catch(() => {})
  }
}

/** Aborts a request when headers, or the next body chunk, take longer than the timeout. */
export class IdleTimer {
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
      return new RegistryTimeoutError(`no answer for ${what} within ${this.ms} ms`, {
        ...subject,
        hint: 'the registry or network is slow; retry, or raise the timeout'
      })
    }
    if (err instanceof RegistryError) return err
    if (what === 'the response body') {
      return new ShortReadError('the connection closed before the body ended', { ...subject, cause: err })
    }
    return new RegistryUnavailableError(`cannot reach the registry: ${(err as Error)?.message ?? String(err)}`, {
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

/** The longest timer Node keeps: a longer deadline is none. */
const MAX_TIMER_MS = 2 ** 31 - 1

function formatMs(ms: number): string {
  return ms >= 1000 ? `${Math.round(ms / 100) / 10} s` : `${ms} ms`
}

/**
 * Runs `read` (every attempt of it) under a deadline: past it, the read is aborted and fails with
 * RegistryDeadlineExceededError naming `what`. The caller's own abort still wins.
 */
export async function withDeadline<T>(
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
      new RegistryDeadlineExceededError(`${what} took longer than the deadline of ${formatMs(ms)}`, {
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

export class HttpCore {
  /** Where blobs redirected to (signed storage URLs), by `registry/repository@digest`. */
  private readonly locations = new Map<string, URL>()

  constructor(private readonly init: HttpInit) {}

  get userAgent(): string {
    return this.init.userAgent
  }

  get timeoutMs(): number {
    return this.init.timeoutMs
  }

  /** The fetch the client was given (the token flow asks token servers with it too). */
  get fetch(): typeof fetch {
    return this.init.fetch
  }

  base(registry: string): URL {
    const scheme = this.init.insecure.has(registry) || insecureByDefault(registry) ? 'http' : 'https'
    return new URL(`${scheme}://${apiHost(registry)}/v2/`)
  }

  private scopes(spec: RequestSpec): string[] {
    const s = [`repository:${spec.ref.repository}:${spec.push === true ? 'pull,push' : 'pull'}`]
    if (spec.mountFrom !== undefined) s.push(`repository:${spec.mountFrom}:pull`)
    return s
  }

  /** One attempt, with auth round trips and redirects; the reply is whatever status came last. */
  async send(spec: RequestSpec): Promise<Reply> {
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
      const headers: Record<string, string> = { 'user-agent': this.init.userAgent, ...spec.headers }
      if (toRegistry) {
        const auth = await this.init.auth.authorization(registry, scopes, spec)
        if (auth !== undefined) headers.authorization = auth
      }
      const timer = new IdleTimer(this.init.timeoutMs, spec.signal)
      let res: Response
      timer.arm()
      try {
        const raw = spec.body?.()
        if (raw instanceof Uint8Array) headers['content-length'] = String(raw.length)
        const body = raw !== undefined ? paced(raw, timer) : undefined
        res = await this.init.fetch(url, {
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
        await this.init.auth.authenticate(
          registry,
          scopes,
          res.headers.get('www-authenticate'),
          headers.authorization,
          spec
        )
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
          throw new UnexpectedResponseError(`more than ${MAX_REDIRECTS} redirects`, spec.subject)
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

  /** One attempt whose status must be one of `ok`; any other becomes its typed error. */
  async request(spec: RequestSpec, ok: number[]): Promise<Reply> {
    const reply = await this.send(spec)
    await this.check(reply, ok, spec)
    return reply
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
        throw new NameUnknownError('repository not found', { ...s, hint: 'check the repository name' })
      if (code === 'MANIFEST_UNKNOWN' || kind === 'manifests') {
        throw new ManifestUnknownError(`manifest ${spec.subject.digest ?? spec.path?.split('/')[1] ?? ''} not found`, {
          ...s,
          hint: 'check the tag or digest, e.g. with skopeo list-tags'
        })
      }
      throw new BlobUnknownError('blob not found', {
        ...s,
        hint: 'the image refers to a blob its repository does not have'
      })
    }
    if (status === 401) {
      const rejected = this.init.auth.usesBasic(spec.ref.registry) ? 'the registry rejected the credentials: ' : ''
      throw new UnauthorizedError(`${rejected}not authorised (${detail})`, {
        ...s,
        hint: `log in with 'docker login ${spec.ref.registry}' or pass --creds ${spec.ref.registry}=USER:PASS`
      })
    }
    if (status === 403) {
      throw new DeniedError(`access denied (${detail})`, {
        ...s,
        hint: 'the credentials lack permission for this repository (push needs write access)'
      })
    }
    if (status === 416) throw new RangeNotSatisfiableError(`range not satisfiable (${spec.headers?.range ?? ''})`, s)
    if (status === 429) {
      const e = new TooManyRequestsError('too many requests (429)', {
        ...s,
        hint: 'the registry rate-limits this client: wait, log in for a higher limit, or use a mirror'
      })
      const after = parseRetryAfter(reply.header('retry-after'))
      if (after !== undefined) e.retryAfterMs = after
      throw e
    }
    if (status >= 500) {
      const e = new RegistryUnavailableError(`the registry failed with ${status} (${detail})`, s)
      const after = parseRetryAfter(reply.header('retry-after'))
      if (after !== undefined) e.retryAfterMs = after
      throw e
    }
    throw new UnexpectedResponseError(`${spec.method} answered ${status} (${detail})`, s)
  }

  /** Runs one attempt again after retryable failures, with exponential backoff or the server's Retry-After. */
  async withRetry<T>(signal: AbortSignal | undefined, attempt: () => Promise<T>): Promise<T> {
    for (let i = 0; ; i++) {
      try {
        return await attempt()
      } catch (err) {
        const e = err as RegistryError & { retryAfterMs?: number }
        if (!RETRYABLE.has(e?.name) || i >= this.init.retries || signal?.aborted) {
          if (RETRYABLE.has(e?.name) && i > 0) e.message += ` (after ${i + 1} attempts)`
          throw err
        }
        const backoff = this.init.backoffMs * 2 ** i * (0.5 + Math.random() / 2)
        const wait = e.retryAfterMs ?? backoff
        if (wait > this.init.maxRetryAfterMs) {
          e.message += ` (the registry asks to wait ${Math.round(wait / 1000)} s)`
          throw err
        }
        await sleep(wait, signal)
      }
    }
  }
}
