import { basicHeader, type Challenge, type CredentialStore, parseChallenge } from './auth.js'
import { UnauthorizedError } from './errors.js'
import { type Authorizer, IdleTimer, Reply, type RequestSpec } from './http.js'
import { tokenFromResponse } from './quirks.js'

type Signalled = { signal?: AbortSignal | undefined }

export interface TokenFlowInit {
  creds: CredentialStore
  fetch: typeof fetch
  userAgent: string
  /** Longest wait for the token server's headers or the next piece of its body. */
  timeoutMs: number
}

/**
 * The registry's auth challenge answered: Basic credentials, or the Bearer token flow (a token per registry and
 * scopes, cached until shortly before it expires, fetched once however many requests need it).
 */
export class TokenFlow implements Authorizer {
  /** Bearer tokens by `registry|scopes`. */
  private readonly tokens = new Map<string, { header: string; expires: number }>()
  /** The last Bearer challenge per registry, to fetch tokens for new scopes without a 401 first. */
  private readonly challenges = new Map<string, Challenge>()
  private readonly tokenFlights = new Map<string, Promise<string>>()
  private readonly basic = new Map<string, string>()

  constructor(private readonly init: TokenFlowInit) {}

  usesBasic(registry: string): boolean {
    return this.basic.has(registry)
  }

  async authorization(registry: string, scopes: string[], options: Signalled): Promise<string | undefined> {
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

  async authenticate(
    registry: string,
    scopes: string[],
    header: string | null,
    sent: string | undefined,
    spec: RequestSpec
  ): Promise<void> {
    const challenge = parseChallenge(header)
    const subject = spec.subject
    if (challenge === undefined) {
      throw new UnauthorizedError(
        'the registry asks for authentication (401) without a usable WWW-Authenticate header',
        subject
      )
    }
    if (challenge.scheme === 'basic') {
      const creds = await this.init.creds.get(registry, spec)
      if (creds === undefined || this.basic.get(registry) === basicHeader(creds)) {
        throw new UnauthorizedError(
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
    await this.tokenFor(registry, scopes, challenge, spec)
  }

  /** One token request at a time per registry and scopes: concurrent requests that need it share it. */
  private tokenFor(registry: string, scopes: string[], challenge: Challenge, options: Signalled): Promise<string> {
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
    options: Signalled
  ): Promise<string> {
    const realm = challenge.params.realm
    if (realm === undefined) throw new UnauthorizedError('the Bearer challenge has no realm', { registry })
    const url = new URL(realm)
    if (challenge.params.service !== undefined) url.searchParams.set('service', challenge.params.service)
    const wanted = new Set([...(challenge.params.scope?.split(' ') ?? []), ...scopes].filter((s) => s !== ''))
    for (const s of wanted) url.searchParams.append('scope', s)
    const creds = await this.init.creds.get(registry, options)
    const headers: Record<string, string> = { 'user-agent': this.init.userAgent }
    if (creds !== undefined) headers.authorization = basicHeader(creds)
    const subject = { registry }
    const timer = new IdleTimer(this.init.timeoutMs, options.signal)
    let res: Response
    timer.arm()
    try {
      res = await this.init.fetch(url, { headers, signal: timer.signal })
    } catch (err) {
      throw timer.translate(err, subject, `the token server ${url.origin}`)
    } finally {
      timer.disarm()
    }
    const reply = new Reply(res, timer, subject)
    const text = Buffer.from(await reply.bytes(1024 * 1024)).toString('utf8')
    if (res.status === 401 || res.status === 403) {
      throw new UnauthorizedError(
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
      throw new UnauthorizedError(
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
}
