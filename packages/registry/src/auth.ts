import { spawn } from 'node:child_process'
import { readFile } from 'node:fs/promises'
import { homedir } from 'node:os'
import { join } from 'node:path'
import { CredentialHelperFailedError, RegistryError } from './errors.js'
import { credentialHelperServer, dockerConfigKeys } from './quirks.js'

export interface Credentials {
  username: string
  password: string
}

/** A parsed `WWW-Authenticate` challenge. */
export interface Challenge {
  scheme: 'bearer' | 'basic'
  params: Record<string, string>
}

export function parseChallenge(header: string | null): Challenge | undefined {
  if (header === null) return undefined
  const m = /^\s*(\w+)\s*(.*)$/s.exec(header)
  if (m === null) return undefined
  const scheme = m[1]!.toLowerCase()
  if (scheme !== 'bearer' && scheme !== 'basic') return undefined
  const params: Record<string, string> = {}
  const re = /(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?/g
  for (const p of m[2]!.matchAll(re))
    params[p[1]!.toLowerCase()] = p[2] !== undefined ? p[2].replace(/\\(.)/g, '$1') : p[3]!
  return { scheme, params }
}

interface DockerConfig {
  auths?: Record<string, { auth?: string; username?: string; password?: string; identitytoken?: string }>
  credHelpers?: Record<string, string>
  credsStore?: string
}

const HELPER_TIMEOUT_MS = 10_000

/**
 * Where credentials come from, in order: explicit ones, then `~/.docker/config.json` (or `$DOCKER_CONFIG`):
 * `credHelpers[registry]`, `auths[registry]`, `credsStore`. Results are cached per registry.
 */
export class CredentialStore {
  private readonly cache = new Map<string, Promise<Credentials | undefined>>()
  private config?: Promise<DockerConfig | undefined>

  constructor(
    private readonly explicit: Record<string, Credentials>,
    private readonly dockerConfig: string | false | undefined
  ) {}

  get(registry: string, options: { signal?: AbortSignal } = {}): Promise<Credentials | undefined> {
    let p = this.cache.get(registry)
    if (p === undefined) {
      p = this.lookup(registry, options)
      this.cache.set(registry, p)
      p.catch(() => this.cache.delete(registry))
    }
    return p
  }

  private async lookup(registry: string, options: { signal?: AbortSignal }): Promise<Credentials | undefined> {
    const explicit = this.explicit[registry]
    if (explicit !== undefined) return explicit
    const config = await this.readConfig()
    if (config === undefined) return undefined
    const keys = dockerConfigKeys(registry)
    const helper = keys.map((k) => config.credHelpers?.[k]).find((h) => h !== undefined)
    if (helper !== undefined) return runHelper(helper, registry, options)
    for (const k of keys) {
      const entry = config.auths?.[k]
      if (entry === undefined) continue
      if (entry.username !== undefined && entry.password !== undefined) {
        return { username: entry.username, password: entry.password }
      }
      if (entry.auth !== undefined && entry.auth !== '') {
        const decoded = Buffer.from(entry.auth, 'base64').toString('utf8')
        const colon = decoded.indexOf(':')
        if (colon < 0) {
          throw new RegistryError(`the docker config's auth for ${k} is not base64 of user:password`, {
            registry,
            hint: `run 'docker login ${registry}' again or fix ${this.configPath()}`
          })
        }
        return { username: decoded.slice(0, colon), password: decoded.slice(colon + 1) }
      }
    }
    if (config.credsStore !== undefined && config.credsStore !== '')
      return runHelper(config.credsStore, registry, options)
    return undefined
  }

  private configPath(): string {
    if (typeof this.dockerConfig === 'string') return this.dockerConfig
    const dir = process.env.DOCKER_CONFIG ?? join(homedir(), '.docker')
    return join(dir, 'config.json')
  }

  private readConfig(): Promise<DockerConfig | undefined> {
    if (this.dockerConfig === false) return Promise.resolve(undefined)
    this.config ??= (async () => {
      const path = this.configPath()
      let text: string
      try {
        text = await readFile(path, 'utf8')
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined
        throw new RegistryError(`cannot read docker config ${path}`, { cause: err })
      }
      try {
        return JSON.parse(text) as DockerConfig
      } catch (err) {
        throw new RegistryError(`docker config ${path} is not valid JSON`, { cause: err, hint: 'fix or remove it' })
      }
    })()
    return this.config
  }
}

/** Runs `docker-credential-NAME get` with the server URL on stdin, as docker does. */
async function runHelper(
  name: string,
  registry: string,
  options: { signal?: AbortSignal }
): Promise<Credentials | undefined> {
  const program = `docker-credential-${name}`
  const server = credentialHelperServer(registry)
  const { code, stdout, stderr, error } = await new Promise<{
    code: number | null
    stdout: string
    stderr: string
    error?: Error
  }>((resolve) => {
    const signal = AbortSignal.any([
      AbortSignal.timeout(HELPER_TIMEOUT_MS),
      ...(options.signal ? [options.signal] : [])
    ])
    const child = spawn(program, ['get'], { stdio: ['pipe', 'pipe', 'pipe'], signal })
    let out = ''
    let err = ''
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString()
    })
    child.stderr.on('data', (d: Buffer) => {
      err += d.toString()
    })
    child.once('error', (e) => resolve({ code: null, stdout: out, stderr: err, error: e }))
    child.once('close', (c) => resolve({ code: c, stdout: out, stderr: err }))
    child.stdin.on('error', () => {})
    child.stdin.end(server)
  })
  if (error !== undefined) {
    const missing = (error as NodeJS.ErrnoException).code === 'ENOENT'
    throw new CredentialHelperFailedError(`credential helper ${program} ${missing ? 'is not on PATH' : 'failed'}`, {
      registry,
      cause: error,
      hint: missing
        ? `install ${program} or remove it from the docker config (credHelpers/credsStore)`
        : `check that '${program} get' works`
    })
  }
  const output = (stdout + stderr).trim()
  if (code !== 0) {
    // docker treats this message as "no credentials", not as a failure.
    if (/credentials not found/i.test(output)) return undefined
    throw new CredentialHelperFailedError(`credential helper ${program} exited with ${code}: ${output}`, {
      registry,
      hint: `check that 'echo ${server} | ${program} get' works`
    })
  }
  let parsed: { Username?: unknown; Secret?: unknown }
  try {
    parsed = JSON.parse(stdout) as typeof parsed
  } catch (err) {
    throw new CredentialHelperFailedError(`credential helper ${program} printed something other than JSON`, {
      registry,
      cause: err
    })
  }
  if (typeof parsed.Username !== 'string' || typeof parsed.Secret !== 'string') {
    throw new CredentialHelperFailedError(`credential helper ${program} gave no Username/Secret`, { registry })
  }
  return { username: parsed.Username, password: parsed.Secret }
}

export function basicHeader(c: Credentials): string {
  return `Basic ${Buffer.from(`${c.username}:${c.password}`).toString('base64')}`
}
