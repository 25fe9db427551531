import { createHash, type Hash } from 'node:crypto'

// Every content address in strata is a `sha256:<64 lowercase hex>` digest: layers, TOCs, chunks, manifests.
// These are the only places that spell that format.

const SHA256_DIGEST = /^sha256:[0-9a-f]{64}$/

/** `sha256:<hex>` of the bytes (a string is hashed as its UTF-8). */
export function sha256Digest(data: Uint8Array | string): string {
  return `sha256:${sha256Hex(data)}`
}

/** The bare hex sha256 of the bytes: for names (chunk files, directories), not for content addresses. */
export function sha256Hex(data: Uint8Array | string): string {
  return createHash('sha256').update(data).digest('hex')
}

/** An incremental sha256 whose `digest()` is `sha256:<hex>`: for bytes that arrive in pieces. */
export interface DigestHasher {
  update(data: Uint8Array | string): DigestHasher
  digest(): string
}

export function digestHasher(): DigestHasher {
  const hash: Hash = createHash('sha256')
  const hasher: DigestHasher = {
    update(data) {
      hash.update(data)
      return hasher
    },
    digest: () => `sha256:${hash.digest('hex')}`
  }
  return hasher
}

/** Whether `s` is a well-formed `sha256:<64 lowercase hex>` digest. */
export function isSha256Digest(s: unknown): s is string {
  return typeof s === 'string' && SHA256_DIGEST.test(s)
}

/** The hex part of a `sha256:` digest. */
export function digestHex(digest: string): string {
  return digest.slice(digest.indexOf(':') + 1)
}
