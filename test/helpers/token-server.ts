import { createHash, createPublicKey, createSign, randomBytes, sign } from 'node:crypto'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { run } from './tools.js'

export interface TokenServerOptions {
  /** Accepted `username: password` pairs (Basic auth on the token request). */
  users?: Record<string, string>
  /** Actions granted to anonymous requests, e.g. ['pull'] (default: none). Users get all they ask for. */
  anonymous?: string[]
  /** Signature algorithm of the tokens (default RS256). */
  alg?: 'RS256' | 'ES256'
  /** Token lifetime in seconds (default 300). */
  expiresIn?: number
  service?: string
  issuer?: string
}

export interface TokenRequest {
  user?: string
  scopes: string[]
  /** HTTP status the server answered. */
  status: number
}

/** A Docker token-auth server (the `realm`), with the fields startRegistry({ token }) needs. */
export interface TokenServer {
  realm: string
  service: string
  issuer: string
  /** PEM file of the self-signed certificate whose key signs the tokens. */
  rootCertBundle: string
  requests: TokenRequest[]
  /** The next this-many tokens are already expired (beyond the registry's leeway) while claiming to be fresh. */
  issueExpired: number
  stop(): Promise<void>
}

/**
 * The key ID distribution 2.8 expects in `kid` (libtrust): the SHA-256 of the DER SubjectPublicKeyInfo,
 * truncated to 240 bits, base32, in 12 groups of 4 separated by ':'.
 */
export function libtrustKeyId(spkiDer: Uint8Array): string {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567'
  const bytes = createHash('sha256').update(spkiDer).digest().subarray(0, 30)
  let bits = ''
  for (const b of bytes) bits += b.toString(2).padStart(8, '0')
  let s = ''
  for (let i = 0; i < bits.length; i += 5) s += alphabet[Number.parseInt(bits.slice(i, i + 5), 2)]
  return s.match(/.{4}/g)!.join(':')
}

const b64url = (b: Buffer | string) => Buffer.from(b).toString('base64url')

export async function startTokenServer(options: TokenServerOptions = {}): Promise<TokenServer> {
  const dir = await mkdtemp(join(tmpdir(), 'strata-token-'))
  const alg = options.alg ?? 'RS256'
  const keyPath = join(dir, 'key.pem')
  const certPath = join(dir, 'cert.pem')
  const newkey =
    alg === 'RS256' ? ['-newkey', 'rsa:2048'] : ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1']
  await run('openssl', [
    'req',
    '-x509',
    ...newkey,
    '-nodes',
    '-keyout',
    keyPath,
    '-out',
    certPath,
    '-days',
    '2',
    '-subj',
    '/CN=strata-token'
  ])
  const key = await readFile(keyPath, 'utf8')
  const cert = await readFile(certPath, 'utf8')
  const kid = libtrustKeyId(createPublicKey(cert).export({ type: 'spki', format: 'der' }))
  const service = options.service ?? 'strata-registry'
  const issuer = options.issuer ?? 'strata-token-issuer'
  const requests: TokenRequest[] = []
  const server_: TokenServer = {
    realm: '',
    service,
    issuer,
    rootCertBundle: certPath,
    requests,
    issueExpired: 0,
    stop: async () => {}
  }

  const token = (sub: string, access: { type: string; name: string; actions: string[] }[]) => {
    let now = Math.floor(Date.now() / 1000)
    if (server_.issueExpired > 0) {
      server_.issueExpired--
      now -= 3600
    }
    const header = b64url(JSON.stringify({ typ: 'JWT', alg, kid }))
    const claims = b64url(
      JSON.stringify({
        iss: issuer,
        sub,
        aud: service,
        exp: now + (options.expiresIn ?? 300),
        nbf: now - 10,
        iat: now,
        jti: randomBytes(8).toString('hex'),
        access
      })
    )
    const data = `${header}.${claims}`
    const sig =
      alg === 'RS256'
        ? createSign('sha256').update(data).sign(key)
        : sign('sha256', Buffer.from(data), { key, dsaEncoding: 'ieee-p1363' })
    return `${data}.${b64url(sig)}`
  }

  const server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://x')
    const scopes = url.searchParams.getAll('scope')
    let user: string | undefined
    const auth = req.headers.authorization
    if (auth?.startsWith('Basic ') === true) {
      const [u, ...p] = Buffer.from(auth.slice(6), 'base64').toString().split(':')
      if (u === undefined || options.users?.[u] !== p.join(':')) {
        requests.push({ user: u, scopes, status: 401 })
        res.writeHead(401, { 'content-type': 'application/json' })
        res.end('{"details":"wrong username or password"}')
        return
      }
      user = u
    }
    const access = scopes.flatMap((s) => {
      const [type, name, actions] = s.split(':')
      if (type === undefined || name === undefined || actions === undefined) return []
      const granted = actions.split(',').filter((a) => user !== undefined || (options.anonymous ?? []).includes(a))
      return granted.length > 0 ? [{ type, name, actions: granted }] : []
    })
    requests.push({ ...(user !== undefined ? { user } : {}), scopes, status: 200 })
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(
      JSON.stringify({
        token: token(user ?? '', access),
        expires_in: options.expiresIn ?? 300,
        issued_at: new Date().toISOString()
      })
    )
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as AddressInfo).port
  Object.assign(server_, {
    realm: `http://127.0.0.1:${port}/token`,
    async stop() {
      server.closeAllConnections()
      await new Promise<void>((resolve) => server.close(() => resolve()))
      await rm(dir, { recursive: true, force: true })
    }
  })
  return server_
}
