/** What a registry error is about: every message names the registry, repository and, when known, the digest. */
export interface ErrorSubject {
  registry?: string
  repository?: string
  digest?: string
}

export interface RegistryErrorInit extends ErrorSubject {
  cause?: unknown
  hint?: string
  status?: number
}

function where(s: ErrorSubject): string {
  if (s.registry === undefined) return ''
  const name = s.repository !== undefined ? `${s.registry}/${s.repository}` : s.registry
  return s.digest !== undefined ? `${name}@${s.digest}` : name
}

/** Base of every error this package throws; subclasses set a stable `name` and `code`. */
export class RegistryError extends Error {
  override name = 'RegistryError'
  code = 'ERR_REGISTRY'
  readonly registry?: string
  readonly repository?: string
  readonly digest?: string
  readonly status?: number
  hint?: string

  constructor(message: string, init: RegistryErrorInit = {}) {
    const w = where(init)
    super(w !== '' ? `${w}: ${message}` : message, init.cause !== undefined ? { cause: init.cause } : undefined)
    if (init.registry !== undefined) this.registry = init.registry
    if (init.repository !== undefined) this.repository = init.repository
    if (init.digest !== undefined) this.digest = init.digest
    if (init.status !== undefined) this.status = init.status
    if (init.hint !== undefined) this.hint = init.hint
  }
}

export class InvalidReference extends RegistryError {
  override name = 'InvalidReference'
  override code = 'ERR_INVALID_REFERENCE'
}

export class ManifestUnknown extends RegistryError {
  override name = 'ManifestUnknown'
  override code = 'ERR_MANIFEST_UNKNOWN'
}

export class BlobUnknown extends RegistryError {
  override name = 'BlobUnknown'
  override code = 'ERR_BLOB_UNKNOWN'
}

export class NameUnknown extends RegistryError {
  override name = 'NameUnknown'
  override code = 'ERR_NAME_UNKNOWN'
}

export class Unauthorized extends RegistryError {
  override name = 'Unauthorized'
  override code = 'ERR_UNAUTHORIZED'
}

export class Denied extends RegistryError {
  override name = 'Denied'
  override code = 'ERR_DENIED'
}

/** 429 that outlasted the retries (or asked for a longer wait than allowed). */
export class TooManyRequests extends RegistryError {
  override name = 'TooManyRequests'
  override code = 'ERR_TOO_MANY_REQUESTS'
  retryAfterMs?: number
}

/** 5xx or a network failure that outlasted the retries. */
export class RegistryUnavailable extends RegistryError {
  override name = 'RegistryUnavailable'
  override code = 'ERR_REGISTRY_UNAVAILABLE'
  retryAfterMs?: number
}

export class RegistryTimeout extends RegistryError {
  override name = 'RegistryTimeout'
  override code = 'ERR_REGISTRY_TIMEOUT'
}

/**
 * A small read (manifest, index, config, TOC) did not end within the client's deadline, although bytes kept
 * coming (else it is a RegistryTimeout): a registry trickling its answer. Not retried: the deadline covers retries.
 */
export class RegistryDeadlineExceeded extends RegistryError {
  override name = 'RegistryDeadlineExceeded'
  override code = 'ERR_REGISTRY_DEADLINE_EXCEEDED'
}

export class RangeNotSatisfiable extends RegistryError {
  override name = 'RangeNotSatisfiable'
  override code = 'ERR_RANGE_NOT_SATISFIABLE'
}

/** The body ended before the bytes the headers (or the range) promised. */
export class ShortRead extends RegistryError {
  override name = 'ShortRead'
  override code = 'ERR_SHORT_READ'
}

export class DigestMismatch extends RegistryError {
  override name = 'DigestMismatch'
  override code = 'ERR_DIGEST_MISMATCH'
}

export class ManifestInvalid extends RegistryError {
  override name = 'ManifestInvalid'
  override code = 'ERR_MANIFEST_INVALID'
}

export class ManifestTooLarge extends RegistryError {
  override name = 'ManifestTooLarge'
  override code = 'ERR_MANIFEST_TOO_LARGE'
}

export class UnsupportedMediaType extends RegistryError {
  override name = 'UnsupportedMediaType'
  override code = 'ERR_UNSUPPORTED_MEDIA_TYPE'
}

export class PlatformNotFound extends RegistryError {
  override name = 'PlatformNotFound'
  override code = 'ERR_PLATFORM_NOT_FOUND'
}

/** An index that names an index that names an index... deeper than any real image (a malformed or hostile one). */
export class IndexTooDeep extends RegistryError {
  override name = 'IndexTooDeep'
  override code = 'ERR_INDEX_TOO_DEEP'
}

export class CredentialHelperFailed extends RegistryError {
  override name = 'CredentialHelperFailed'
  override code = 'ERR_CREDENTIAL_HELPER'
}

/** Any other answer the registry should not have given (unexpected status, bad upload response). */
export class UnexpectedResponse extends RegistryError {
  override name = 'UnexpectedResponse'
  override code = 'ERR_UNEXPECTED_RESPONSE'
}

/** Names of errors worth another attempt. */
export const RETRYABLE = new Set(['RegistryUnavailable', 'TooManyRequests', 'RegistryTimeout', 'ShortRead'])

/** A layer convert cannot turn into eStargz (zstd, foreign, not a tar). */
export class LayerNotConvertible extends RegistryError {
  override name = 'LayerNotConvertible'
  override code = 'ERR_LAYER_NOT_CONVERTIBLE'
}

/** A `--prioritized-file` entry that no layer of the image holds (or that an upper layer deletes). */
export class PrioritizedFileMissing extends RegistryError {
  override name = 'PrioritizedFileMissing'
  override code = 'ERR_PRIORITIZED_FILE_MISSING'
}
