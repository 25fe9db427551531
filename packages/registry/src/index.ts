// @strata/registry: OCI distribution client: references, auth, manifests, Range reads, push
export type { Credentials } from './auth.js'
export type {
  BlobOptions,
  BlobSource,
  Image,
  Manifest,
  Options,
  Range,
  RegistryClient,
  RegistryClientInit,
  RemoteBlob
} from './client.js'
export { createRegistryClient, sha256 } from './client.js'
export type { ConvertEvent, ConvertOptions, ConvertResult, ImageResult, LayerResult } from './convert.js'
export { convertImage } from './convert.js'
export {
  BlobUnknownError,
  CredentialHelperFailedError,
  DeniedError,
  DigestMismatchError,
  IndexTooDeepError,
  InvalidReferenceError,
  LayerNotConvertibleError,
  ManifestInvalidError,
  ManifestTooLargeError,
  ManifestUnknownError,
  NameUnknownError,
  PlatformNotFoundError,
  PrioritizedFileMissingError,
  RangeNotSatisfiableError,
  RegistryDeadlineExceededError,
  RegistryError,
  RegistryTimeoutError,
  RegistryUnavailableError,
  ShortReadError,
  TooManyRequestsError,
  UnauthorizedError,
  UnexpectedResponseError,
  UnsupportedMediaTypeError
} from './errors.js'
export type { Descriptor, ImageIndex, ImageManifest, Platform } from './manifest.js'
export { formatPlatform, hostPlatform, isIndexType, isManifestType, MediaType, parsePlatform } from './manifest.js'
export type { Reference } from './reference.js'
export { makeReference, parseReference, parseRepository, repositoryOf, withDigest } from './reference.js'
export type { ImageRepo } from './repo.js'
export { openImageRepo } from './repo.js'
