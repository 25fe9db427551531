import { InvalidReferenceError } from './errors.js'

/** A parsed image reference, e.g. `docker.io/library/ubuntu:latest` or `127.0.0.1:5000/app@sha256:...`. */
export interface Reference {
  /** Registry host as named in references (`docker.io`, `ghcr.io`, `localhost:5000`). */
  registry: string
  repository: string
  tag?: string
  digest?: string
  toString(): string
}

const COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/
const TAG = /^\w[\w.-]{0,127}$/
const DIGEST = /^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$/
const SHA256 = /^sha256:[a-f0-9]{64}$/
const HOST =
  /^(?:\[[0-9a-fA-F:.]+\]|[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*)(?::\d+)?$/

export const DEFAULT_REGISTRY = 'docker.io'

/** Builds a Reference from parts (validated like parsed ones). */
export function makeReference(parts: {
  registry: string
  repository: string
  tag?: string
  digest?: string
}): Reference {
  const ref: Reference = {
    registry: parts.registry,
    repository: parts.repository,
    toString() {
      return `${this.registry}/${this.repository}${this.tag !== undefined ? `:${this.tag}` : ''}${this.digest !== undefined ? `@${this.digest}` : ''}`
    }
  }
  if (parts.tag !== undefined) ref.tag = parts.tag
  if (parts.digest !== undefined) ref.digest = parts.digest
  return ref
}

/** The same repository, pinned to a digest (the tag is kept for display). */
export function withDigest(ref: Reference, digest: string): Reference {
  return makeReference({ ...ref, digest })
}

/**
 * Parses a reference the way docker does: `ubuntu` -> `docker.io/library/ubuntu:latest`; the first path component
 * is a registry when it has a `.` or `:` or is `localhost`; no tag and no digest means `:latest`.
 */
export function parseReference(s: string): Reference {
  const fail = (why: string) =>
    new InvalidReferenceError(`invalid image reference '${s}': ${why}`, {
      hint: 'use [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST], e.g. docker.io/library/ubuntu:24.04 or localhost:5000/app:1'
    })
  if (s === '') throw fail('it is empty')
  let rest = s
  let digest: string | undefined
  const at = rest.indexOf('@')
  if (at >= 0) {
    digest = rest.slice(at + 1)
    rest = rest.slice(0, at)
    if (!DIGEST.test(digest)) throw fail(`'${digest}' is not a digest (algorithm:hex)`)
    if (digest.startsWith('sha256:') && !SHA256.test(digest)) throw fail(`'${digest}' is not 64 lowercase hex digits`)
  }
  let tag: string | undefined
  const colon = rest.lastIndexOf(':')
  if (colon > rest.lastIndexOf('/')) {
    tag = rest.slice(colon + 1)
    rest = rest.slice(0, colon)
    if (!TAG.test(tag)) throw fail(`tag '${tag}' has characters other than letters, digits, '_', '.', '-'`)
  }
  let registry = DEFAULT_REGISTRY
  const slash = rest.indexOf('/')
  const first = slash >= 0 ? rest.slice(0, slash) : ''
  if (slash >= 0 && (first.includes('.') || first.includes(':') || first === 'localhost')) {
    registry = first
    rest = rest.slice(slash + 1)
    if (!HOST.test(registry)) throw fail(`'${registry}' is not a registry host[:port]`)
  }
  if (registry === 'index.docker.io') registry = DEFAULT_REGISTRY
  if (registry === DEFAULT_REGISTRY && !rest.includes('/')) rest = `library/${rest}`
  if (rest === '') throw fail('the repository name is missing')
  for (const c of rest.split('/')) {
    if (!COMPONENT.test(c)) {
      throw fail(
        /[A-Z]/.test(c)
          ? `repository names must be lowercase ('${c}')`
          : `'${c}' is not a valid repository path component`
      )
    }
  }
  if (rest.length > 255) throw fail('the repository name is longer than 255 characters')
  return makeReference({
    registry,
    repository: rest,
    tag: tag ?? (digest === undefined ? 'latest' : undefined),
    digest
  })
}

/** Where a reference's blobs live, `host[:port]/name` without tag or digest: what a LayerRef carries. */
export function repositoryOf(ref: Reference | string): string {
  const r = typeof ref === 'string' ? parseReference(ref) : ref
  return `${r.registry}/${r.repository}`
}

/**
 * The Reference of a `host[:port]/name` string as repositoryOf writes it, or undefined when it is anything else
 * (a tag, a digest, a short name docker would expand, over 512 characters): for repositories from peers.
 */
export function parseRepository(s: string): Reference | undefined {
  if (s.length > 512 || s.includes('@')) return undefined
  let ref: Reference
  try {
    ref = parseReference(s)
  } catch {
    return undefined
  }
  return repositoryOf(ref) === s ? makeReference({ registry: ref.registry, repository: ref.repository }) : undefined
}
