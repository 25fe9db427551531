// @strata/base: the shared vocabulary. Depends on nothing; every other package may depend on it.
export type { AbortOptions } from './abort.js'
export { TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION } from './annotations.js'
export { type DigestHasher, digestHasher, digestHex, isSha256Digest, sha256Digest, sha256Hex } from './digest.js'
export { StrataError, type StrataErrorOptions } from './errors.js'
export { META } from './meta.js'
