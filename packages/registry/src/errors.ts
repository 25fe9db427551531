import { StrataError } from '@strata/base'

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

/**
 * Base of every error this package throws: a StrataError (the one template: a stable `name` ending in `Error`, a
 * stable `code`, a `hint`) that also names what it is about (registry, repository, digest) and the HTTP status.
 */
export class RegistryError extends StrataError {
  override readonly name: string = 'RegistryError'
  override readonly code: string = 'ERR_REGISTRY'
  readonly registry?: string
  readonly repository?: string
  readonly digest?: string
  readonly status?: number

  constructor(message: string, init: RegistryErrorInit = {}) {
    const w = where(init)
    super(w !== '' ? `${w}: ${message}` : message, { cause: init.cause, hint: init.hint })
    if (init.registry !== undefined) this.registry = init.registry
    if (init.repository !== undefined) this.repository = init.repository
    if (init.digest !== undefined) this.digest = init.digest
    if (init.status !== undefined) this.status = init.status
  }
}

export class InvalidReferenceError extends RegistryError {
  override readonly name = 'InvalidReferenceError'
  override readonly code = 'ERR_INVALID_REFERENCE'
}

export class ManifestUnknownError extends RegistryError {
  override readonly name = 'ManifestUnknownError'
  override readonly code = 'ERR_MANIFEST_UNKNOWN'
}

export class BlobUnknownError extends RegistryError {
  override readonly name = 'BlobUnknownError'
  override readonly code = 'ERR_BLOB_UNKNOWN'
}

export class NameUnknownError extends RegistryError {
  override readonly name = 'NameUnknownError'
  override readonly code = 'ERR_NAME_UNKNOWN'
}

export class UnauthorizedError extends RegistryError {
  override readonly name = 'UnauthorizedError'
  override readonly code = 'ERR_UNAUTHORIZED'
}

export class DeniedError extends RegistryError {
  override readonly name = 'DeniedError'
  override readonly code = 'ERR_DENIED'
}

/** 429 that outlasted the retries (or asked for a longer wait than allowed). */
export class TooManyRequestsError extends RegistryError {
  override readonly name = 'TooManyRequestsError'
  override readonly code = 'ERR_TOO_MANY_REQUESTS'
  retryAfterMs?: number
}

/** 5xx or a network failure that outlasted the retries. */
export class RegistryUnavailableError extends RegistryError {
  override readonly name = 'RegistryUnavailableError'
  override readonly code = 'ERR_REGISTRY_UNAVAILABLE'
  retryAfterMs?: number
}

export class RegistryTimeoutError extends RegistryError {
  override readonly name = 'RegistryTimeoutError'
  override readonly code = 'ERR_REGISTRY_TIMEOUT'
}

/**
 * A small read (manifest, index, config, TOC) did not end within the client's deadline, although bytes kept
 * coming (else it is a RegistryTimeoutError): a registry trickling its answer. Not retried: the deadline covers retries.
 */
export class RegistryDeadlineExceededError extends RegistryError {
  override readonly name = 'RegistryDeadlineExceededError'
  override readonly code = 'ERR_REGISTRY_DEADLINE_EXCEEDED'
}

export class RangeNotSatisfiableError extends RegistryError {
  override readonly name = 'RangeNotSatisfiableError'
  override readonly code = 'ERR_RANGE_NOT_SATISFIABLE'
}

/** The body ended before the bytes the headers (or the range) promised. */
export class ShortReadError extends RegistryError {
  override readonly name = 'ShortReadError'
  override readonly code = 'ERR_SHORT_READ'
}

export class DigestMismatchError extends RegistryError {
  override readonly name = 'DigestMismatchError'
  override readonly code = 'ERR_DIGEST_MISMATCH'
}

export class ManifestInvalidError extends RegistryError {
  override readonly name = 'ManifestInvalidError'
  override readonly code = 'ERR_MANIFEST_INVALID'
}

export class ManifestTooLargeError extends RegistryError {
  override readonly name = 'ManifestTooLargeError'
  override readonly code = 'ERR_MANIFEST_TOO_LARGE'
}

export class UnsupportedMediaTypeError extends RegistryError {
  override readonly name = 'UnsupportedMediaTypeError'
  override readonly code = 'ERR_UNSUPPORTED_MEDIA_TYPE'
}

export class PlatformNotFoundError extends RegistryError {
  override readonly name = 'PlatformNotFoundError'
  override readonly code = 'ERR_PLATFORM_NOT_FOUND'
}

/** An index that names an index that names an index... deeper than any real image (a malformed or hostile one). */
export class IndexTooDeepError extends RegistryError {
  override readonly name = 'IndexTooDeepError'
  override readonly code = 'ERR_INDEX_TOO_DEEP'
}

export class CredentialHelperFailedError extends RegistryError {
  override readonly name = 'CredentialHelperFailedError'
  override readonly code = 'ERR_CREDENTIAL_HELPER'
}

/** Any other answer the registry should not have given (unexpected status, bad upload response). */
export class UnexpectedResponseError extends RegistryError {
  override readonly name = 'UnexpectedResponseError'
  override readonly code = 'ERR_UNEXPECTED_RESPONSE'
}

/** Names of errors worth another attempt. */
export const RETRYABLE = new Set([
  'RegistryUnavailableError',
  'TooManyRequestsError',
  'RegistryTimeoutError',
  'ShortReadError'
])

/** A layer convert cannot turn into eStargz (zstd, foreign, not a tar). */
export class LayerNotConvertibleError extends RegistryError {
  override readonly name = 'LayerNotConvertibleError'
  override readonly code = 'ERR_LAYER_NOT_CONVERTIBLE'
}

/** A `--prioritized-file` entry that no layer of the image holds (or that an upper layer deletes). */
export class PrioritizedFileMissingError extends RegistryError {
  override readonly name = 'PrioritizedFileMissingError'
  override readonly code = 'ERR_PRIORITIZED_FILE_MISSING'
}
