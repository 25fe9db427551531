import { createHash } from 'node:crypto'

const SHA256_DIGEST = /^sha256:[0-9a-f]{64}$/

/** `sha256:<hex>` of the bytes. */
export function sha256Digest(bytes: Uint8Array): string {
  return `sha256:${createHash('sha256').update(bytes).digest('hex')}`
}

/** Whether `s` is a well-formed `sha256:<64 lowercase hex>` digest. */
export function isSha256Digest(s: unknown): s is string {
  return typeof s === 'string' && SHA256_DIGEST.test(s)
}
