import { arch, platform as osPlatform } from 'node:os'
import { type ErrorSubject, ManifestInvalidError, PlatformNotFoundError, UnsupportedMediaTypeError } from './errors.js'

export const MediaType = {
  ociManifest: 'application/vnd.oci.image.manifest.v1+json',
  ociIndex: 'application/vnd.oci.image.index.v1+json',
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
  dockerManifestList: 'application/vnd.docker.distribution.manifest.list.v2+json',
  ociConfig: 'application/vnd.oci.image.config.v1+json',
  dockerConfig: 'application/vnd.docker.container.image.v1+json',
  ociLayerGzip: 'application/vnd.oci.image.layer.v1.tar+gzip',
  ociLayerZstd: 'application/vnd.oci.image.layer.v1.tar+zstd',
  ociLayer: 'application/vnd.oci.image.layer.v1.tar',
  dockerLayerGzip: 'application/vnd.docker.image.rootfs.diff.tar.gzip'
} as const

/** Sent as Accept on every manifest request. */
export const MANIFEST_ACCEPT = [
  MediaType.ociManifest,
  MediaType.ociIndex,
  MediaType.dockerManifest,
  MediaType.dockerManifestList
]

export interface Platform {
  os: string
  architecture: string
  variant?: string
  'os.version'?: string
}

export interface Descriptor {
  mediaType: string
  digest: string
  size: number
  annotations?: Record<string, string>
  platform?: Platform
  urls?: string[]
}

export interface ImageManifest {
  schemaVersion: 2
  mediaType?: string
  config: Descriptor
  layers: Descriptor[]
  annotations?: Record<string, string>
}

export interface ImageIndex {
  schemaVersion: 2
  mediaType?: string
  manifests: Descriptor[]
  annotations?: Record<string, string>
}

export function isIndexType(mediaType: string): boolean {
  return mediaType === MediaType.ociIndex || mediaType === MediaType.dockerManifestList
}

export function isManifestType(mediaType: string): boolean {
  return mediaType === MediaType.ociManifest || mediaType === MediaType.dockerManifest
}

const DIGEST = /^sha256:[a-f0-9]{64}$|^sha512:[a-f0-9]{128}$/

function checkDescriptor(d: unknown, what: string, subject: ErrorSubject): Descriptor {
  const bad = (why: string) =>
    new ManifestInvalidError(`malformed manifest: ${what} ${why}`, {
      ...subject,
      hint: 'the image was pushed by a broken tool; push it again'
    })
  if (typeof d !== 'object' || d === null) throw bad('is not an object')
  const x = d as Record<string, unknown>
  if (typeof x.mediaType !== 'string' || x.mediaType === '') throw bad('has no mediaType')
  if (typeof x.digest !== 'string' || !DIGEST.test(x.digest)) throw bad(`has an invalid digest '${String(x.digest)}'`)
  if (typeof x.size !== 'number' || !Number.isSafeInteger(x.size) || x.size < 0)
    throw bad(`has an invalid size '${String(x.size)}'`)
  if (x.annotations !== undefined) {
    if (
      typeof x.annotations !== 'object' ||
      x.annotations === null ||
      Object.values(x.annotations).some((v) => typeof v !== 'string')
    ) {
      throw bad('has annotations that are not a string map')
    }
  }
  return d as Descriptor
}

/** Parses and validates manifest bytes of a known media type; unknown types and bad shapes are clear errors. */
export function parseManifest(
  bytes: Uint8Array,
  mediaType: string | undefined,
  subject: ErrorSubject
): { mediaType: string; manifest: ImageManifest | ImageIndex } {
  let body: unknown
  try {
    body = JSON.parse(Buffer.from(bytes).toString('utf8'))
  } catch (err) {
    throw new ManifestInvalidError('malformed manifest: not JSON', { ...subject, cause: err })
  }
  if (typeof body !== 'object' || body === null || Array.isArray(body))
    throw new ManifestInvalidError('malformed manifest: not a JSON object', subject)
  const type = mediaType ?? ''
  if (!isIndexType(type) && !isManifestType(type)) {
    throw new UnsupportedMediaTypeError(`unsupported manifest media type '${type || '(none)'}'`, {
      ...subject,
      hint: `strata reads ${MANIFEST_ACCEPT.join(', ')}; Docker schema 1 images must be re-pushed with a current tool`
    })
  }
  const b = body as Record<string, unknown>
  if (b.schemaVersion !== 2)
    throw new ManifestInvalidError(`malformed manifest: schemaVersion is ${String(b.schemaVersion)}, not 2`, subject)
  if (isIndexType(type)) {
    if (!Array.isArray(b.manifests)) throw new ManifestInvalidError('malformed index: no manifests array', subject)
    for (const [i, d] of b.manifests.entries()) checkDescriptor(d, `manifests[${i}]`, subject)
  } else {
    checkDescriptor(b.config, 'config', subject)
    if (!Array.isArray(b.layers)) throw new ManifestInvalidError('malformed manifest: no layers array', subject)
    for (const [i, d] of b.layers.entries()) checkDescriptor(d, `layers[${i}]`, subject)
  }
  return { mediaType: type, manifest: body as ImageManifest | ImageIndex }
}

/** Parses `os/arch[/variant]`. */
export function parsePlatform(s: string): Platform {
  const parts = s.split('/')
  if (parts.length < 2 || parts.length > 3 || parts.some((p) => p === '')) {
    throw new PlatformNotFoundError(`invalid platform '${s}'`, {
      hint: 'use os/arch[/variant], e.g. linux/amd64 or linux/arm64/v8'
    })
  }
  const p: Platform = { os: parts[0]!, architecture: parts[1]! }
  if (parts[2] !== undefined) p.variant = parts[2]
  return p
}

export function formatPlatform(p: Platform): string {
  return `${p.os}/${p.architecture}${p.variant !== undefined ? `/${p.variant}` : ''}`
}

/** This machine's platform in OCI terms. */
export function hostPlatform(): Platform {
  const archMap: Record<string, string> = {
    x64: 'amd64',
    ia32: '386',
    arm64: 'arm64',
    arm: 'arm',
    ppc64: 'ppc64le',
    s390x: 's390x',
    riscv64: 'riscv64',
    loong64: 'loong64'
  }
  const p: Platform = {
    os: osPlatform() === 'win32' ? 'windows' : osPlatform(),
    architecture: archMap[arch()] ?? arch()
  }
  if (p.architecture === 'arm')
    p.variant = `v${String((process.config.variables as { arm_version?: string }).arm_version ?? '7')}`
  return p
}

function normalVariant(p: Platform): string | undefined {
  // arm64 images mostly omit the variant; v8 is the only one in use.
  if (p.architecture === 'arm64' && (p.variant === undefined || p.variant === 'v8')) return undefined
  return p.variant
}

export function platformMatches(want: Platform, have: Platform | undefined): boolean {
  if (have === undefined) return false
  if (want.os !== have.os || want.architecture !== have.architecture) return false
  return want.variant === undefined || normalVariant(want) === normalVariant(have)
}

/**
 * Picks the manifest for a platform from an index; else a nested index that is for the platform, or for no
 * platform in particular, to look in next.
 */
export function selectPlatform(index: ImageIndex, want: Platform, subject: ErrorSubject): Descriptor {
  const found =
    index.manifests.find((d) => isManifestType(d.mediaType) && platformMatches(want, d.platform)) ??
    index.manifests.find((d) => isIndexType(d.mediaType) && platformMatches(want, d.platform)) ??
    index.manifests.find((d) => isIndexType(d.mediaType) && d.platform === undefined)
  if (found !== undefined) return found
  const have = index.manifests
    .filter((d) => d.platform !== undefined)
    .map((d) => formatPlatform(d.platform!))
    .join(', ')
  throw new PlatformNotFoundError(`no image for platform ${formatPlatform(want)} (the index has: ${have || 'none'})`, {
    ...subject,
    hint: 'choose one of those with --platform os/arch[/variant]'
  })
}
